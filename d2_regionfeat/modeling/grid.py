"""
Grid features ("In Defense of Grid Features for VQA", facebookresearch/grid-feats-vqa): a
feature map of the whole image, taken from the same backbone run as the detections.

:func:`attach_grid` installs two forward hooks on a built model: the backbone's records the
chosen map of the batch; the model's then gives every output dict a ``"grid"`` entry (see
:class:`d2_regionfeat.modeling.outputs.GridFields`) cut from that map, so nothing runs the
backbone twice. ``MODEL.META_ARCHITECTURE: "RegionFeatureRCNN"`` attaches it when
``MODEL.REGION_FEATURES.GRID.ENABLED`` is set (and skips the proposals and ROI heads with ``ONLY``).
"""
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import grid_node
from .outputs import GridFields


class GridFeatures:
    """
    The hooks of :func:`attach_grid` and what they share: the map of the last backbone run.

    For image i of a batch, of (h, w) model-input pixels, the grid is the map's first
    ``ceil(h / stride)`` x ``ceil(w / stride)`` cells, the ones that see some of the image;
    the cells of the batch's padding are cut off.
    """

    def __init__(self, model: nn.Module, outputs: GridFields, source: str, res5: Optional[nn.Module]):
        """
        Args:
            model: a built meta-architecture with ``backbone``.
            outputs: what the grid is.
            source: the backbone output the hook records.
            res5: applied to the recorded map (a C4 model's ROI-head res5), or None.
        """
        self.outputs = outputs
        self.source = source
        self.res5 = res5
        self._map = None
        model.backbone.register_forward_hook(self._record)
        model.register_forward_hook(self._attach)

    def _record(self, backbone, args, features: Dict[str, torch.Tensor]):
        if not backbone.training:
            self._map = features[self.source]

    def _attach(self, model, args, results):
        grid_map, self._map = self._map, None
        if model.training or grid_map is None:
            return
        if self.res5 is not None:
            grid_map = self.res5(grid_map)
        for i, (x, result) in enumerate(zip(args[0], results)):
            result["grid"] = self.image_grid(grid_map[i], x["image"].shape[-2:])

    def image_grid(self, grid_map: torch.Tensor, image_size) -> dict:
        """
        Args:
            grid_map: (C, Hb, Wb) an image's slice of the batch's map.
            image_size: (h, w) model-input pixels of the image.

        Returns:
            dict: ``features`` (C, H, W), ``image_size`` (h, w), ``stride`` (sy, sx).
        """
        h, w = int(image_size[0]), int(image_size[1])
        stride = self.outputs.stride
        rows = min(math.ceil(h / stride), grid_map.shape[-2])
        cols = min(math.ceil(w / stride), grid_map.shape[-1])
        cells = grid_map[:, :rows, :cols]
        pitch = (float(stride), float(stride))
        if self.outputs.pool is not None:
            cells = F.adaptive_avg_pool2d(cells, self.outputs.pool)
            pitch = (rows * stride / self.outputs.pool[0], cols * stride / self.outputs.pool[1])
        return {"features": cells, "image_size": (h, w), "stride": pitch}


def _res5_stride(res5: nn.Module) -> int:
    return math.prod(block.stride for block in res5)


def grid_args(cfg) -> Optional[dict]:
    """The arguments of :func:`attach_grid` that ``MODEL.REGION_FEATURES.GRID`` sets, or None when off."""
    node = grid_node(cfg)
    if node is None:
        return None
    return {"feature": node.FEATURE, "pool": tuple(node.POOL) or None, "only": node.ONLY}


def attach_grid(
    model: nn.Module, feature: str = "res5", pool: Optional[tuple] = None, only: bool = False
) -> GridFeatures:
    """
    Give ``model`` (a built meta-architecture with ``backbone`` and ``roi_heads``) a grid
    feature in every output dict; sets ``model.grid_fields`` (asked by
    :func:`d2_regionfeat.modeling.outputs.region_fields`).

    Args:
        feature, pool, only: as ``MODEL.REGION_FEATURES.GRID``'s FEATURE, POOL (None: []) and
            ONLY (which the meta-architecture honours: see ``RegionFeatureRCNN``).

    Raises:
        ValueError: ``feature`` names no map of the model (one line).
    """
    shapes = model.backbone.output_shape()
    res5 = getattr(model.roi_heads, "res5", None)
    if feature in shapes:
        source, res5 = feature, None
        channels, stride = shapes[source].channels, shapes[source].stride
    elif feature == "res5" and res5 is not None:
        (source,) = model.roi_heads.in_features
        channels = res5[-1].out_channels
        stride = shapes[source].stride * _res5_stride(res5)
    else:
        raise ValueError(
            f"MODEL.REGION_FEATURES.GRID.FEATURE {feature!r} is not an output of the "
            f"backbone ({', '.join(shapes)}) nor the res5 of a C4 model's ROI heads"
        )
    outputs = GridFields(feature, channels, stride, tuple(pool) if pool else None, only)
    model.grid_fields = outputs
    return GridFeatures(model, outputs, source, res5)
