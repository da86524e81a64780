"""
The test transform of a model's input: :func:`build_test_transform`, the one place a path that
feeds a model (extraction, :class:`~d2_regionfeat.modeling.predictor.RegionPredictor`, given
boxes) gets its resize from; :class:`VinVLResize`, maskrcnn-benchmark's resize; and
:class:`AugmentationChain`, a LazyConfig's test augmentations as one.
"""
from PIL import Image

from detectron2.data import transforms as T


def vinvl_resize_shape(height, width, short, max_size):
    """maskrcnn-benchmark's ``Resize.get_size``: (new height, new width), long side truncated."""
    small, large = float(min(height, width)), float(max(height, width))
    if large / small * short > max_size:
        short = int(round(max_size * small / large))
    if min(height, width) == short:
        return height, width
    if width < height:
        return int(short * height / width), short
    return short, int(short * width / height)


class VinVLResize(T.Augmentation):
    """Resize as maskrcnn-benchmark's test transform (see :func:`vinvl_resize_shape`)."""

    def __init__(self, short_edge_length, max_size, interp=Image.BILINEAR):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        new_h, new_w = vinvl_resize_shape(h, w, self.short_edge_length, self.max_size)
        return T.ResizeTransform(h, w, new_h, new_w, self.interp)


class AugmentationChain(T.Augmentation):
    """
    A list of image-only augmentations as one, with ``get_transform(image)`` (which
    :class:`DefaultPredictor` and the runs call; detectron2's ``AugmentationList`` has none):
    each applied to the image the previous one gave.
    """

    def __init__(self, augmentations):
        super().__init__()
        self.augmentations = list(augmentations)

    def get_transform(self, image):
        transforms = []
        for augmentation in self.augmentations:
            transform = augmentation.get_transform(image)
            image = transform.apply_image(image)
            transforms.append(transform)
        return T.TransformList(transforms)


def build_test_transform(cfg) -> T.Augmentation:
    """
    The test resize of ``cfg``, which every path of a model's input uses (runs, the
    predictors, given boxes): ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` with the rule
    ``INPUT.RESIZE_LONG_SIDE``, detectron2's ("round") or VinVL's ("truncate").
    """
    short, max_size = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    rule = cfg.INPUT.RESIZE_LONG_SIDE
    if rule == "round":
        return T.ResizeShortestEdge([short, short], max_size)
    if rule == "truncate":
        return VinVLResize(short, max_size)
    raise ValueError(f'INPUT.RESIZE_LONG_SIDE must be "round" or "truncate"; got {rule!r}')
