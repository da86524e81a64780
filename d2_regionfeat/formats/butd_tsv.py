"""
``butd_tsv``: the original 6-column TSV of peteanderson80/bottom-up-attention
(``tools/read_tsv.py``) and its converters, with integer ids. It holds no image without
regions (the readers' reshape fails on them).
"""
import numpy as np

from .base import LineLayout, register_format
from .records import b64, unb64
from .tsv import read_lines, rows

BUTD_FIELDNAMES = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]


@register_format("butd_tsv")
class ButdTsvLayout(LineLayout):
    """
    ``<output>/features_butd.tsv``: ``image_id`` (int), ``image_w``, ``image_h``,
    ``num_boxes``, then base64 of ``boxes`` (float32 N x 4) and ``features`` (float32 N x D).
    """

    output_name = "features_butd.tsv"
    int_ids = True

    def line(self, record):
        columns = [
            record["image_id"].encode("utf-8"),
            b"%d" % record["image_w"],
            b"%d" % record["image_h"],
            b"%d" % record["num_bbox"],
            b64(record["bbox"], np.float32),
            b64(record["x"], np.float32),
        ]
        return b"\t".join(columns) + b"\n"

    @staticmethod
    def decode(line):
        row = dict(zip(BUTD_FIELDNAMES, line.rstrip("\n").split("\t")))
        n = int(row["num_boxes"])
        return {
            "image_id": row["image_id"],
            "image_h": int(row["image_h"]),
            "image_w": int(row["image_w"]),
            "num_bbox": n,
            "x": rows(n, unb64(row["features"], np.float32)),
            "bbox": unb64(row["boxes"], np.float32).reshape(n, 4),
        }

    @classmethod
    def read(cls, path):
        return read_lines(path, cls.decode)
