"""``hdf5``: our own HDF5 file, flat per-region columns and an offsets index."""
import os
from collections import defaultdict

import numpy as np

from .base import JournalLayout, register_format
from .records import PER_IMAGE_KEYS, PER_REGION_KEYS, SCALAR_KEYS
from .safety import fsync


def append_rows(f, name, rows):
    """Append ``rows`` (n, ...) to the resizable dataset ``name`` of ``f`` (made if missing)."""
    if name not in f:
        row_bytes = max(1, rows[0].nbytes if len(rows) else 1)
        f.create_dataset(
            name, shape=(0,) + rows.shape[1:], maxshape=(None,) + rows.shape[1:],
            dtype=rows.dtype, chunks=(max(1, (1 << 20) // row_bytes),) + rows.shape[1:],
        )
    column = f[name]
    begin = column.shape[0]
    column.resize(begin + len(rows), axis=0)
    column[begin:] = rows


class SlabAppender:
    """
    Rows for the resizable datasets of an open HDF5 file, gathered and appended with
    :func:`append_rows` once they reach ``slab_bytes``: one resize and write a slab rather
    than one a record (a merge holds at most one slab). Leaving its ``with`` block appends
    the rest.
    """

    def __init__(self, f, slab_bytes: int):
        self.f, self.slab_bytes = f, slab_bytes
        self.rows, self.bytes = defaultdict(list), 0

    def add(self, name: str, rows: np.ndarray):
        """Rows (n, ...) for dataset ``name``, in order."""
        self.rows[name].append(rows)
        self.bytes += rows.nbytes
        if self.bytes >= self.slab_bytes:
            self.flush()

    def flush(self):
        for name, parts in self.rows.items():
            append_rows(self.f, name, np.concatenate(parts))
        self.rows, self.bytes = defaultdict(list), 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.flush()


@register_format("hdf5")
class Hdf5Layout(JournalLayout):
    """
    ``<output>/features.h5``: per image ``image_id`` (str), ``image_h``, ``image_w``,
    ``num_bbox`` (int64) and ``offsets`` (images + 1): image i's regions are rows
    ``offsets[i]:offsets[i+1]`` of the per-region columns (``x``, ``bbox``, ...).
    """

    output_name = "features.h5"
    keeps_empty = True
    # Regions are appended to the HDF5 columns in slabs of about this many bytes.
    slab_bytes = 16 << 20

    @classmethod
    def merge(cls, output_dir, world_size):
        import h5py

        target = os.path.join(output_dir, cls.output_name)
        tmp = target + ".tmp"
        per_image = {key: [] for key in PER_IMAGE_KEYS}
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = cls.version
            with SlabAppender(f, cls.slab_bytes) as columns:
                for record in cls.journaled(output_dir, world_size):
                    for key, values in per_image.items():
                        values.append(record[key])
                    for key in PER_REGION_KEYS:
                        if key in record:
                            columns.add(key, record[key])
            f.create_dataset("image_id", data=per_image.pop("image_id"), dtype=h5py.string_dtype())
            for key, values in per_image.items():
                f.create_dataset(key, data=np.array(values, dtype=np.int64))
            offsets = np.cumsum([0] + per_image["num_bbox"], dtype=np.int64)
            f.create_dataset("offsets", data=offsets)
        fsync(tmp)
        os.replace(tmp, target)

    @classmethod
    def read(cls, path):
        """Records of the HDF5 file, in file order."""
        import h5py

        with h5py.File(path, "r") as f:
            offsets = f["offsets"][:]
            per_region = [k for k in PER_REGION_KEYS if k in f]
            for i, image_id in enumerate(f["image_id"].asstr()[:]):
                begin, end = int(offsets[i]), int(offsets[i + 1])
                record = {"image_id": image_id}
                record.update({key: int(f[key][i]) for key in SCALAR_KEYS})
                record.update({key: f[key][begin:end] for key in per_region})
                yield record
