"""
``grid_mmf``: the per-image ``.npy`` files that mmf's ``CHWFeatureReader`` takes (its
``FeatureReader`` with ``depth_first: true`` on a 4-d array): (1, C, H, W), which it pads
with zeros to (C, P, P), P = ceil(sqrt(max_features)); so every image's H and W must be at
most P (pool the grid, ``MODEL.REGION_FEATURES.GRID.POOL``, for a fixed size).
"""
import os

import numpy as np

from .base import PerImageFilesLayout, register_format
from .grid import GRID_NEEDS
from .records import npy_bytes


@register_format("grid_mmf")
class GridMmfLayout(PerImageFilesLayout):
    """``<output>/grid_mmf/<image_id>.npy``: (1, C, H, W) float32 (float16 with ``--fp16``), no pickle."""

    output_name = "grid_mmf"
    grid = True
    needs = GRID_NEEDS
    suffixes = (".npy",)
    keeps_empty = True  # every image has a grid

    def files(self, record):
        return [npy_bytes(np.asarray(record["grid"])[None])]

    @classmethod
    def read(cls, path):
        """Records (``image_id``, ``grid`` (C, H, W)), in order of image id."""
        for key in cls.keys_in(path):
            yield {"image_id": key, "grid": np.load(os.path.join(path, key + ".npy"))[0]}
