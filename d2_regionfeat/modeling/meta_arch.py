"""A GeneralizedRCNN whose box predictor knows each image's original size at inference."""
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
