"""
A GeneralizedRCNN whose box predictor knows each image's original size at inference, and the
one rule of which settings need it (:func:`check_meta_architecture`): asked by the heads at
build (yacs), by ``enable_region_features`` (which switches a plain ``GeneralizedRCNN``), by
the tools once a LazyConfig's model is built, and by the "butd" selection at run time.
"""
from typing import Optional

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from .grid import attach_grid, grid_args


@META_ARCH_REGISTRY.register()
class RegionFeatureRCNN(GeneralizedRCNN):
    """
    :class:`GeneralizedRCNN` (same parameters, training and outputs) that tells the Feature
    heads' box predictor the original (height, width) of every input image during inference:
    ``MODEL.REGION_FEATURES.SELECTION: "butd"`` runs its NMS in original image pixels, as
    bottom-up-attention's ``generate_tsv.py`` does, where the ``+1`` of its IoU is not
    invariant to the resize.

    With ``MODEL.REGION_FEATURES.GRID.ENABLED`` every output dict also has a ``"grid"`` (see
    :mod:`d2_regionfeat.modeling.grid`); with ``GRID.ONLY`` it has nothing else: inference
    runs the backbone alone.
    """

    @configurable
    def __init__(self, *, grid: Optional[dict] = None, **kwargs):
        """
        Args:
            grid: arguments of :func:`attach_grid`, or None for no grid.
            kwargs: those of :class:`GeneralizedRCNN`.
        """
        super().__init__(**kwargs)
        self.grid_only = bool(grid and grid["only"])
        if grid is not None:
            attach_grid(self, **grid)

    @classmethod
    def from_config(cls, cfg):
        return {**super().from_config(cfg), "grid": grid_args(cfg)}

    def inference(self, batched_inputs, detected_instances=None, do_postprocess=True):
        if self.grid_only:
            self.backbone(self.preprocess_image(batched_inputs).tensor)
            return [{} for _ in batched_inputs]  # the grid hook fills them
        if not hasattr(self.roi_heads, "output_shapes"):  # plain ROI heads (a grid beside detectron2's detections)
            return super().inference(batched_inputs, detected_instances, do_postprocess)
        with self.roi_heads.output_shapes(self.output_shapes(batched_inputs)):
            return super().inference(batched_inputs, detected_instances, do_postprocess)

    def output_shapes(self, batched_inputs):
        """Per input, the (height, width) of the original image that the network input's
        coordinates map onto (what "butd" selection's NMS runs in)."""
        return [
            (x.get("height", x["image"].shape[-2]), x.get("width", x["image"].shape[-1]))
            for x in batched_inputs
        ]


def region_rcnn_setting(selection: str = "detections", grid: bool = False) -> Optional[str]:
    """
    The setting that needs :class:`RegionFeatureRCNN` (as errors name it), or None: "butd"
    selection (its NMS runs in original image pixels) and the grid (attached by it).
    """
    if selection == "butd":
        return 'MODEL.REGION_FEATURES.SELECTION "butd" (its NMS runs in original image pixels)'
    if grid:
        return "MODEL.REGION_FEATURES.GRID.ENABLED"
    return None


def needs_region_rcnn_message(setting: str, got: str) -> str:
    """The one-line error of a meta-architecture that lacks what ``setting`` needs."""
    return (
        f'{setting} needs MODEL.META_ARCHITECTURE "RegionFeatureRCNN" or a subclass (a LazyConfig: '
        f"model._target_ RegionFeatureRCNN; enable_region_features switches a plain GeneralizedRCNN); got {got}"
    )


def check_meta_architecture(meta_arch: type, selection: str = "detections", grid: bool = False):
    """
    Raise ValueError (:func:`needs_region_rcnn_message`) when the class ``meta_arch`` is not a
    :class:`RegionFeatureRCNN` and ``selection`` or ``grid`` need one.
    """
    setting = region_rcnn_setting(selection, grid)
    if setting and not issubclass(meta_arch, RegionFeatureRCNN):
        raise ValueError(needs_region_rcnn_message(setting, meta_arch.__name__))


def check_config_meta_architecture(cfg):
    """:func:`check_meta_architecture` of a yacs config (``MODEL.META_ARCHITECTURE``, registered)."""
    node = cfg.MODEL.REGION_FEATURES
    check_meta_architecture(META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE), node.SELECTION, node.GRID.ENABLED)


def check_built_model(model):
    """:func:`check_meta_architecture` of a built model (its region heads' selection)."""
    selection = getattr(getattr(model, "roi_heads", None), "region_selection", None)
    if selection is not None:
        check_meta_architecture(type(model), selection.selection)
