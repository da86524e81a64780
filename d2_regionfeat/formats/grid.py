"""
``grid_npz``: our own per-image npz files of grid features, and the grid record (what the
grid layouts are written from and read back into: :data:`.records.GRID_SPEC`).
"""
import os

import numpy as np

from .base import PerImageFilesLayout, register_format
from .records import GRID_KEYS, GRID_SPEC, encode_npz, from_npz, image_record

GRID_NEEDS = {"grid": "the grid: MODEL.REGION_FEATURES.GRID.ENABLED True (see configs/grid/)"}


def grid_record(image_id: str, height: int, width: int, grid: dict, fp16: bool = False) -> dict:
    """The grid record of an image from its output dict's ``"grid"`` entry."""
    record = image_record(image_id, height, width)
    for key in GRID_SPEC:
        if key.source is not None:
            value = grid[key.source]
            if hasattr(value, "detach"):  # a tensor; bfloat16 (--amp) has no numpy type
                value = value.detach().float().cpu().numpy()
            record[key.name] = np.asarray(value).astype(key.numpy_dtype(fp16))
    return record


@register_format("grid_npz")
class GridNpzLayout(PerImageFilesLayout):
    """
    ``<output>/grid_npz/<image_id>.npz``, one file per image with the grid record's keys,
    uncompressed, no pickles (``np.load`` reads it with its default ``allow_pickle=False``).
    """

    output_name = "grid_npz"
    grid = True
    needs = GRID_NEEDS
    keeps_empty = True

    def files(self, record):
        return [encode_npz(record, GRID_KEYS)]

    @classmethod
    def read(cls, path):
        """Grid records of a folder of ``<image_id>.npz`` files, in order of image id."""
        for key in cls.keys_in(path):
            with np.load(os.path.join(path, key + ".npz")) as npz:
                yield from_npz(npz)
