"""
``buta``: the npz files of MILVLG/bottom-up-attention.pytorch's ``save_roi_features`` (caffe
mode), read as they are by the code written for its features (``np.load(...,
allow_pickle=True)``, ``f["x"]``, ``f["info"].item()["objects_id"]``). Its ``info`` is a
pickled dict by that code's design: written, never read back here.
"""
import os

import numpy as np

from .base import PerImageFilesLayout, register_format
from .records import RECORD_KEYS, encode_npz, from_npz

# what its files hold beside info, in its order; then info's arrays again, flat
_ARRAYS = ("x", "bbox", "num_bbox", "image_h", "image_w")
_INFO_ARRAYS = ("objects_id", "objects_conf", "attrs_id", "attrs_conf")


@register_format("buta")
class ButaLayout(PerImageFilesLayout):
    """
    ``<output>/buta/<image_id>.npz``: ``x`` (N, D) float32, ``bbox`` (N, 4) x1 y1 x2 y2 in
    original pixels, ``num_bbox``, ``image_h``, ``image_w`` and ``info``, a pickled dict of
    ``image_id``, ``image_h``, ``image_w``, ``num_boxes``, ``objects_id`` (N,) int64,
    ``objects_conf`` (N,) float32 and, with the BUTD attribute head, ``attrs_id`` /
    ``attrs_conf``. The same arrays of ``info`` are also stored flat (``objects_id``, ...),
    which ``np.load`` reads without unpickling, and from which :meth:`read` rebuilds records.
    """

    output_name = "buta"
    flat = True

    def files(self, record):
        present = [k for k in _INFO_ARRAYS if k in record]
        info = {"image_id": record["image_id"], "image_h": record["image_h"], "image_w": record["image_w"],
                "num_boxes": record["num_bbox"]}
        info.update({k: np.asarray(record[k]) for k in present})
        arrays = dict(record, x=np.asarray(record["x"], np.float32))
        return [encode_npz(arrays, keys=_ARRAYS + tuple(present), pickled={"info": info})]

    @classmethod
    def read(cls, path):
        """Records of a folder of its npz files, in order of image id; ``info`` not read."""
        keys = [k for k in RECORD_KEYS if k != "image_id"]
        for key in cls.keys_in(path):
            with np.load(os.path.join(path, key + ".npz")) as npz:
                yield dict(from_npz(npz, keys), image_id=key)
