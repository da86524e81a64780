"""
The per-image record that every layout is written from and read back into.

A record is a dict (N regions, D feature size, K classes, A attributes):

=================  =======================  ===============================================
key                value                    meaning
=================  =======================  ===============================================
``image_id``       str                      the image's id (see :mod:`d2_regionfeat.extraction.inputs`)
``image_h``        int                      original image height (after EXIF orientation)
``image_w``        int                      original image width
``num_bbox``       int                      N
``x``              (N, D) float32/float16   region features (float16 with ``--fp16``)
``bbox``           (N, 4) float32           x1, y1, x2, y2 in original image pixels
``objects_id``     (N,) int64               predicted class (0-based, background excluded)
``objects_conf``   (N,) float32             its score
``cls_prob``       (N, K+1) float32         class probabilities, background last; only when
                                            the model gives them (region_outputs(model)
                                            .class_probs: every selection but
                                            "detections", which needs CLASS_PROBS)
``attrs_id``       (N,) int64               best attribute (0-based); only with the
                                            attribute head
``attrs_conf``     (N,) float32             its probability; only with the attribute head
``attr_prob``      (N, A+1) float32         attribute probabilities, "no attribute" last;
                                            only with the attribute head
``attr_labels``    (N, L) int64             VinVL's attribute head (KIND "vinvl"): attribute
                                            ids (0-based), descending, padded with -1
``attr_scores``    (N, L) float32           their probabilities, padded with 0
=================  =======================  ===============================================

Layouts of other codebases hold only part of it; what they read back is a record with the
keys they hold.
"""
import base64
import io
import re
import zipfile
from typing import Dict

import numpy as np

# Record keys, in the order npz files (and lmdb values) store them when present: the
# per-image scalars first, then the per-region arrays.
RECORD_KEYS = (
    "image_id", "image_h", "image_w", "num_bbox", "x", "bbox",
    "objects_id", "objects_conf", "cls_prob", "attrs_id", "attrs_conf", "attr_prob",
    "attr_labels", "attr_scores",
)
PER_IMAGE_KEYS = RECORD_KEYS[:4]
PER_REGION_KEYS = RECORD_KEYS[4:]
SCALAR_KEYS = ("image_h", "image_w", "num_bbox")
# A fixed timestamp makes the same record always encode to the same bytes.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_TRAILING_DIGITS = re.compile(r"(\d+)$")


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


def encode_npz(record: Dict, keys=RECORD_KEYS) -> bytes:
    """
    The bytes of an (uncompressed) ``.npz`` file holding ``record``'s ``keys``: what
    ``np.savez`` writes, but without pickles and byte-for-byte reproducible.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for key in keys:
            if key not in record:
                continue
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_DATE)
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(record[key]), allow_pickle=False)
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
