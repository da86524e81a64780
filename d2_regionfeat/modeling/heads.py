"""
ROI heads that return region features with their detections.

Each class subclasses a standard detectron2 head, keeps its parameters (state-dict keys are
identical, so existing checkpoints load) and its training path, and differs at inference
only: every output ``Instances`` gains ``box_features`` (M, D), ``proposal_index`` (M,) and,
when asked, ``class_probs`` (M, K+1); with ``MODEL.ATTRIBUTE_ON`` their box predictor also
has the attribute head (``attr_probs``, ``attrs_id``, ``attrs_conf``; ``loss_attr``).

Under ``torch.autocast`` (``extract_net --amp``) the backbone, RPN and mask/keypoint heads run
in the lower precision, but at inference the box path (pooling, box head, box predictor,
selection), which makes the region features, scores and boxes, runs in float32: in bfloat16,
the box head alone brings the cosine of the shipped model's features to their float32 ones
down to 0.985 (bench/README.md).
"""
from contextlib import contextmanager
from typing import Dict, List

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling.backbone import BottleneckBlock, ResNet
from detectron2.modeling.roi_heads import (
    ROI_HEADS_REGISTRY,
    CascadeROIHeads,
    Res5ROIHeads,
    StandardROIHeads,
)
from detectron2.structures import Boxes, Instances, pairwise_iou

from .attributes import attribute_fields
from .checkpoint import register_checkpoint_conversion
from .config import region_features_node
from .outputs import RegionOutputs
from .predictor import feature_predictor_like
from .vocabulary import register_vocabularies


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no device argument, and a query of its own for CPU
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


@contextmanager
def float32_regions(features: Dict[str, torch.Tensor]):
    """
    Run the block in float32 even under autocast: autocast is off inside, and the feature
    maps given (name -> (N, C, H, W)) are yielded in float32 (the same dict without autocast).
    """
    device = next(iter(features.values())).device.type
    if not _autocast_enabled(device):
        yield features
        return
    with torch.autocast(device, enabled=False):
        yield {name: x.float() for name, x in features.items()}


class RegionFeatureHeadsMixin:
    """
    What the Feature heads share. A head using it provides ``_head`` (pooled (R, C, S, S)
    map to the (R, D) predictor input) and, where detectron2's attribute names differ from
    StandardROIHeads', ``_pool`` (features and boxes to the pooled map) and the
    ``feature_predictor`` property (the predictor whose ``select`` makes the regions).
    """

    @configurable
    def __init__(self, *, region_source: str = "box_head", pool_at: str = "proposal", **kwargs):
        """
        Args:
            region_source: "box_head" (the predictor input) or "pooled" (the ROI-pooled map
                averaged over its cells).
            pool_at: "proposal" (the feature of the proposal behind a region) or "final"
                (pooled again at the region's final box).
            kwargs: arguments of the detectron2 head.
        """
        super().__init__(**kwargs)
        self.region_source = region_source
        self.pool_at = pool_at
        if not hasattr(self.feature_predictor, "select"):
            raise TypeError(
                f"{type(self).__name__} needs a box predictor with a select() method, such as "
                f"FeatureFastRCNNOutputLayers; got {type(self.feature_predictor).__name__}"
            )
        register_checkpoint_conversion(self)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        node = region_features_node(cfg)
        ret.update(region_source=node.SOURCE, pool_at=node.POOL_AT)
        cls._use_feature_predictor(cfg, ret)
        register_vocabularies(cfg)
        return ret

    @classmethod
    def _use_feature_predictor(cls, cfg, ret):
        ret["box_predictor"] = feature_predictor_like(cfg, ret["box_predictor"])

    @property
    def feature_predictor(self):
        return self.box_predictor

    def region_outputs(self) -> RegionOutputs:
        """What every output ``Instances`` carries (see :mod:`d2_regionfeat.modeling.outputs`)."""
        predictor = self.feature_predictor
        return RegionOutputs(
            # "pooled": the channels of the maps pooled, which the first call tells
            feature_dim=predictor.cls_score.in_features if self.region_source == "box_head" else None,
            num_classes=predictor.num_classes,
            class_probs=predictor.class_probs,
            num_attributes=predictor.attr_score.out_features - 1 if predictor.attribute_on else 0,
            selection=predictor.selection,
            **getattr(predictor, "attribute_outputs", {}),
        )

    def _pool(self, features, boxes):
        return self.box_pooler([features[f] for f in self.box_in_features], boxes)

    def region_features(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]):
        """
        Features of arbitrary boxes, as configured by ``region_source``.

        Args:
            features: backbone feature maps by name, each (N, C, H, W).
            boxes: per image, boxes in the coordinates of the network input.

        Returns:
            Tensor: (sum of len(boxes[i]), D), images in order.
        """
        return self._source_features(self._pool(features, boxes))

    def _source_features(self, pooled, head_out=None):
        """Region features from the (R, C, S, S) pooled map, or ``head_out`` if computed."""
        if self.region_source == "pooled":
            return pooled.mean(dim=[2, 3])
        return self._head(pooled) if head_out is None else head_out

    def forward_with_given_boxes(self, features, instances: List[Instances]):
        """
        As in detectron2 (masks, keypoints for the given ``pred_boxes``); given boxes that
        come without region fields (``model.inference(inputs, detected_instances=...)``)
        first get them from the box head and predictor, without the RPN:

        * ``box_features`` (M, D) as configured by ``region_source``;
        * ``class_probs`` (M, K+1) from the predictor (the last stage's for Cascade);
        * ``proposal_index`` (M,): the row among the given boxes;
        * ``pred_classes`` and ``scores``, where missing: the most probable foreground class
          and its probability;
        * with the attribute head: ``attr_probs``, ``attrs_id``, ``attrs_conf``.
        """
        if instances and not instances[0].has("box_features"):
            with float32_regions(features) as float_features:
                self._describe_given_boxes(float_features, instances)
        return super().forward_with_given_boxes(features, instances)

    def _describe_given_boxes(self, features, instances):
        pooled = self._pool(features, [x.pred_boxes for x in instances])
        head_out = self._head(pooled)
        region_features = self._source_features(pooled, head_out)
        predictor = self.feature_predictor
        predictions = predictor(head_out)
        probs = predictor.predict_probs(predictions, instances)
        attr_probs = predictor.predict_attr_probs(predictions)
        sizes = [len(x) for x in instances]
        attr_probs = attr_probs.split(sizes) if attr_probs is not None else [None] * len(sizes)
        for x, feats, probs_i, attr_probs_i in zip(
            instances, region_features.split(sizes), probs, attr_probs
        ):
            x.box_features = feats
            x.class_probs = probs_i
            x.proposal_index = torch.arange(len(x), device=probs_i.device)
            if not x.has("pred_classes"):
                x.scores, x.pred_classes = probs_i[:, :-1].max(dim=1)
            if attr_probs_i is not None:
                for name, value in attribute_fields(attr_probs_i).items():
                    x.set(name, value)

    def _finish_region_features(self, features, proposals, instances):
        """
        Replace the predictor's ``box_features`` where the config asks for other ones.

        Args:
            proposals (list[Instances]): the proposals the predictor saw, per image.
            instances (list[Instances]): its output regions, with ``proposal_index``.
        """
        if self.pool_at == "final":
            boxes = [x.pred_boxes for x in instances]
        elif self.region_source == "pooled":
            boxes = [p.proposal_boxes[x.proposal_index] for p, x in zip(proposals, instances)]
        else:
            return
        region_features = self.region_features(features, boxes)
        for x, feats in zip(instances, region_features.split([len(x) for x in instances])):
            x.box_features = feats


@ROI_HEADS_REGISTRY.register()
class FeatureROIHeads(RegionFeatureHeadsMixin, StandardROIHeads):
    """:class:`StandardROIHeads` (FPN, Keypoint R-CNN, ...) returning region features."""

    def _head(self, pooled):
        return self.box_head(pooled).flatten(1)

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        if self.training:
            return super()._forward_box(features, proposals)
        with float32_regions(features) as features:
            out = super()._forward_box(features, proposals)
            self._finish_region_features(features, proposals, out)
        return out


@ROI_HEADS_REGISTRY.register()
class FeatureRes5ROIHeads(RegionFeatureHeadsMixin, Res5ROIHeads):
    """:class:`Res5ROIHeads` (C4 models) returning region features; "box_head" features are
    the res5 output averaged over its cells (2048-d for ResNet-50/101).

    With ``MODEL.RESNETS.RES5_DILATION: 2``, res5 is bottom-up-attention's: stride 1 in its
    first block (conv1 and shortcut), dilation 2 (padding 2) in every 3x3 conv, so the pooled
    S x S map stays S x S.
    """

    @classmethod
    def _build_res5_block(cls, cfg):
        dilation = cfg.MODEL.RESNETS.RES5_DILATION
        if dilation == 1:
            return super()._build_res5_block(cfg)
        if dilation != 2:
            raise ValueError(
                "MODEL.RESNETS.RES5_DILATION must be 1 or 2 for FeatureRes5ROIHeads; "
                f"got {dilation}"
            )
        stage_channel_factor = 2 ** 3  # res5 is 8x res2
        resnets = cfg.MODEL.RESNETS
        out_channels = resnets.RES2_OUT_CHANNELS * stage_channel_factor
        blocks = ResNet.make_stage(
            BottleneckBlock,
            3,
            stride_per_block=[1, 1, 1],
            in_channels=out_channels // 2,
            bottleneck_channels=resnets.NUM_GROUPS * resnets.WIDTH_PER_GROUP * stage_channel_factor,
            out_channels=out_channels,
            num_groups=resnets.NUM_GROUPS,
            norm=resnets.NORM,
            stride_in_1x1=resnets.STRIDE_IN_1X1,
            dilation=dilation,
        )
        return nn.Sequential(*blocks), out_channels

    def _pool(self, features, boxes):
        return self.pooler([features[f] for f in self.in_features], boxes)

    def _head(self, pooled):
        return self.res5(pooled).mean(dim=[2, 3])

    def forward(self, images, features, proposals, targets=None):
        if self.training:
            return super().forward(images, features, proposals, targets)
        # res5 is the box head (and the mask head's trunk): all of it in float32
        with float32_regions(features) as features:
            instances, losses = super().forward(images, features, proposals, targets)
            self._finish_region_features(features, proposals, instances)
        return instances, losses


@ROI_HEADS_REGISTRY.register()
class FeatureCascadeROIHeads(RegionFeatureHeadsMixin, CascadeROIHeads):
    """:class:`CascadeROIHeads` returning region features: those of the last stage, whose
    proposals are the boxes regressed by the stage before it."""

    @classmethod
    def _use_feature_predictor(cls, cfg, ret):
        ret["box_predictors"][-1] = feature_predictor_like(cfg, ret["box_predictors"][-1])

    @property
    def feature_predictor(self):
        return self.box_predictor[-1]

    def _head(self, pooled):
        return self.box_head[-1](pooled).flatten(1)

    @torch.no_grad()
    def _match_and_label_boxes(self, proposals, stage, targets):
        """
        As in CascadeROIHeads; with the attribute head, the last stage's proposals also get
        ``gt_attributes`` of their matched ground truth (CascadeROIHeads copies only classes
        and boxes).
        """
        proposals = super()._match_and_label_boxes(proposals, stage, targets)
        if stage != self.num_cascade_stages - 1 or not self.feature_predictor.attribute_on:
            return proposals
        for proposals_per_image, targets_per_image in zip(proposals, targets):
            if len(targets_per_image) == 0 or not targets_per_image.has("gt_attributes"):
                continue
            match_quality_matrix = pairwise_iou(
                targets_per_image.gt_boxes, proposals_per_image.proposal_boxes
            )
            matched_idxs, _ = self.proposal_matchers[stage](match_quality_matrix)
            proposals_per_image.gt_attributes = targets_per_image.gt_attributes[matched_idxs]
        return proposals

    def _forward_box(self, features, proposals, targets=None):
        if self.training:
            return super()._forward_box(features, proposals, targets)
        with float32_regions(features) as features:
            return self._inference_box(features, proposals)

    def _inference_box(self, features, proposals):
        # Inference as in CascadeROIHeads (scores averaged over stages, boxes of the last),
        # selecting through the last predictor so that its features come along.
        box_features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in proposals]
        stage_proposals, probs_per_stage = proposals, []
        for stage in range(self.num_cascade_stages):
            if stage > 0:
                stage_proposals = self._create_proposals_from_boxes(boxes, image_sizes)
            predictions = self._run_stage(box_features, stage_proposals, stage)
            predictor = self.box_predictor[stage]
            boxes = predictor.predict_boxes(predictions, stage_proposals)
            probs_per_stage.append(predictor.predict_probs(predictions, stage_proposals))
        probs = [
            sum(list(probs_per_image)) * (1.0 / self.num_cascade_stages)
            for probs_per_image in zip(*probs_per_stage)
        ]
        instances, _ = self.feature_predictor.select(
            boxes, probs, predictions.features, stage_proposals,
            self.feature_predictor.predict_attr_probs(predictions),
        )
        self._finish_region_features(features, stage_proposals, instances)
        return instances
