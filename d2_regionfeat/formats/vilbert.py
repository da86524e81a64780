"""
``vilbert``: the per-image dicts ViLBERT-multi-task's ``script/convert_to_lmdb.py`` reads.
They are pickles by that script's design: written only when asked for, never read back
here (unpickling runs code).
"""
import numpy as np

from .base import PerImageFilesLayout, register_format
from .records import int_id, npy_bytes


@register_format("vilbert")
class VilbertLayout(PerImageFilesLayout):
    """
    ``<output>/vilbert/<int id>.npy``: a pickled dict per image for ViLBERT's
    ``script/convert_to_lmdb.py``: ``image_id`` (int), ``image_height``, ``image_width``,
    ``num_boxes``, ``bbox`` (N, 4) float32, ``features`` (N, D) float32 (its reader
    assumes D = 2048).
    """

    output_name = "vilbert"
    flat = True
    int_ids = True
    suffixes = (".npy",)

    def files(self, record):
        item = {
            "image_id": int_id(record["image_id"]),
            "image_height": record["image_h"],
            "image_width": record["image_w"],
            "num_boxes": record["num_bbox"],
            "bbox": np.ascontiguousarray(record["bbox"], np.float32),
            "features": np.ascontiguousarray(record["x"], np.float32),
        }
        return [npy_bytes(item, allow_pickle=True)]
