"""
detectron2's three stock ROI heads returning region features, under the names existing
configs and checkpoints use: the region-feature versions
(:func:`~d2_regionfeat.modeling.region_heads.region_feature_heads`) of
:class:`StandardROIHeads`, :class:`Res5ROIHeads` and :class:`CascadeROIHeads`, with what
only they add (bottom-up-attention's dilated res5, the cascade's attribute targets).

Each keeps its base's parameters (state-dict keys are identical, so existing checkpoints
load) and its training path, and differs at inference only: every output ``Instances`` gains
``box_features`` (M, D), ``proposal_index`` (M,) and, when asked, ``class_probs`` (M, K+1);
with ``MODEL.ATTRIBUTE_ON`` their box predictor also has the attribute head (``attr_probs``,
``attrs_id``, ``attrs_conf``; ``loss_attr``).

``MODEL.ROI_HEADS.NAME: FeatureROIHeads`` builds the region-feature version of the head
named by ``MODEL.REGION_FEATURES.BASE_ROI_HEADS`` (default ``StandardROIHeads``), which may
be any name in ``ROI_HEADS_REGISTRY``.

Under ``torch.autocast`` (``extract_net --amp``) the backbone and RPN run in the lower
precision, but at inference the ROI heads (pooling, box head, box predictor, selection),
which make the region features, scores and boxes, run in float32: in bfloat16, the box head
alone brings the cosine of the shipped model's features to their float32 ones down to 0.985
(bench/README.md).
"""
import torch
from torch import nn

from detectron2.config import CfgNode
from detectron2.modeling.backbone import BottleneckBlock, ResNet
from detectron2.modeling.roi_heads import (
    ROI_HEADS_REGISTRY,
    CascadeROIHeads,
    Res5ROIHeads,
    StandardROIHeads,
)
from detectron2.structures import pairwise_iou

from .config import region_features_node
from .region_heads import (
    RegionFeatureHeadsMixin,
    register_region_feature_heads,
    region_feature_heads,
)


@ROI_HEADS_REGISTRY.register()
@register_region_feature_heads(StandardROIHeads)
class FeatureROIHeads(RegionFeatureHeadsMixin, StandardROIHeads):
    """
    :class:`StandardROIHeads` (FPN, Keypoint R-CNN, ...) returning region features; built
    from a yacs config, the region-feature version of ``MODEL.REGION_FEATURES.BASE_ROI_HEADS``.
    """

    def __new__(cls, *args, **kwargs):
        cfg = args[0] if args and isinstance(args[0], CfgNode) else None
        if cls is FeatureROIHeads and cfg is not None:
            name = region_features_node(cfg).BASE_ROI_HEADS
            try:
                base = ROI_HEADS_REGISTRY.get(name)
            except KeyError:
                raise ValueError(
                    f"MODEL.REGION_FEATURES.BASE_ROI_HEADS {name!r} is not in ROI_HEADS_REGISTRY "
                    "(import the project that registers it first)"
                ) from None
            target = region_feature_heads(base)
            if target is not cls:
                return target(*args, **kwargs)
        return super().__new__(cls)


@ROI_HEADS_REGISTRY.register()
@register_region_feature_heads(Res5ROIHeads)
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


@ROI_HEADS_REGISTRY.register()
@register_region_feature_heads(CascadeROIHeads)
class FeatureCascadeROIHeads(RegionFeatureHeadsMixin, CascadeROIHeads):
    """:class:`CascadeROIHeads` returning region features: those of the last stage, whose
    proposals are the boxes regressed by the stage before it; ``class_probs`` are the
    scores averaged over the stages, which the selection sees."""

    @torch.no_grad()
    def _match_and_label_boxes(self, proposals, stage, targets):
        """
        As in CascadeROIHeads; with the attribute head, the last stage's proposals also get
        ``gt_attributes`` of their matched ground truth (CascadeROIHeads copies only classes
        and boxes).
        """
        proposals = super()._match_and_label_boxes(proposals, stage, targets)
        attribute_on = getattr(self.feature_predictor, "attribute_on", False)
        if stage != self.num_cascade_stages - 1 or not attribute_on:
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
