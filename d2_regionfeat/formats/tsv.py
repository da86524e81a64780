"""
``tsv``: the 10-column bottom-up-attention TSV of LXMERT (``src/utils.py`` ``load_obj_tsv``).
It holds no image without regions: the reader's ``reshape((num_boxes, -1))`` fails on them.
"""
import numpy as np

from .base import LineLayout, register_format
from .records import b64, unb64

TSV_FIELDNAMES = [
    "img_id", "img_h", "img_w", "objects_id", "objects_conf",
    "attrs_id", "attrs_conf", "num_boxes", "boxes", "features",
]


def encode_tsv_line(record) -> bytes:
    """
    One line (with its newline, UTF-8) of the 10-column TSV, columns
    :data:`TSV_FIELDNAMES`: ``img_id`` (str), ``img_h``, ``img_w``, ``num_boxes`` (decimal
    ints), and base64 of the raw bytes of ``objects_id`` (int64), ``objects_conf`` (float32),
    ``attrs_id`` (int64) and ``attrs_conf`` (float32) (zeros without the attribute head),
    ``boxes`` (float32, N x 4) and ``features`` (float32, N x D, whatever the stored
    precision elsewhere).
    """
    n = record["num_bbox"]
    columns = [
        record["image_id"].encode("utf-8"),
        b"%d" % record["image_h"],
        b"%d" % record["image_w"],
        b64(record["objects_id"], np.int64),
        b64(record["objects_conf"], np.float32),
        b64(record.get("attrs_id", np.zeros(n)), np.int64),
        b64(record.get("attrs_conf", np.zeros(n)), np.float32),
        b"%d" % n,
        b64(record["bbox"], np.float32),
        b64(record["x"], np.float32),
    ]
    return b"\t".join(columns) + b"\n"


def rows(n, values):
    """``values`` as (n, -1), also for n = 0."""
    return values.reshape(n, -1 if n else 0)


def decode_tsv_line(line: str):
    """The record in one 10-column TSV line (``attrs_id``/``attrs_conf``, no ``cls_prob``)."""
    row = dict(zip(TSV_FIELDNAMES, line.rstrip("\n").split("\t")))
    n = int(row["num_boxes"])
    return {
        "image_id": row["img_id"],
        "image_h": int(row["img_h"]),
        "image_w": int(row["img_w"]),
        "num_bbox": n,
        "x": rows(n, unb64(row["features"], np.float32)),
        "bbox": unb64(row["boxes"], np.float32).reshape(n, 4),
        "objects_id": unb64(row["objects_id"], np.int64),
        "objects_conf": unb64(row["objects_conf"], np.float32),
        "attrs_id": unb64(row["attrs_id"], np.int64),
        "attrs_conf": unb64(row["attrs_conf"], np.float32),
    }


def read_lines(path, decode):
    """``decode`` of each line of a text file."""
    with open(path, newline="\n") as f:
        for line in f:
            yield decode(line)


@register_format("tsv")
class TsvLayout(LineLayout):
    """``<output>/features.tsv``: LXMERT's ``load_obj_tsv`` reads it (ids: strings)."""

    output_name = "features.tsv"

    def line(self, record):
        return encode_tsv_line(record)

    @classmethod
    def read(cls, path):
        """Records of the TSV, in file order."""
        return read_lines(path, decode_tsv_line)
