"""
OpenVQA / MCAN: ``openvqa`` (VQA, ``vqa_loader.py``: ``x`` stored (D, N), the image id
parsed from the file name) and ``openvqa_gqa`` (GQA, ``gqa_loader.py``: ``x`` (N, D),
``width``/``height``). One npz per image, no pickles.
"""
import os

import numpy as np

from .base import PerImageFilesLayout, register_format
from .records import LayoutIdError, encode_npz

_REGION_KEYS = ("objects_id", "objects_conf")


@register_format("openvqa")
class OpenVqaLayout(PerImageFilesLayout):
    """
    ``<output>/openvqa/<image_id>.npz``: ``x`` (D, N) float32 (transposed: the loader does
    ``x.transpose((1, 0))``), ``bbox`` (N, 4), ``num_bbox``, ``image_h``, ``image_w``,
    ``objects_id``, ``objects_conf``. The loader takes the image id as
    ``int(name.split('_')[-1].split('.')[0])``: COCO file stems
    (``COCO_val2014_000000000042``) or integer ids both work.
    """

    output_name = "openvqa"
    flat = True
    # the VQA loader parses an int out of the file name; GQA's finds files by name
    parses_int_id = True
    # how the (N, D) features are stored, and the image size: record key -> file key, in
    # the files' order
    transposed = True
    size_keys = {"image_h": "image_h", "image_w": "image_w"}

    @classmethod
    def key(cls, image_id):
        key = super().key(image_id)
        if not cls.parses_int_id:
            return key
        try:
            int(key.split("_")[-1].split(".")[0])
        except ValueError:
            raise LayoutIdError(
                f"OpenVQA parses the image id as int(name.split('_')[-1]), which fails on {key!r} "
                "(use --id int)"
            )
        return key

    def files(self, record):
        x = np.asarray(record["x"], np.float32)
        arrays = {
            "x": x.T if self.transposed else x,
            "bbox": record["bbox"],
            "num_bbox": record["num_bbox"],
        }
        arrays.update({name: record[key] for key, name in self.size_keys.items()})
        arrays.update({k: record[k] for k in _REGION_KEYS})
        return [encode_npz(arrays, keys=tuple(arrays))]

    @classmethod
    def read(cls, path):
        for key in cls.keys_in(path):
            with np.load(os.path.join(path, key + ".npz")) as npz:
                record = {k: npz[k] for k in ("bbox",) + _REGION_KEYS}
                record.update({k: int(npz[name]) for k, name in cls.size_keys.items()})
                record.update(
                    image_id=key, x=npz["x"].T if cls.transposed else npz["x"],
                    num_bbox=int(npz["num_bbox"]),
                )
                yield record


@register_format("openvqa_gqa")
class OpenVqaGqaLayout(OpenVqaLayout):
    """
    ``<output>/openvqa_gqa/<image_id>.npz``: ``x`` (N, D) float32, ``bbox`` (N, 4),
    ``width``, ``height``, ``num_bbox``, ``objects_id``, ``objects_conf``.
    """

    output_name = "openvqa_gqa"
    parses_int_id = False
    transposed = False
    size_keys = {"image_w": "width", "image_h": "height"}
