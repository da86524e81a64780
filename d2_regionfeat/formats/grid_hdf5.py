"""``grid_hdf5``: our own HDF5 file of grid features, each image's own H x W."""
import os

import numpy as np

from .base import JournalLayout, register_format
from .grid import GRID_KEYS, GRID_NEEDS
from .records import encode_npz
from .safety import fsync


@register_format("grid_hdf5")
class GridHdf5Layout(JournalLayout):
    """
    ``<output>/grid.h5``: per image i, ``image_id`` (str), ``image_h``, ``image_w`` (int64),
    ``grid_size`` (2,) int64 and ``grid_stride`` (2,) float32 rows i, and the dataset
    ``grids/<i>`` (C, H_i, W_i).
    """

    output_name = "grid.h5"
    grid = True
    needs = GRID_NEEDS
    keeps_empty = True

    def write(self, records):
        self.journal.append((r["image_id"], encode_npz(r, GRID_KEYS)) for r in records)

    @classmethod
    def merge(cls, output_dir, world_size):
        import h5py

        target = os.path.join(output_dir, cls.output_name)
        tmp = target + ".tmp"
        rows = {key: [] for key in GRID_KEYS if key != "grid"}
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = cls.version
            grids = f.create_group("grids")
            for i, record in enumerate(cls.journaled(output_dir, world_size)):
                grids.create_dataset(str(i), data=record["grid"])
                for key, values in rows.items():
                    values.append(record[key])
            f.create_dataset("image_id", data=rows.pop("image_id"), dtype=h5py.string_dtype())
            for key in ("image_h", "image_w"):
                f.create_dataset(key, data=np.array(rows.pop(key), dtype=np.int64))
            for key, values in rows.items():
                f.create_dataset(key, data=np.array(values).reshape(len(values), 2))
        fsync(tmp)
        os.replace(tmp, target)

    @classmethod
    def read(cls, path):
        """Grid records of the HDF5 file, in file order."""
        import h5py

        with h5py.File(path, "r") as f:
            for i, image_id in enumerate(f["image_id"].asstr()[:]):
                yield {
                    "image_id": image_id,
                    "image_h": int(f["image_h"][i]),
                    "image_w": int(f["image_w"][i]),
                    "grid": f["grids"][str(i)][:],
                    "grid_size": f["grid_size"][i],
                    "grid_stride": f["grid_stride"][i],
                }
