"""
``mmf``: MMF's feature folder (``feature_readers.py``). Its info files are pickles by the
reader's design: written only when asked for, never read back here (unpickling runs code).
"""
import numpy as np

from .base import PerImageFilesLayout, register_format
from .records import npy_bytes


@register_format("mmf")
class MmfLayout(PerImageFilesLayout):
    """
    ``<output>/mmf/<image_id>.npy``: features (N, D) float32, and
    ``<output>/mmf/<image_id>_info.npy``: a pickled dict with ``image_id`` (int when the
    id is all digits), ``bbox`` (N, 4), ``num_boxes``, ``objects`` (N,), ``image_width``,
    ``image_height`` and, when the model gives class probabilities, ``cls_prob`` (N, K)
    without the background column. The info file is written first, the features last.
    """

    output_name = "mmf"
    flat = True
    suffixes = ("_info.npy", ".npy")

    def files(self, record):
        key = record["image_id"]
        info = {
            "image_id": int(key) if key.isdigit() else key,
            "bbox": np.asarray(record["bbox"], np.float32),
            "num_boxes": record["num_bbox"],
            "objects": np.asarray(record["objects_id"], np.int64),
            "image_width": record["image_w"],
            "image_height": record["image_h"],
        }
        if "cls_prob" in record:
            info["cls_prob"] = np.asarray(record["cls_prob"][:, :-1], np.float32)
        return [npy_bytes(info, allow_pickle=True), npy_bytes(np.asarray(record["x"], np.float32))]
