"""
A synthetic instance-segmentation dataset: coloured shapes on textured backgrounds.

Every image holds a few circles, squares, triangles, stars and crosses of varied sizes,
rotations and colours, some overlapping, on a background made of gradients, stripes,
checkers and blotches. Annotations are exact: each object's mask is its visible pixels
(COCO RLE), its box the extent of that mask, its attributes (:data:`ATTRIBUTES`) the name of
the colour it is drawn in and its size, where these are clear (so that they can be checked by
eye: no name for greyish or brownish colours, no size for middle-sized shapes). An image
depends only on (seed, split, index), so a split is the same on every machine; it is written
once (PNG files and an annotation JSON) under a folder the caller chooses and read back from
there afterwards.
"""
import colorsys
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageDraw

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

CLASSES = ("circle", "square", "triangle", "star", "cross")
CLASS_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]
# Attributes, grouped; each object has at most one of each group: a colour name when its
# colour is clearly one (dark, or saturated and bright enough to be named by its hue) and a
# size when it is clearly small or large. ``attribute_ids`` index ATTRIBUTES, the groups' names
# one after the other.
ATTRIBUTE_GROUPS = {
    "colour": ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "black"),
    "size": ("small", "large"),
}
ATTRIBUTES = tuple(name for names in ATTRIBUTE_GROUPS.values() for name in names)
# Colour names of the hues (degrees, HSV): (name, upper end of its sector); red wraps around.
HUE_SECTORS = (("red", 12), ("orange", 42), ("yellow", 70), ("green", 160), ("cyan", 195),
               ("blue", 255), ("purple", 285), ("pink", 335), ("red", 360))
BLACK_VALUE = 0.3  # HSV value below which a colour is black
HUE_MIN_SATURATION, HUE_MIN_VALUE = 0.35, 0.6  # HSV: a colour is named by its hue from these
SMALL_RADIUS, LARGE_RADIUS = 22, 36  # circumradius (pixels): below SMALL small, from LARGE large
# split -> (index mixed into the seed, number of images)
SPLITS = {"train": (0, 2000), "val": (1, 100)}
DATASET_PREFIX = "synthetic_shapes"
# Bump when the drawing or the annotations change, so that cached splits are made anew.
# (2: attributes added; the images and other annotations are those of 1.)
VERSION = 2

IMAGE_SIZE_RANGE = (240, 320)
OBJECTS_RANGE = (2, 6)
RADIUS_RANGE = (12, 48)
MIN_AREA = 150  # pixels of an object inside the image, at least
MAX_OUTSIDE = 0.3  # the part of an object's radius its centre may lie off the image edge
MIN_VISIBLE = 0.6  # an object stays at least this visible when others are drawn over it
MIN_CONTRAST = 90  # L1 distance (over RGB) between an object's colour and the background


def _shape_polygon(name: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple]:
    """Vertices (x, y) of shape ``name`` of circumradius ``r`` centred at (cx, cy)."""
    if name == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        radii = np.full_like(t, r)
    elif name == "square":
        t = np.arange(4) * np.pi / 2 + np.pi / 4
        radii = np.full_like(t, r)
    elif name == "triangle":
        t = np.arange(3) * 2 * np.pi / 3
        radii = np.full_like(t, r)
    elif name == "star":
        t = np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    elif name == "cross":
        w = 0.35  # half the arm width, relative to r
        corners = np.array(
            [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
             (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        ) * (r / np.hypot(1, w))
        t = np.arctan2(corners[:, 1], corners[:, 0])
        radii = np.hypot(corners[:, 0], corners[:, 1])
    else:
        raise ValueError(f"Unknown shape {name!r}; expected one of {', '.join(CLASSES)}")
    t = t + angle
    return list(zip(cx + radii * np.cos(t), cy + radii * np.sin(t)))


def color_name(rgb) -> Optional[str]:
    """
    The name (in ``ATTRIBUTE_GROUPS["colour"]``) of an RGB colour with channels in [0, 255]:
    black when dark, else the name of its hue when saturated and bright enough, else None
    (greyish, brownish and olive colours have no name).
    """
    hue, saturation, value = colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=float) / 255))
    if value < BLACK_VALUE:
        return "black"
    if saturation < HUE_MIN_SATURATION or value < HUE_MIN_VALUE:
        return None
    return next(name for name, end in HUE_SECTORS if hue * 360 < end)


def attribute_ids(rgb, radius: float) -> List[int]:
    """Indices into :data:`ATTRIBUTES` of a shape drawn in colour ``rgb`` with ``radius``."""
    color = color_name(rgb)
    ids = [] if color is None else [ATTRIBUTES.index(color)]
    if radius < SMALL_RADIUS:
        ids.append(ATTRIBUTES.index("small"))
    elif radius >= LARGE_RADIUS:
        ids.append(ATTRIBUTES.index("large"))
    return ids


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 in [0, 255]: a base colour with two random texture layers."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.broadcast_to(rng.uniform(30, 225, size=3), (height, width, 3)).copy()
    for _ in range(2):
        kind = rng.integers(4)
        angle = rng.uniform(0, np.pi)
        along = xx * np.cos(angle) + yy * np.sin(angle)
        if kind == 0:  # gradient
            pattern = along / max(height, width) - 0.5
        elif kind == 1:  # stripes
            pattern = 0.5 * np.sin(along * 2 * np.pi / rng.uniform(6, 40))
        elif kind == 2:  # checker
            cell = rng.uniform(8, 40)
            pattern = ((xx // cell + yy // cell) % 2) - 0.5
        else:  # blotches: upsampled coarse noise
            coarse = rng.uniform(-0.5, 0.5, size=(height // 32 + 2, width // 32 + 2))
            pattern = np.asarray(
                Image.fromarray(coarse.astype(np.float32)).resize(
                    (width + 64, height + 64), Image.BICUBIC
                )
            )[32 : 32 + height, 32 : 32 + width]
        image += pattern[..., None] * rng.uniform(-60, 60, size=3)
    image += rng.normal(0, rng.uniform(2, 10), size=image.shape)
    return image.clip(0, 255)


def render_image(seed, height: int = None, width: int = None):
    """
    Draw one image.

    Args:
        seed: anything ``np.random.default_rng`` takes; the image depends on it alone.
        height, width: image size; drawn from ``IMAGE_SIZE_RANGE`` when not given.

    Returns:
        image (ndarray): (H, W, 3) uint8, RGB.
        annotations (list[dict]): per object, back to front: ``category_id`` (index into
            :data:`CLASSES`), ``mask`` ((H, W) bool, its visible pixels) and ``bbox``
            (x0, y0, x1, y1) in pixels, the extent of ``mask`` (x1, y1 exclusive),
            ``color`` (RGB in [0, 255] it is drawn in, before a horizontal shading of at most
            10%), ``radius`` (its circumradius in pixels) and ``attribute_ids`` (indices into
            :data:`ATTRIBUTES` of its colour name and size, see :func:`attribute_ids`).
    """
    for name, size in (("height", height), ("width", width)):
        if size is not None and size < 2 * RADIUS_RANGE[1]:
            raise ValueError(f"{name} must be at least {2 * RADIUS_RANGE[1]} pixels; got {size}")
    rng = np.random.default_rng(seed)
    height = height or int(rng.integers(IMAGE_SIZE_RANGE[0], IMAGE_SIZE_RANGE[1] + 1))
    width = width or int(rng.integers(IMAGE_SIZE_RANGE[0], IMAGE_SIZE_RANGE[1] + 1))
    image = _background(rng, height, width)
    areas, categories, colors, radii = [], [], [], []
    visible = np.zeros((0, height, width), dtype=bool)
    for _ in range(int(rng.integers(OBJECTS_RANGE[0], OBJECTS_RANGE[1] + 1))):
        for _attempt in range(20):
            category = int(rng.integers(len(CLASSES)))
            r = rng.uniform(*RADIUS_RANGE)
            margin = r * (1 - MAX_OUTSIDE)
            cx, cy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
            polygon = _shape_polygon(CLASSES[category], cx, cy, r, rng.uniform(0, 2 * np.pi))
            canvas = Image.new("L", (width, height), 0)
            ImageDraw.Draw(canvas).polygon(polygon, fill=1)
            mask = np.asarray(canvas, dtype=bool)
            if mask.sum() < MIN_AREA:
                continue
            still_visible = visible & ~mask
            if (still_visible.sum(axis=(1, 2)) >= MIN_VISIBLE * np.array(areas)).all():
                break
        else:
            continue
        color = rng.uniform(0, 255, size=3)
        while np.abs(color - image[mask].mean(axis=0)).sum() < MIN_CONTRAST:
            color = rng.uniform(0, 255, size=3)
        shading = 1 + (np.arange(width)[None, :, None] - cx) * rng.uniform(-2e-3, 2e-3)
        image = np.where(mask[..., None], (color * shading).clip(0, 255), image)
        visible = np.concatenate([still_visible, mask[None]])
        areas.append(mask.sum())
        categories.append(category)
        colors.append(color)
        radii.append(r)
    annotations = []
    for category, mask, color, r in zip(categories, visible, colors, radii):
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        annotations.append(
            {
                "category_id": category,
                "mask": mask,
                "bbox": bbox,
                "color": tuple(float(c) for c in color),
                "radius": float(r),
                "attribute_ids": attribute_ids(color, r),
            }
        )
    return image.round().astype(np.uint8), annotations


def image_seed(seed: int, split: str, index: int) -> List[int]:
    """The seed of image ``index`` of ``split``: independent of the split's length."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return [seed, SPLITS[split][0], index]


def _to_record(file_name: str, image_id: int, image: np.ndarray, annotations: List[Dict]):
    """A detectron2 dataset dict (masks as COCO RLE, boxes XYWH_ABS)."""
    objs = []
    for ann in annotations:
        rle = mask_util.encode(np.asfortranarray(ann["mask"].astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        x0, y0, x1, y1 = ann["bbox"]
        objs.append(
            {
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "bbox_mode": BoxMode.XYWH_ABS,
                "segmentation": rle,
                "category_id": ann["category_id"],
                "attribute_ids": ann["attribute_ids"],
                "iscrowd": 0,
            }
        )
    height, width = image.shape[:2]
    return {
        "file_name": file_name,
        "image_id": image_id,
        "height": height,
        "width": width,
        "annotations": objs,
    }


def load_synthetic_shapes(root: str, split: str, num_images: int = None, seed: int = 0):
    """
    The dataset dicts of ``split``, making its images under ``root`` first if they are not
    there yet (``root/<split>_seed<seed>/``: PNG files and ``annotations.json``).

    Args:
        root: cache folder.
        split: "train" or "val".
        num_images: defaults to the split's size in :data:`SPLITS`.
        seed: the dataset's seed.

    Returns:
        list[dict]: in detectron2's standard dataset format; ``segmentation`` is COCO RLE,
        so train with ``INPUT.MASK_FORMAT: "bitmask"``; each annotation also has
        ``attribute_ids`` (list of indices into :data:`ATTRIBUTES`).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    num_images = SPLITS[split][1] if num_images is None else num_images
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1; got {num_images}")
    folder = os.path.join(os.path.expanduser(root), f"{split}_seed{seed}")
    index_file = os.path.join(folder, "annotations.json")
    key = {"version": VERSION, "num_images": num_images}
    if os.path.exists(index_file):
        with open(index_file) as f:
            cached = json.load(f)
        if cached["key"] == key:
            return _with_folder(cached["records"], folder)
    os.makedirs(folder, exist_ok=True)
    records = []
    for index in range(num_images):
        image, annotations = render_image(image_seed(seed, split, index))
        file_name = f"{index:05d}.png"
        Image.fromarray(image).save(os.path.join(folder, file_name))
        records.append(_to_record(file_name, index, image, annotations))
    with open(index_file + ".tmp", "w") as f:
        json.dump({"key": key, "records": records}, f)
    os.replace(index_file + ".tmp", index_file)
    return _with_folder(records, folder)


def _with_folder(records: List[Dict], folder: str) -> List[Dict]:
    """``records`` with file names (stored relative, so the cache can move) under ``folder``."""
    return [dict(r, file_name=os.path.join(folder, r["file_name"])) for r in records]


def register_synthetic_shapes(root: str, seed: int = 0, prefix: str = DATASET_PREFIX):
    """
    Register ``<prefix>_train`` and ``<prefix>_val`` in DatasetCatalog (made lazily, under
    ``root``) and their class names and colours, attribute names (``attribute_classes``) and
    attribute groups (``attribute_groups``: group name -> attribute names) in MetadataCatalog.

    Returns:
        list[str]: the registered dataset names.
    """
    names = []
    for split in SPLITS:
        name = f"{prefix}_{split}"
        DatasetCatalog.register(
            name, lambda split=split: load_synthetic_shapes(root, split, seed=seed)
        )
        MetadataCatalog.get(name).set(
            thing_classes=list(CLASSES),
            thing_colors=list(CLASS_COLORS),
            attribute_classes=list(ATTRIBUTES),
            attribute_groups={group: list(names) for group, names in ATTRIBUTE_GROUPS.items()},
            evaluator_type="coco",
        )
        names.append(name)
    return names
