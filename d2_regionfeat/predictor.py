"""Box predictors that keep, for every output region, the feature of the proposal behind it."""
from typing import List

import torch

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Instances
from detectron2.utils.registry import Registry

from .config import region_features_node
from .selection import select_detections, select_regions

ROI_BOX_PREDICTOR_REGISTRY = Registry("ROI_BOX_PREDICTOR")
ROI_BOX_PREDICTOR_REGISTRY.__doc__ = """
Registry for the box predictors of d2_regionfeat's ROI heads, chosen by
``cfg.MODEL.REGION_FEATURES.PREDICTOR``. A registered class is called with
``(cfg, input_shape, **overrides)`` and must offer the interface of
:class:`FeatureFastRCNNOutputLayers` (``forward`` returning :class:`RegionPredictions`,
and ``select``), with the parameters of :class:`FastRCNNOutputLayers`.
"""


def build_box_predictor(cfg, input_shape, **overrides):
    """Build the predictor named by ``cfg.MODEL.REGION_FEATURES.PREDICTOR``."""
    name = region_features_node(cfg).PREDICTOR
    return ROI_BOX_PREDICTOR_REGISTRY.get(name)(cfg, input_shape, **overrides)


def feature_predictor_like(cfg, stock):
    """
    The registered predictor standing in for ``stock`` (a :class:`FastRCNNOutputLayers`):
    same input size, box transform and weights, built without drawing from the CPU random
    generator, so a model built from one seed has the weights of the plain model from it.
    """
    with torch.random.fork_rng(devices=[]):
        predictor = build_box_predictor(
            cfg,
            ShapeSpec(channels=stock.cls_score.in_features),
            box2box_transform=stock.box2box_transform,
        )
    predictor.load_state_dict(stock.state_dict())
    return predictor


class RegionPredictions(tuple):
    """
    ``(scores, proposal_deltas)`` exactly as :meth:`FastRCNNOutputLayers.forward` returns
    them (so every consumer that unpacks two values works unchanged), plus ``features``:
    the (R, D) predictor input, one row per proposal of the batch.
    """

    def __new__(cls, scores, proposal_deltas, features):
        self = super().__new__(cls, (scores, proposal_deltas))
        self.features = features
        return self


@ROI_BOX_PREDICTOR_REGISTRY.register()
class FeatureFastRCNNOutputLayers(FastRCNNOutputLayers):
    """
    :class:`FastRCNNOutputLayers` whose inference also returns, for every output region,
    ``box_features`` (its proposal's predictor input, (D,)), ``proposal_index`` (that
    proposal's row among the image's proposals) and optionally ``class_probs`` ((K+1,)).

    Parameters and losses are those of :class:`FastRCNNOutputLayers`.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        selection: str = "detections",
        class_probs: bool = False,
        conf_thresh: float = 0.2,
        min_boxes: int = 10,
        max_boxes: int = 100,
        region_box: str = "proposal",
        min_regions: int = 0,
        **kwargs,
    ):
        """
        Args:
            selection: "detections" (detectron2's post-processing) or "regions" (one region
                per proposal, bottom-up-attention style; see :func:`select_regions`).
            class_probs: add ``class_probs`` in "detections" mode ("regions" always does).
            conf_thresh, min_boxes, max_boxes, region_box: "regions" mode settings.
            min_regions: at least this many regions per image (see MIN_REGIONS).
            kwargs: arguments of :class:`FastRCNNOutputLayers`.
        """
        super().__init__(input_shape, **kwargs)
        self.selection = selection
        self.class_probs = class_probs or selection == "regions"
        self.conf_thresh = conf_thresh
        self.min_boxes = min_boxes
        self.max_boxes = max_boxes
        self.region_box = region_box
        self.min_regions = min_regions

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        node = region_features_node(cfg)
        ret.update(
            selection=node.SELECTION,
            class_probs=node.CLASS_PROBS,
            conf_thresh=node.CONF_THRESH,
            min_boxes=node.MIN_BOXES,
            max_boxes=node.MAX_BOXES,
            region_box=node.BOX,
            min_regions=node.MIN_REGIONS,
        )
        return ret

    def forward(self, x):
        """
        Args:
            x: (R, D) or (R, C, H, W) per-proposal features.

        Returns:
            RegionPredictions: (scores (R, K+1), proposal_deltas (R, K*4 or 4)) with
            ``features`` (R, D'), ``x`` flattened.
        """
        scores, proposal_deltas = super().forward(x)
        return RegionPredictions(scores, proposal_deltas, torch.flatten(x, start_dim=1))

    def inference(self, predictions: RegionPredictions, proposals: List[Instances]):
        """
        Like :meth:`FastRCNNOutputLayers.inference`: returns ``(instances, kept)``, where
        ``kept[i]`` (Mi,) are rows among image i's proposals; ``instances`` carry the extra
        fields listed in the class docstring.
        """
        boxes = self.predict_boxes(predictions, proposals)
        probs = self.predict_probs(predictions, proposals)
        return self.select(boxes, probs, predictions.features, proposals)

    def select(self, boxes, probs, features, proposals):
        """
        Select the output regions of every image and attach their features.

        Args:
            boxes (list[Tensor]): per image (Ri, K*4) or (Ri, 4) regressed boxes.
            probs (list[Tensor]): per image (Ri, K+1) class probabilities.
            features (Tensor): (sum Ri, D) one feature per proposal, images in order.
            proposals (list[Instances]): per image, with ``proposal_boxes``.

        Returns:
            list[Instances], list[Tensor]: as :meth:`inference`.
        """
        features = features.split([len(p) for p in proposals])
        results, kept_per_image = [], []
        for boxes_i, probs_i, features_i, proposals_i in zip(boxes, probs, features, proposals):
            if self.selection == "regions":
                result, kept = select_regions(
                    boxes_i, probs_i, proposals_i.proposal_boxes, proposals_i.image_size,
                    self.test_nms_thresh, self.conf_thresh, max(self.min_boxes, self.min_regions),
                    max(self.max_boxes, self.min_regions), self.region_box,
                )
            else:
                result, kept = select_detections(
                    boxes_i, probs_i, proposals_i.image_size,
                    self.test_score_thresh, self.test_nms_thresh, self.test_topk_per_image,
                )
                if len(result) < self.min_regions:  # bottom-up-attention's fallback: top-N by score
                    result, kept = select_regions(
                        boxes_i, probs_i, proposals_i.proposal_boxes, proposals_i.image_size,
                        self.test_nms_thresh, float("inf"), self.min_regions, self.min_regions,
                        "regressed",
                    )
            result.box_features = features_i[kept]
            result.proposal_index = kept
            if self.class_probs:
                result.class_probs = probs_i[kept]
            results.append(result)
            kept_per_image.append(kept)
        return results, kept_per_image
