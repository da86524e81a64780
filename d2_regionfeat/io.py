"""
Reading the feature files that ``tools/extract_net.py`` writes: every format yields the same
per-image records.

A record is a dict (N regions, D feature size, K classes):

=================  =======================  ===============================================
key                value                    meaning
=================  =======================  ===============================================
``image_id``       str                      the image's id (see :mod:`d2_regionfeat.inputs`)
``image_h``        int                      original image height (after EXIF orientation)
``image_w``        int                      original image width
``num_bbox``       int                      N
``x``              (N, D) float32/float16   region features (float16 with ``--fp16``)
``bbox``           (N, 4) float32           x1, y1, x2, y2 in original image pixels
``objects_id``     (N,) int64               predicted class (0-based, background excluded)
``objects_conf``   (N,) float32             its score
``cls_prob``       (N, K+1) float32         class probabilities, background last; only when
                                            the model gives them (CLASS_PROBS or "regions")
``attrs_id``       (N,) int64               TSV only: zeros (no attribute head)
``attrs_conf``     (N,) float32             TSV only: zeros
=================  =======================  ===============================================

The npz files and the lmdb values use exactly these keys (``np.load`` works with the default
``allow_pickle=False``); the TSV is the 10-column bottom-up-attention TSV (see
:data:`TSV_FIELDNAMES` and :func:`encode_tsv_line`).
"""
import base64
import io
import json
import os
import zipfile
from typing import Dict, Iterator, Optional

import numpy as np

# Where each format lies in an output folder.
OUTPUT_NAMES = {
    "npz": "npz",
    "tsv": "features.tsv",
    "hdf5": "features.h5",
    "lmdb": "features.lmdb",
}
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"

TSV_FIELDNAMES = [
    "img_id", "img_h", "img_w", "objects_id", "objects_conf",
    "attrs_id", "attrs_conf", "num_boxes", "boxes", "features",
]
# Record keys stored in npz files (and lmdb values), in this order when present.
NPZ_KEYS = (
    "image_id", "image_h", "image_w", "num_bbox", "x", "bbox",
    "objects_id", "objects_conf", "cls_prob",
)
_SCALARS = ("image_h", "image_w", "num_bbox")
# A fixed timestamp makes the same record always encode to the same bytes.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def encode_npz(record: Dict) -> bytes:
    """
    The bytes of an (uncompressed) ``.npz`` file holding ``record``'s :data:`NPZ_KEYS`:
    what ``np.savez`` writes, but without pickles and byte-for-byte reproducible.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for key in NPZ_KEYS:
            if key not in record:
                continue
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_DATE)
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(record[key]), allow_pickle=False)
    return buffer.getvalue()


def _from_npz(npz) -> Dict:
    record = {key: npz[key] for key in npz.files}
    record["image_id"] = str(record["image_id"])
    for key in _SCALARS:
        record[key] = int(record[key])
    return record


def decode_npz(data: bytes) -> Dict:
    """The record in npz bytes (as :func:`encode_npz` makes)."""
    with np.load(io.BytesIO(data)) as npz:
        return _from_npz(npz)


def _b64(array, dtype) -> bytes:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).data)


def encode_tsv_line(record: Dict) -> bytes:
    """
    One line (with its newline, UTF-8) of the bottom-up-attention TSV, columns
    :data:`TSV_FIELDNAMES`: ``img_id`` (str), ``img_h``, ``img_w``, ``num_boxes`` (decimal
    ints), and base64 of the raw bytes of ``objects_id`` (int64), ``objects_conf`` (float32),
    ``attrs_id`` (int64, zeros), ``attrs_conf`` (float32, zeros), ``boxes`` (float32, N x 4)
    and ``features`` (float32, N x D, whatever the stored precision elsewhere).
    """
    n = record["num_bbox"]
    columns = [
        record["image_id"].encode("utf-8"),
        b"%d" % record["image_h"],
        b"%d" % record["image_w"],
        _b64(record["objects_id"], np.int64),
        _b64(record["objects_conf"], np.float32),
        _b64(np.zeros(n), np.int64),
        _b64(np.zeros(n), np.float32),
        b"%d" % n,
        _b64(record["bbox"], np.float32),
        _b64(record["x"], np.float32),
    ]
    return b"\t".join(columns) + b"\n"


def decode_tsv_line(line: str) -> Dict:
    """The record in one TSV line (with ``attrs_id``/``attrs_conf``, without ``cls_prob``)."""
    row = dict(zip(TSV_FIELDNAMES, line.rstrip("\n").split("\t")))
    n = int(row["num_boxes"])

    def array(column, dtype, width=None):
        values = np.frombuffer(base64.b64decode(row[column]), dtype=dtype)
        if width is None:
            return values
        return values.reshape(n, width if n == 0 else -1)

    return {
        "image_id": row["img_id"],
        "image_h": int(row["img_h"]),
        "image_w": int(row["img_w"]),
        "num_bbox": n,
        "x": array("features", np.float32, 0),
        "bbox": array("boxes", np.float32, 4),
        "objects_id": array("objects_id", np.int64),
        "objects_conf": array("objects_conf", np.float32),
        "attrs_id": array("attrs_id", np.int64),
        "attrs_conf": array("attrs_conf", np.float32),
    }


def read_npz(folder: str) -> Iterator[Dict]:
    """Records of a folder of ``<image_id>.npz`` files, in order of image id."""
    paths = []
    for dirpath, _, filenames in os.walk(folder):
        paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".npz")]
    for path in sorted(paths, key=lambda p: os.path.relpath(p, folder).replace(os.sep, "/")):
        with np.load(path) as npz:
            yield _from_npz(npz)


def read_tsv(path: str) -> Iterator[Dict]:
    """Records of a TSV file, in file order."""
    with open(path, newline="\n") as f:
        for line in f:
            yield decode_tsv_line(line)


def read_hdf5(path: str) -> Iterator[Dict]:
    """
    Records of an HDF5 file, in file order. Its layout: per image ``image_id`` (str),
    ``image_h``, ``image_w``, ``num_bbox`` (int64) and ``offsets`` (N+1): image i's regions
    are rows ``offsets[i]:offsets[i+1]`` of ``x``, ``bbox``, ``objects_id``,
    ``objects_conf`` and (if present) ``cls_prob``.
    """
    import h5py

    with h5py.File(path, "r") as f:
        offsets = f["offsets"][:]
        per_region = [k for k in NPZ_KEYS[4:] if k in f]
        for i, image_id in enumerate(f["image_id"].asstr()[:]):
            begin, end = int(offsets[i]), int(offsets[i + 1])
            record = {"image_id": image_id}
            record.update({key: int(f[key][i]) for key in _SCALARS})
            record.update({key: f[key][begin:end] for key in per_region})
            yield record


def read_lmdb(path: str) -> Iterator[Dict]:
    """Records of an LMDB environment (key: image id, value: npz bytes), in key order."""
    import lmdb

    env = lmdb.open(path, readonly=True, lock=False, readahead=False)
    try:
        with env.begin(buffers=True) as txn:
            for _, value in txn.cursor():
                yield decode_npz(bytes(value))
    finally:
        env.close()


READERS = {"npz": read_npz, "tsv": read_tsv, "hdf5": read_hdf5, "lmdb": read_lmdb}


def read_features(path: str, fmt: Optional[str] = None) -> Iterator[Dict]:
    """
    Records of a feature file or an output folder of ``tools/extract_net.py``.

    Args:
        path: an output folder (then ``fmt`` says which of its formats), an ``npz`` folder,
            a ``.tsv`` file, an ``.h5``/``.hdf5`` file or an LMDB folder.
        fmt: one of :data:`READERS`; guessed from ``path`` when not given.
    """
    if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        if fmt is None:
            with open(os.path.join(path, MANIFEST_NAME)) as f:
                fmt = json.load(f)["formats"][0]
        path = os.path.join(path, OUTPUT_NAMES[fmt])
    elif fmt is None:
        if path.endswith(".tsv"):
            fmt = "tsv"
        elif path.endswith((".h5", ".hdf5")):
            fmt = "hdf5"
        elif os.path.isfile(os.path.join(path, "data.mdb")):
            fmt = "lmdb"
        else:
            fmt = "npz"
    return READERS[fmt](path)
