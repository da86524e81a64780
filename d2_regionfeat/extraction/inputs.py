"""
What to extract from: listing the images of a source, decoding them robustly, and the
:class:`ImageDataset` that decodes and resizes them in DataLoader workers.

A source (``--input``) is one of

* a folder: every image below it (recursively, by extension), ids are paths relative to the
  folder without extension (``"sub/img"``);
* a COCO-format json: its ``images`` (``id``, ``file_name``), ids are the COCO ids as strings,
  files relative to ``image_root`` (default: the json's folder);
* a glob (``"data/**/*.jpg"``): ids are paths relative to the glob's fixed prefix folder,
  without extension;
* a text file of paths, one a line (relative to the text file's folder): ids are the file
  names without extension; a single image file likewise;
* the name of a dataset registered in detectron2's ``DatasetCatalog``: its dicts'
  ``image_id`` (or the file stem) and ``file_name``.

``id_mode`` makes every kind give the same kind of id: ``"stem"``, the file name without
extension (for folders and globs, the path relative to their root); ``"int"``, the COCO json's
or dataset's integer id, else the digits that end the file stem
(``COCO_val2014_000000000042`` -> ``"42"``). Two images with the same id are an error.
"""
import glob
import json
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import _apply_exif_orientation, convert_PIL_to_numpy

from ..formats.records import LayoutIdError, int_id

ID_MODES = ("stem", "int")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class InputError(ValueError):
    """A source that cannot be listed (missing path, malformed json, unknown dataset)."""


@dataclass(frozen=True)
class ImageItem:
    """One image to extract: its id in the outputs, its file, and why it is skipped if so."""

    image_id: str
    path: str
    error: Optional[str] = None


def _relative_id(path, root):
    return os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "/")


def _folder_items(folder):
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        paths += [
            os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return [ImageItem(_relative_id(p, folder), p) for p in sorted(paths)]


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _coco_items(json_file, image_root, id_mode):
    try:
        with open(json_file) as f:
            images = json.load(f)["images"]
        return [
            ImageItem(
                _stem(im["file_name"]) if id_mode == "stem" else str(im["id"]),
                os.path.join(image_root, im["file_name"]),
            )
            for im in images
        ]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{json_file} is not a COCO-format json ({type(e).__name__}: {e})")


def _list_file_items(list_file):
    if list_file.lower().endswith(IMAGE_EXTENSIONS):
        paths = [list_file]
    else:
        root = os.path.dirname(os.path.abspath(list_file))
        try:
            with open(list_file, encoding="utf-8") as f:
                paths = [os.path.join(root, line.strip()) for line in f if line.strip()]
        except UnicodeDecodeError:
            raise InputError(f"{list_file} is neither an image nor a text file of image paths")
    return [ImageItem(_stem(p), p) for p in paths]


def _glob_items(pattern):
    magic = min(i for i, c in enumerate(pattern) if c in "*?[")
    root = os.path.dirname(pattern[:magic]) or "."
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    return [ImageItem(_relative_id(p, root), p) for p in paths]


def _dataset_items(name, id_mode):
    items = []
    for d in DatasetCatalog.get(name):
        stem = _stem(d["file_name"])
        image_id = stem if id_mode == "stem" else d.get("image_id", stem)
        items.append(ImageItem(str(image_id), d["file_name"]))
    return items


def _int_ids(items):
    """``items`` with their ids made integers (as text), see :func:`records.int_id`."""
    out = []
    for item in items:
        try:
            out.append(ImageItem(str(int_id(item.image_id)), item.path, item.error))
        except LayoutIdError as e:
            raise InputError(f"--id int: {item.path}: {e}")
    return out


def _id_error(image_id):
    if not image_id or any(c in image_id for c in "\t\r\n"):
        return "image id is empty or holds a tab or newline"
    if image_id.startswith("/") or ".." in image_id.split("/"):
        return "image id is not a relative path inside the output folder"
    return None


def _check_ids(items):
    """
    ``items`` with an ``error`` on those whose id is unusable.

    Raises:
        InputError: two items have the same id.
    """
    first, out = {}, []
    for item in items:
        if item.image_id in first:
            raise InputError(
                f"two inputs get image id {item.image_id!r}: {first[item.image_id]} and {item.path}"
            )
        first[item.image_id] = item.path
        error = _id_error(item.image_id)
        out.append(ImageItem(item.image_id, item.path, error) if error else item)
    return out


def list_inputs(source: str, image_root: Optional[str] = None, limit: int = 0,
                id_mode: Optional[str] = None) -> List[ImageItem]:
    """
    The images of ``source`` (see the module docstring), in a deterministic order.

    Items whose id cannot name a file carry an ``error`` and are not extracted.

    Args:
        image_root: folder that a COCO json's ``file_name``s are relative to.
        limit: keep only the first ``limit`` items (0: all).
        id_mode: None (the source's own ids), "stem" or "int" (see the module docstring).

    Raises:
        InputError: the source does not exist or cannot be read, an id cannot be made an
            integer (``id_mode="int"``), or two images get the same id.
    """
    if id_mode not in (None,) + ID_MODES:
        raise InputError(f"--id must be one of {', '.join(ID_MODES)}; got {id_mode!r}")
    if os.path.isdir(source):
        items = _folder_items(source)
    elif os.path.isfile(source) and source.lower().endswith(".json"):
        items = _coco_items(source, image_root or os.path.dirname(os.path.abspath(source)), id_mode)
    elif os.path.isfile(source):
        items = _list_file_items(source)
    elif any(c in source for c in "*?["):
        items = _glob_items(source)
    elif source in DatasetCatalog.list():
        try:
            items = _dataset_items(source, id_mode)
        except Exception as e:  # a registered loader is any user function
            raise InputError(f"dataset {source!r} cannot be loaded ({one_line(e)})")
    else:
        raise InputError(f"--input {source!r} is no folder, file, glob or registered dataset")
    if limit > 0:
        items = items[:limit]
    if id_mode == "int":
        items = _int_ids(items)
    return _check_ids(items)


def _to_eight_bit(image):
    """16-bit grayscale (PIL modes I;16*, I) scaled to 8-bit "L" (v // 257); others unchanged."""
    if image.mode not in _SIXTEEN_BIT_MODES:
        return image
    array = np.asarray(image).astype(np.int64) // 257
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")


def decode_image(path, image_format: str) -> np.ndarray:
    """
    Read an image as detectron2's ``read_image`` does (EXIF orientation applied, converted
    to ``image_format``), also accepting 16-bit grayscale (scaled to 8 bits). ``path``: a
    file path, or an open binary file (an image read from a tar shard).

    Returns:
        ndarray: (H, W, C) uint8 in ``image_format`` (e.g. "BGR").

    Raises:
        OSError, ValueError: the file is missing, empty, truncated or not an image.
    """
    if isinstance(path, str) and os.path.getsize(path) == 0:
        raise ValueError("empty file")
    with Image.open(path) as image:
        image.load()
        image = _apply_exif_orientation(image)
        image = _to_eight_bit(image)
        array = convert_PIL_to_numpy(image, image_format)
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"decoded to an array of shape {array.shape}")
    return array


def one_line(error: BaseException) -> str:
    """``"Type: message"`` on a single line."""
    return " ".join(f"{type(error).__name__}: {error}".split())


class ImageDataset(torch.utils.data.Dataset):
    """
    Decodes and resizes images as :class:`detectron2.engine.DefaultPredictor` does, giving
    per item the model input dict ``{"image": (3, h, w) float32, "height": H, "width": W}``
    plus ``"item"`` (its :class:`ImageItem`), or ``{"item", "error"}`` (a one-line reason)
    when it cannot be used.

    Args:
        image_format: the model's ``INPUT.FORMAT``.
        resize: the test transform (:func:`d2_regionfeat.data.build_test_transform`).
    """

    def __init__(self, items: List[ImageItem], image_format: str, resize: T.Augmentation):
        self.items = items
        self.image_format = image_format
        self.resize = resize

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.decode(self.items[index])

    def decode(self, item: ImageItem, image=None):
        """The entry of ``item``, read from ``image`` (an open binary file) or its path."""
        if item.error:
            return {"item": item, "error": item.error}
        try:
            original = decode_image(item.path if image is None else image, self.image_format)
        except Exception as e:  # whatever one file does (PIL raises many types) fails it alone
            return {"item": item, "error": one_line(e)}
        height, width = original.shape[:2]
        resized = self.resize.get_transform(original).apply_image(original)
        image = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        return {"item": item, "image": image, "height": height, "width": width}
