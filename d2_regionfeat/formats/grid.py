"""
``grid_npz``: our own per-image npz files of grid features, and the grid record.

A grid record (what the grid layouts are written from and read back into) is a dict:

==================  ======================  ==============================================
key                 value                   meaning
==================  ======================  ==============================================
``image_id``        str                     the image's id
``image_h``         int                     original image height
``image_w``         int                     original image width
``grid``            (C, H, W) float32/16    the output dict's ``grid["features"]``
                                            (float16 with ``--fp16``)
``grid_size``       (2,) int64              (h, w): model-input pixels the cells cover
``grid_stride``     (2,) float32            (sy, sx): model-input pixels per cell
==================  ======================  ==============================================
"""
import os

import numpy as np

from .base import PerImageFilesWriter, register_format
from .records import encode_npz, from_npz

GRID_KEYS = ("image_id", "image_h", "image_w", "grid", "grid_size", "grid_stride")
GRID_NEEDS = {"grid": "the grid: MODEL.REGION_FEATURES.GRID.ENABLED True (see configs/grid/)"}


def grid_record(image_id: str, height: int, width: int, grid: dict, fp16: bool = False) -> dict:
    """The grid record of an image from its output dict's ``"grid"`` entry."""
    features = grid["features"].detach().float().cpu().numpy()  # bfloat16 (--amp) has no numpy type
    return {
        "image_id": image_id,
        "image_h": int(height),
        "image_w": int(width),
        "grid": features.astype(np.float16 if fp16 else np.float32),
        "grid_size": np.array(grid["image_size"], dtype=np.int64),
        "grid_stride": np.array(grid["stride"], dtype=np.float32),
    }


@register_format("grid_npz")
class GridNpzWriter(PerImageFilesWriter):
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
