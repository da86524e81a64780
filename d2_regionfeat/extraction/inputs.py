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

A folder and a text file of paths are read lazily (:class:`Inputs`: a stream, read again each
time it is iterated, that holds a line, or the sorted names of one folder per level): a run's
memory does not grow with their number of images. A COCO json, a glob and a dataset are lists (their
json, glob or loader gives them all at once).
"""
import glob
import itertools
import json
import os
from array import array
from dataclasses import dataclass
from typing import Hashable, Iterable, Iterator, List, Optional, Set, Tuple

import numpy as np
import torch
from PIL import Image

from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import _apply_exif_orientation, convert_PIL_to_numpy

from ..formats.records import LayoutIdError, int_id
from .manifest import sha256_lines

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


def _sorted_names(folder):
    """
    The names of the images and folders in ``folder`` that :func:`_folder_items` visits
    (os.walk's rules: links followed, an unreadable folder is empty), a folder's as
    ``name + "/"``, sorted: the order of the sorted paths below them.
    """
    names = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if is_dir:
                    names.append(entry.name + "/")
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    names.append(entry.name)
    except OSError:
        return []
    names.sort()
    return names


def _folder_items(folder):
    """
    The images below ``folder`` in the order of their sorted paths (what sorting the paths of
    the whole tree gives), holding the sorted names of one folder per level at a time.
    """
    stack = [(folder, iter(_sorted_names(folder)))]
    while stack:
        parent, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
        elif name.endswith("/"):
            path = os.path.join(parent, name[:-1])
            stack.append((path, iter(_sorted_names(path))))
        else:
            path = os.path.join(parent, name)
            yield ImageItem(_relative_id(path, folder), path)


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
        yield ImageItem(_stem(list_file), list_file)
        return
    root = os.path.dirname(os.path.abspath(list_file))
    try:
        with open(list_file, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    path = os.path.join(root, line.strip())
                    yield ImageItem(_stem(path), path)
    except UnicodeDecodeError:
        raise InputError(f"{list_file} is neither an image nor a text file of image paths")


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


def _int_id(item):
    """``item`` with its id made an integer (as text), see :func:`records.int_id`."""
    try:
        return ImageItem(str(int_id(item.image_id)), item.path, item.error)
    except LayoutIdError as e:
        raise InputError(f"--id int: {item.path}: {e}")


def _id_error(image_id):
    if not image_id or any(c in image_id for c in "\t\r\n"):
        return "image id is empty or holds a tab or newline"
    if image_id.startswith("/") or ".." in image_id.split("/"):
        return "image id is not a relative path inside the output folder"
    return None


class Repeats:
    """
    Whether a stream of keys holds one twice, at 8 bytes a key: each key's ``hash`` (this
    process's) goes into an array (a set of the keys themselves takes some 100 bytes a short string). Keys with
    the same hash are only candidates: :func:`first_repeat` makes sure of them over the
    stream again (only they are held then)::

        repeats = Repeats()
        for key in stream():
            repeats.add(key)
        repeat = first_repeat(((key, info) for ...), repeats.candidates())
    """

    def __init__(self):
        self.hashes = array("q")

    def add(self, key: Hashable):
        self.hashes.append(hash(key))

    def candidates(self) -> Set[int]:
        """The hashes added more than once (once called, no key may be added)."""
        hashes = np.frombuffer(self.hashes, dtype=np.int64) if self.hashes else np.zeros(0, np.int64)
        hashes.sort()  # in place: the array's own buffer
        return set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())


def first_repeat(pairs: Iterable[Tuple[Hashable, object]], candidates: Set[int]):
    """
    ``(key, first info, info)`` of the first pair whose key an earlier pair has, among those
    whose key's hash is in ``candidates`` (:meth:`Repeats.candidates`); None if none is.
    ``pairs`` is not read at all without candidates.
    """
    if not candidates:
        return None
    first = {}
    for key, info in pairs:
        if hash(key) in candidates:
            if key in first:
                return key, first[key], info
            first[key] = info
    return None


class Inputs:
    """
    The images of ``source`` (see the module docstring), in a deterministic order: an
    iterable read again from its source each time it is iterated (a folder or text file lazily,
    see the module docstring; a folder in the order of its sorted paths), to be
    :meth:`check`-ed once before a run. Items whose id cannot name a file carry an ``error``
    and are not extracted. Each rank of a run reads the source again for its share: it must
    not change while the run goes (a resumed run's listing is checked by its sha256).

    Args:
        image_root: folder that a COCO json's ``file_name``s are relative to.
        limit: keep only the first ``limit`` items (0: all); the source is read no further.
        id_mode: None (the source's own ids), "stem" or "int" (see the module docstring).

    Raises:
        InputError: the source does not exist or cannot be read (a json, glob or dataset:
            here; a folder or text file: when iterated), or an id cannot be made an integer
            (``id_mode="int"``, when iterated).
    """

    def __init__(self, source: str, image_root: Optional[str] = None, limit: int = 0,
                 id_mode: Optional[str] = None):
        if id_mode not in (None,) + ID_MODES:
            raise InputError(f"--id must be one of {', '.join(ID_MODES)}; got {id_mode!r}")
        self.source, self.limit, self.id_mode = source, limit, id_mode
        # the items of a source that comes as a list, else None (read lazily)
        self.listed: Optional[List[ImageItem]] = None
        # :meth:`between`'s reading of the source and its position there (not pickled)
        self._stream: Optional[Iterator[ImageItem]] = None
        self._position = 0
        if os.path.isdir(source) or os.path.isfile(source) and not source.lower().endswith(".json"):
            return
        if os.path.isfile(source):
            self.listed = _coco_items(source, image_root or os.path.dirname(os.path.abspath(source)), id_mode)
        elif any(c in source for c in "*?["):
            self.listed = _glob_items(source)
        elif source in DatasetCatalog.list():
            try:
                self.listed = _dataset_items(source, id_mode)
            except Exception as e:  # a registered loader is any user function
                raise InputError(f"dataset {source!r} cannot be loaded ({one_line(e)})")
        else:
            raise InputError(f"--input {source!r} is no folder, file, glob or registered dataset")

    def _source_items(self) -> Iterator[ImageItem]:
        if self.listed is not None:
            return iter(self.listed)
        if os.path.isdir(self.source):
            return _folder_items(self.source)
        return _list_file_items(self.source)

    def __iter__(self) -> Iterator[ImageItem]:
        items = self._source_items()
        if self.limit > 0:
            items = itertools.islice(items, self.limit)
        for item in items:
            if self.id_mode == "int":
                item = _int_id(item)
            error = _id_error(item.image_id)
            yield ImageItem(item.image_id, item.path, error) if error else item

    def between(self, start: int, stop: int) -> Iterator[ImageItem]:
        """
        The items at positions ``start`` to ``stop`` (less one), read on from where the last
        call's items ended when ``start`` is there or later, else from the first: runs of
        items asked for in order (the shards of a ``--shard-size`` run) read the source once.
        """
        if self._stream is None or start < self._position:
            self._stream, self._position = iter(self), 0
        while self._position < stop:
            item = next(self._stream, None)
            if item is None:
                return
            self._position += 1
            if self._position > start:
                yield item

    def __getstate__(self):
        return dict(self.__dict__, _stream=None, _position=0)

    def usable_ids(self) -> Iterable[str]:
        """The ids of the items without an ``error``: an iterable read again each time, as this one."""
        return _UsableIds(self)

    def check(self) -> Tuple[int, str]:
        """
        Read the inputs once (again only if two ids may be the same): their number, and the
        sha256 of their lines ``"<id>\\t<path>"`` joined by newlines (the manifest's
        ``inputs_sha256``). Two images with the same id are found holding 8 bytes an image
        (:class:`Repeats`), not a set of the ids.

        Raises:
            InputError: the source cannot be read, or two images get the same id.
        """
        repeats, count = Repeats(), 0

        def lines():
            nonlocal count
            for item in self:
                repeats.add(item.image_id)
                count += 1
                yield f"{item.image_id}\t{item.path}"

        sha256 = sha256_lines(lines())
        repeat = first_repeat(((i.image_id, i.path) for i in self), repeats.candidates())
        if repeat:
            raise InputError(f"two inputs get image id {repeat[0]!r}: {repeat[1]} and {repeat[2]}")
        return count, sha256


class _UsableIds:
    def __init__(self, inputs: Inputs):
        self.inputs = inputs

    def __iter__(self):
        return (item.image_id for item in self.inputs if not item.error)


def list_inputs(source: str, image_root: Optional[str] = None, limit: int = 0,
                id_mode: Optional[str] = None) -> List[ImageItem]:
    """
    The images of ``source`` as one list (:class:`Inputs`, checked and read whole): for a
    handful of images; a run streams them.

    Raises:
        InputError: see :class:`Inputs` and :meth:`Inputs.check`.
    """
    inputs = Inputs(source, image_root, limit, id_mode)
    inputs.check()
    return list(inputs)


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
        """
        The entry of ``items[index]``, or of ``index`` itself when it is an :class:`ImageItem`
        (a run's batch sampler hands out the items it streams).
        """
        return self.decode(index if isinstance(index, ImageItem) else self.items[index])

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
