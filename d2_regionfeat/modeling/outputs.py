"""
What a region-feature model emits: the one statement of it, asked of the built model.

Every consumer (the extraction run, the layouts' checks, the tools, the docs' tables) calls
:func:`region_fields` on a built model instead of working the fields out again from config
keys. The ROI heads answer through their ``region_fields()`` method.
"""
import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from torch import nn


@dataclass(frozen=True)
class GridFields:
    """
    The grid feature every output dict of the model carries under ``"grid"`` (beside
    ``"instances"``, from the same backbone run), when ``MODEL.REGION_FEATURES.GRID.ENABLED``:
    a dict with

    * ``features``: (C, H, W), the map's cells that cover the image (no padding cell), or
      its adaptive average pooling to ``pool``;
    * ``image_size``: (h, w), the model-input pixels of the image the cells cover;
    * ``stride``: (sy, sx), model-input pixels per cell (``stride`` each unpooled; the
      covered cells' extent over ``pool`` pooled).

    Attributes:
        feature: the map: a backbone output name, or "res5" of a C4 model (the ROI head's
            res5 over the whole ``res4`` map).
        channels: C.
        stride: model-input pixels per cell of the unpooled map.
        pool: (h, w) of adaptive average pooling, or None.
        only: grid only (no proposals, no ROI heads run; no ``"instances"``).
    """

    feature: str
    channels: int
    stride: int
    pool: Optional[Tuple[int, int]] = None
    only: bool = False

    def output_fields(self) -> Dict[str, str]:
        """Key of the ``"grid"`` dict -> its shape or type."""
        h, w = ("H", "W") if self.pool is None else self.pool
        return {
            "features": f"({self.channels}, {h}, {w})",
            "image_size": "(h, w)",
            "stride": "(sy, sx)",
        }


@dataclass(frozen=True)
class RegionFields:
    """
    The fields every output ``Instances`` of the model carries at inference (M regions,
    D feature size, K classes, A attributes), beside detectron2's ``pred_boxes``, ``scores``
    and ``pred_classes``.

    Attributes:
        feature_dim: D of ``box_features`` (M, D); None when only the first call tells
            (a ``SOURCE_MODULE`` whose width its type does not state).
        num_classes: K.
        class_probs: whether ``class_probs`` (M, K+1) is there (background last).
        num_attributes: A; 0 when there is no attribute head, else ``attr_probs``
            (M, A+1, "no attribute" last), ``attrs_id`` (M,) and ``attrs_conf`` (M,) are there.
        selection: how the regions were chosen (``MODEL.REGION_FEATURES.SELECTION``).
        attribute_kind: "butd" (the fields above) or "vinvl" (``ROI_ATTRIBUTE_HEAD.KIND``):
            ``attr_labels`` (M, L) attribute ids padded with -1 and ``attr_scores`` (M, L)
            padded with 0 instead, L = ``max_attributes``.
        max_attributes: L, the "vinvl" kind's attributes per region.
        grid: the grid feature beside the instances (:class:`GridFields`), or None.
    """

    feature_dim: Optional[int]
    num_classes: int
    class_probs: bool
    num_attributes: int = 0
    selection: str = "detections"
    attribute_kind: str = "butd"
    max_attributes: int = 16
    grid: Optional[GridFields] = None

    @property
    def attributes(self) -> bool:
        return self.num_attributes > 0

    @property
    def butd_attributes(self) -> bool:
        """``attr_probs``, ``attrs_id`` and ``attrs_conf`` are there."""
        return self.attributes and self.attribute_kind != "vinvl"

    @property
    def vinvl_attributes(self) -> bool:
        """``attr_labels`` and ``attr_scores`` are there."""
        return self.attributes and self.attribute_kind == "vinvl"

    def instance_fields(self) -> Dict[str, str]:
        """Field name -> its shape, of every region field the model adds."""
        d = "D" if self.feature_dim is None else str(self.feature_dim)
        fields = {"box_features": f"(M, {d})", "proposal_index": "(M,)"}
        if self.class_probs:
            fields["class_probs"] = f"(M, {self.num_classes + 1})"
        if self.vinvl_attributes:
            shape = f"(M, {self.max_attributes})"
            fields.update(attr_labels=shape, attr_scores=shape)
        elif self.butd_attributes:
            fields.update(
                attr_probs=f"(M, {self.num_attributes + 1})", attrs_id="(M,)", attrs_conf="(M,)"
            )
        return fields


def region_fields(model: nn.Module) -> RegionFields:
    """
    What ``model`` (a built meta-architecture, or its ROI heads) emits.

    Raises:
        ValueError: the model's ROI heads give no region features (one line).
    """
    heads = getattr(model, "roi_heads", model)
    answer = getattr(heads, "region_fields", None)
    if answer is None:
        raise ValueError(
            f"{type(heads).__name__} gives no region features: build the model from a config "
            "passed through d2_regionfeat.enable_region_features"
        )
    outputs = answer()
    grid = getattr(model, "grid_fields", None)
    return outputs if grid is None else dataclasses.replace(outputs, grid=grid)
