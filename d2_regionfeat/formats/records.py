"""
The per-image records that every layout is written from and read back into, stated once in
:data:`REGION_SPEC` (regions) and :data:`GRID_SPEC` (the grid): each key, the field of the
model's output it comes from, its dtype, shape and meaning (N regions, D feature size, K
classes, A attributes, L VinVL attributes per region). The key lists that writers, readers,
the model call and the conversion use are derived from them.

Layouts of other codebases hold only part of a record; what they read back is a record with
the keys they hold.
"""
import base64
import io
import re
import zipfile
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class RecordKey:
    """
    One key of a record.

    Attributes:
        name: the key.
        dtype: its numpy dtype ("str" and "int": a Python scalar).
        shape: its shape ("" for a scalar).
        source: what it is made from: a field of the output ``Instances`` (regions), a key of
            the output's ``"grid"`` dict (grid); None for a key of the image.
        when: which models emit it: "always", or a :class:`~d2_regionfeat.modeling.outputs.
            RegionFields` property ("class_probs", "butd_attributes", "vinvl_attributes").
        fp16: stored as float16 with ``--fp16``.
        meaning: what it holds.
    """

    name: str
    dtype: str
    shape: str
    source: Optional[str]
    meaning: str
    when: str = "always"
    fp16: bool = False

    def numpy_dtype(self, fp16: bool = False):
        return np.float16 if fp16 and self.fp16 else np.dtype(self.dtype)


_IMAGE_SPEC = (
    RecordKey("image_id", "str", "", None, "the image's id (see d2_regionfeat.extraction.inputs)"),
    RecordKey("image_h", "int", "", None, "original image height (after EXIF orientation)"),
    RecordKey("image_w", "int", "", None, "original image width"),
)
# Region records, in the order npz files (and lmdb values) store their keys when present:
# the per-image scalars first, then the per-region arrays.
REGION_SPEC: Tuple[RecordKey, ...] = _IMAGE_SPEC + (
    RecordKey("num_bbox", "int", "", None, "N"),
    RecordKey("x", "float32", "(N, D)", "box_features", "region features (float16 with --fp16)", fp16=True),
    RecordKey("bbox", "float32", "(N, 4)", "pred_boxes", "x1, y1, x2, y2 in original image pixels"),
    RecordKey("objects_id", "int64", "(N,)", "pred_classes", "predicted class (0-based, background excluded)"),
    RecordKey("objects_conf", "float32", "(N,)", "scores", "its score"),
    RecordKey("cls_prob", "float32", "(N, K+1)", "class_probs",
              "class probabilities, background last (every selection but detections without CLASS_PROBS)",
              when="class_probs"),
    RecordKey("attrs_id", "int64", "(N,)", "attrs_id", "best attribute (0-based)", when="butd_attributes"),
    RecordKey("attrs_conf", "float32", "(N,)", "attrs_conf", "its probability", when="butd_attributes"),
    RecordKey("attr_prob", "float32", "(N, A+1)", "attr_probs", "attribute probabilities, no attribute last",
              when="butd_attributes"),
    RecordKey("attr_labels", "int64", "(N, L)", "attr_labels",
              "VinVL's attribute head: attribute ids (0-based), descending, padded with -1",
              when="vinvl_attributes"),
    RecordKey("attr_scores", "float32", "(N, L)", "attr_scores", "their probabilities, padded with 0",
              when="vinvl_attributes"),
)
# Grid records: the image's keys, then the output dict's "grid" entry.
GRID_SPEC: Tuple[RecordKey, ...] = _IMAGE_SPEC + (
    RecordKey("grid", "float32", "(C, H, W)", "features", "the grid feature map (float16 with --fp16)", fp16=True),
    RecordKey("grid_size", "int64", "(2,)", "image_size", "(h, w): model-input pixels the cells cover"),
    RecordKey("grid_stride", "float32", "(2,)", "stride", "(sy, sx): model-input pixels per cell"),
)

RECORD_KEYS = tuple(k.name for k in REGION_SPEC)
GRID_KEYS = tuple(k.name for k in GRID_SPEC)
PER_IMAGE_KEYS = tuple(k.name for k in REGION_SPEC if k.shape == "")
PER_REGION_KEYS = tuple(k.name for k in REGION_SPEC if k.shape != "")
SCALAR_KEYS = tuple(k.name for k in REGION_SPEC if k.dtype == "int")
# What every region record holds, and every grid record (besides the image id).
REQUIRED_KEYS = tuple(k.name for k in REGION_SPEC if k.when == "always" and k.name != "image_id")
GRID_REQUIRED_KEYS = GRID_KEYS[1:]
# A fixed timestamp makes the same record always encode to the same bytes.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_TRAILING_DIGITS = re.compile(r"(\d+)$")


def image_record(image_id: str, height: int, width: int) -> Dict:
    """The image's keys of a record (region or grid)."""
    return {"image_id": image_id, "image_h": int(height), "image_w": int(width)}


class LayoutIdError(ValueError):
    """An image id that a layout cannot use (one line)."""


def int_id(image_id: str) -> int:
    """
    The integer id of ``image_id``: the digits that end its last path component
    (``"val/COCO_val2014_000000000042"`` -> 42, ``"42"`` -> 42).

    Raises:
        LayoutIdError: it does not end in digits.
    """
    match = _TRAILING_DIGITS.search(image_id.rsplit("/", 1)[-1])
    if match is None:
        raise LayoutIdError(f"image id {image_id!r} does not end in digits, so it has no integer id")
    return int(match.group(1))


def encode_npz(record: Dict, keys=RECORD_KEYS, pickled: Optional[Dict] = None) -> bytes:
    """
    The bytes of an (uncompressed) ``.npz`` file holding ``record``'s ``keys``: what
    ``np.savez`` writes, but byte-for-byte reproducible and without pickles, except the
    entries of ``pickled`` (name -> object), each stored as ``np.savez`` stores an object (a
    pickled 0-d object array), for the layouts whose readers need one.
    """
    entries = [(key, np.asarray(record[key]), False) for key in keys if key in record]
    entries += [(key, np.array(value, dtype=object), True) for key, value in (pickled or {}).items()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for key, array, allow_pickle in entries:
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_DATE)
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def from_npz(npz, keys=None) -> Dict:
    """
    The record in an open npz of :data:`RECORD_KEYS` (``np.load`` result); only its ``keys``
    that are there, if given (each array read costs).
    """
    record = {key: npz[key] for key in npz.files if keys is None or key in keys}
    if "image_id" in record:
        record["image_id"] = str(record["image_id"])
    for key in SCALAR_KEYS:
        if key in record:
            record[key] = int(record[key])
    return record


def decode_npz(data: bytes, keys=None) -> Dict:
    """The record in npz bytes (as :func:`encode_npz` makes); only ``keys``, if given."""
    with np.load(io.BytesIO(data)) as npz:
        return from_npz(npz, keys)


def npy_bytes(value, allow_pickle=False) -> bytes:
    """The bytes of ``np.save(file, value)``; pickles only with ``allow_pickle``."""
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=allow_pickle)
    return buffer.getvalue()


def b64(array, dtype) -> bytes:
    """Base64 of the raw bytes of ``array`` as C-contiguous ``dtype``."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).data)


def unb64(text, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def spatial6(record: Dict) -> np.ndarray:
    """
    (N, 6) float32: x1/W, y1/H, x2/W, y2/H, (x2-x1)/W, (y2-y1)/H of the record's boxes.
    """
    w, h = float(record["image_w"]), float(record["image_h"])
    box = np.asarray(record["bbox"], dtype=np.float32).reshape(-1, 4)
    scale = np.array([w, h, w, h], dtype=np.float32)
    normalized = box / scale
    size = (box[:, 2:] - box[:, :2]) / scale[:2]
    return np.concatenate([normalized, size], axis=1).astype(np.float32)


def background_first(cls_prob: np.ndarray) -> np.ndarray:
    """(N, K+1) class probabilities with the background column moved from last to first."""
    return np.concatenate([cls_prob[:, -1:], cls_prob[:, :-1]], axis=1)
