"""
OpenVQA / MCAN: ``openvqa`` (VQA, ``vqa_loader.py``: ``x`` stored (D, N), the image id
parsed from the file name) and ``openvqa_gqa`` (GQA, ``gqa_loader.py``: ``x`` (N, D),
``width``/``height``). One npz per image, no pickles.
"""
import os

import numpy as np

from .base import PerImageFilesWriter, register_format
from .records import LayoutIdError, encode_npz

_REGION_KEYS = ("objects_id", "objects_conf")


def _read(folder, keys, to_record):
    for key in keys:
        with np.load(os.path.join(folder, key + ".npz")) as npz:
            yield to_record(key, npz)


@register_format("openvqa")
class OpenVqaWriter(PerImageFilesWriter):
    """
    ``<output>/openvqa/<image_id>.npz``: ``x`` (D, N) float32 (transposed: the loader does
    ``x.transpose((1, 0))``), ``bbox`` (N, 4), ``num_bbox``, ``image_h``, ``image_w``,
    ``objects_id``, ``objects_conf``. The loader takes the image id as
    ``int(name.split('_')[-1].split('.')[0])``: COCO file stems
    (``COCO_val2014_000000000042``) or integer ids both work.
    """

    output_name = "openvqa"
    flat = True

    @classmethod
    def key(cls, image_id):
        key = super().key(image_id)
        try:
            int(key.split("_")[-1].split(".")[0])
        except ValueError:
            raise LayoutIdError(
                f"OpenVQA parses the image id as int(name.split('_')[-1]), which fails on {key!r} "
                "(use --id int)"
            )
        return key

    def files(self, record):
        arrays = {
            "x": np.asarray(record["x"], np.float32).T,
            "bbox": record["bbox"],
            "num_bbox": record["num_bbox"],
            "image_h": record["image_h"],
            "image_w": record["image_w"],
        }
        arrays.update({k: record[k] for k in _REGION_KEYS})
        return [encode_npz(arrays, keys=tuple(arrays))]

    @classmethod
    def read(cls, path):
        def to_record(key, npz):
            record = {k: npz[k] for k in ("bbox",) + _REGION_KEYS}
            record.update(image_id=key, x=npz["x"].T, num_bbox=int(npz["num_bbox"]),
                          image_h=int(npz["image_h"]), image_w=int(npz["image_w"]))
            return record

        return _read(path, cls.keys_in(path), to_record)


@register_format("openvqa_gqa")
class OpenVqaGqaWriter(PerImageFilesWriter):
    """
    ``<output>/openvqa_gqa/<image_id>.npz``: ``x`` (N, D) float32, ``bbox`` (N, 4),
    ``width``, ``height``, ``num_bbox``, ``objects_id``, ``objects_conf``.
    """

    output_name = "openvqa_gqa"
    flat = True

    def files(self, record):
        arrays = {
            "x": np.asarray(record["x"], np.float32),
            "bbox": record["bbox"],
            "num_bbox": record["num_bbox"],
            "width": record["image_w"],
            "height": record["image_h"],
        }
        arrays.update({k: record[k] for k in _REGION_KEYS})
        return [encode_npz(arrays, keys=tuple(arrays))]

    @classmethod
    def read(cls, path):
        def to_record(key, npz):
            record = {k: npz[k] for k in ("x", "bbox") + _REGION_KEYS}
            record.update(image_id=key, num_bbox=int(npz["num_bbox"]),
                          image_h=int(npz["height"]), image_w=int(npz["width"]))
            return record

        return _read(path, cls.keys_in(path), to_record)
