"""
``ban_hdf5``: the HDF5 file and id map of jnhwkim/ban-vqa and hengyuan-hu/
bottom-up-attention-vqa (``dataset.py``).
"""
import os
import pickle

import numpy as np

from .base import JournalLayout, register_format
from .hdf5 import Hdf5Layout, SlabAppender
from .records import spatial6
from .safety import fsync, write_atomically


@register_format("ban_hdf5")
class BanHdf5Layout(JournalLayout):
    """
    ``<output>/ban/``: when every image has the same number N of regions, the fixed layout
    ``featuresN.hdf5`` (``image_features`` (images, N, D), ``image_bb`` (images, N, 4),
    ``spatial_features`` (images, N, 6), as ``train36.hdf5``); otherwise the adaptive layout
    ``features.hdf5`` (the same datasets over all regions, (sum N, ...), and ``pos_boxes``
    (images, 2) int32: image i's rows ``[start, end)``). Beside it the readers' pickle
    ``<same stem>_imgid2idx.pkl`` = ``{int image id: image index}``. Rename ``features``
    to your split's name. The HDF5 also holds ``image_ids``, ``image_h`` and ``image_w``
    (int64, one per image), which the readers ignore and :meth:`read` uses instead of the
    pickle.
    """

    output_name = "ban"
    int_ids = True
    slab_bytes = Hdf5Layout.slab_bytes

    @staticmethod
    def stem(folder: str) -> str:
        """``<folder>/features`` or ``<folder>/featuresN`` (the one there)."""
        names = [n for n in os.listdir(folder) if n.startswith("features") and n.endswith(".hdf5")]
        if len(names) != 1:
            raise FileNotFoundError(f"{folder} holds no single features*.hdf5 of the ban_hdf5 layout")
        return os.path.join(folder, names[0][: -len(".hdf5")])

    @classmethod
    def merge(cls, output_dir, world_size):
        import h5py

        counts = [r["num_bbox"] for r in cls.journaled(output_dir, world_size, keys=("num_bbox",))]
        fixed = len(set(counts)) == 1
        folder = os.path.join(output_dir, cls.output_name)
        os.makedirs(folder, exist_ok=True)
        stem = os.path.join(folder, f"features{counts[0]}" if fixed else "features")
        tmp = stem + ".hdf5.tmp"
        ids, sizes = [], []
        with h5py.File(tmp, "w") as f:
            with SlabAppender(f, cls.slab_bytes) as appender:
                for record in cls.journaled(output_dir, world_size):
                    columns = {
                        "image_features": np.asarray(record["x"], np.float32),
                        "image_bb": np.asarray(record["bbox"], np.float32),
                        "spatial_features": spatial6(record),
                    }
                    for name, rows in columns.items():
                        appender.add(name, rows[None] if fixed else rows)
                    ids.append(int(record["image_id"]))
                    sizes.append((record["image_h"], record["image_w"]))
            if not fixed:
                ends = np.cumsum(counts)
                f.create_dataset("pos_boxes", data=np.stack([ends - counts, ends], 1).astype(np.int32))
            f.create_dataset("image_ids", data=np.array(ids, np.int64))
            f.create_dataset("image_h", data=np.array([h for h, _ in sizes], np.int64))
            f.create_dataset("image_w", data=np.array([w for _, w in sizes], np.int64))
        fsync(tmp)
        for name in os.listdir(folder):  # a layout of an earlier, cut-short merge
            if name.startswith("features") and not name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))
        id_map = pickle.dumps({image_id: index for index, image_id in enumerate(ids)}, protocol=2)
        write_atomically(stem + "_imgid2idx.pkl", id_map)
        os.replace(tmp, stem + ".hdf5")

    @classmethod
    def read(cls, path):
        """Records (``x``, ``bbox``, sizes) of the layout, in file order; the pickle is not read."""
        import h5py

        with h5py.File(cls.stem(path) + ".hdf5", "r") as f:
            ids = f["image_ids"][:]
            if "pos_boxes" in f:
                spans = f["pos_boxes"][:]
            else:
                spans = [(i, i + 1) for i in range(len(ids))]
            for i, (begin, end) in enumerate(spans):
                x = f["image_features"][begin:end].reshape(-1, f["image_features"].shape[-1])
                yield {
                    "image_id": str(ids[i]),
                    "image_h": int(f["image_h"][i]),
                    "image_w": int(f["image_w"][i]),
                    "num_bbox": len(x),
                    "x": x,
                    "bbox": f["image_bb"][begin:end].reshape(-1, 4),
                }
