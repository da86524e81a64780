"""
The parts of MILVLG/bottom-up-attention.pytorch's detectors ("BUTA.pt", ``configs/BUTA/``)
that differ numerically from detectron2's stock ones, each a registered part or a config value
(``MODEL.BUTA``, see :func:`d2_regionfeat.modeling.config.add_regionfeat_config`); nothing
here changes a stock part. Its caffe mode uses them all; its d2 mode (detectron2-trained
models, ``configs/BUTA/d2-*.yaml``) only :class:`BUTARCNN`, with stock parts elsewhere.

* :class:`BUTARCNN` (``META_ARCHITECTURE``): the input rule (a bilinear resize of the float
  image by :func:`buta_input_scale`, the mean subtracted before it in caffe mode, after it in
  d2 mode), output boxes divided by that scale, and the checkpoint conversion over the whole
  model (:mod:`d2_regionfeat.modeling.ports.buta`);
* :class:`BUTARPNHead` (``RPN.HEAD_NAME``): 2A objectness channels, (background, foreground)
  of anchor a at channels a and A + a, scored by a softmax over the pair;
* :class:`BUTARPN` (``PROPOSAL_GENERATOR.NAME``): the +1 box coder with ``x2 = cx + w / 2``
  (:class:`~d2_regionfeat.modeling.legacy.LegacyBox2BoxTransform`), its proposal filter
  (clip to [0, W - 1] x [0, H - 1], non-empty, sides + 1 above ``MIN_SIZE`` times the input
  scale) and only then the sort and top-k, NMS with the +1 IoU and ``>=``;
* :class:`BUTAOutputLayers` (``REGION_FEATURES.PREDICTOR``): the same box coder, and
  ``bbox_pred`` over K + 1 classes, background first, as its checkpoints hold it;
* R152 (its ``RESNET_VERSION 2``): :func:`build_buta_preact_resnet_backbone` (an input batch
  norm in the stem, pre-activation blocks) and :class:`BUTAPreActRes5ROIHeads` (res5 whose
  first block skips its pre-activation, then ``relu(res5_bn(.))``), every batch norm with
  eps ``MODEL.BUTA.BN_EPS``.

Anchors of 4 to 32 px are detectron2's DefaultAnchorGenerator (``ANCHOR_GENERATOR.SIZES``);
the region selection is ``SELECTION: "butd"`` (see the README section "Released
detectors").
"""
import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import (
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    PROPOSAL_GENERATOR_REGISTRY,
    RPN_HEAD_REGISTRY,
)
from detectron2.modeling.backbone import ResNet
from detectron2.modeling.backbone.resnet import CNNBlockBase
from detectron2.modeling.proposal_generator.rpn import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances

from .backbone import CaffeMaxPoolStem
from .checkpoint import CHECKPOINT_CONVERSION_REGISTRY, register_checkpoint_conversion
from .config import buta_node
from .heads import FeatureRes5ROIHeads
from .legacy import LegacyBox2BoxTransform, clip_legacy, nms_proposals
from .meta_arch import RegionFeatureRCNN
from .predictor import ROI_BOX_PREDICTOR_REGISTRY, FeatureFastRCNNOutputLayers, RegionPredictions


def buta_input_scale(height, width, short, max_size):
    """BUTA.pt's ``get_image_blob``: ``short / min(h, w)``, or ``max_size / max(h, w)`` when
    ``round(scale * max(h, w)) > max_size`` (numpy rounding)."""
    scale = float(short) / float(min(height, width))
    if np.round(scale * max(height, width)) > max_size:
        scale = float(max_size) / float(max(height, width))
    return scale


def resize_by_scale(image, scale):
    """
    ``cv2.resize(image, None, fx=scale, fy=scale, interpolation=INTER_LINEAR)`` of a float
    image: output sides ``round(side * scale)`` (half to even), source coordinate
    ``(dst + 0.5) / scale - 0.5`` clamped to the image, bilinear, no antialiasing.

    Args:
        image: (C, H, W) float tensor.

    Returns:
        (C, round(H * scale), round(W * scale)) tensor.
    """
    height, width = image.shape[-2:]
    out_h, out_w = int(np.rint(height * scale)), int(np.rint(width * scale))
    # replicated edge pixels = cv2's clamp; they make floor((side + pad) * scale) >= the
    # rounded side, and F.interpolate then maps with 1 / scale exactly
    pad = int(math.ceil(1.0 / scale)) + 1
    padded = F.pad(image[None], (0, pad, 0, pad), mode="replicate")
    resized = F.interpolate(padded, scale_factor=scale, mode="bilinear", align_corners=False,
                            recompute_scale_factor=False)
    return resized[0, :, :out_h, :out_w]


@RPN_HEAD_REGISTRY.register()
class BUTARPNHead(StandardRPNHead):
    """
    :class:`StandardRPNHead` (same conv and ``anchor_deltas``) whose ``objectness_logits``
    has 2A channels: anchor a's background logit at channel a, its foreground logit at
    A + a (BUTA.pt's ``StandardBUARPNHead``). Outputs (N, 2A, Hi, Wi) logits per map.
    """

    @configurable
    def __init__(self, *, in_channels, num_anchors, **kwargs):
        super().__init__(in_channels=in_channels, num_anchors=num_anchors, **kwargs)
        hidden = self.objectness_logits.in_channels
        self.objectness_logits = nn.Conv2d(hidden, 2 * num_anchors, kernel_size=1, stride=1)
        nn.init.normal_(self.objectness_logits.weight, std=0.01)
        nn.init.constant_(self.objectness_logits.bias, 0)


def pair_logits(logits, num_anchors):
    """(N, Hi*Wi*2A) flattened 2A-channel logits -> (N, Hi*Wi, 2, A): [..., 0, a] background,
    [..., 1, a] foreground."""
    return logits.view(logits.shape[0], -1, 2, num_anchors)


@PROPOSAL_GENERATOR_REGISTRY.register()
class BUTARPN(RPN):
    """
    :class:`RPN` with :class:`BUTARPNHead`'s scores and BUTA.pt's proposals
    (``find_top_bua_rpn_proposals``), per image, on one feature map:

    1. anchors decoded by :class:`LegacyBox2BoxTransform` (``x2_offset`` 0), clipped to
       [0, W - 1] x [0, H - 1];
    2. kept when ``x2 > x1`` and ``y2 > y1``, and ``x2 - x1 + 1`` and ``y2 - y1 + 1`` are
       both above ``PROPOSAL_GENERATOR.MIN_SIZE`` times the image's input scale
       (:meth:`input_scales`; 1 outside it, as in training);
    3. then sorted by the foreground softmax probability (ties: lower index first), the
       first ``PRE_NMS_TOPK``; NMS at ``NMS_THRESH`` with the +1 IoU, suppressed when
       ``>=``; the first ``POST_NMS_TOPK``.

    Proposals keep ``objectness_logits`` = that probability (as BUTA.pt's). Training uses
    detectron2's losses on the log-odds ``fg - bg`` (sigmoid of which is the softmax).
    """

    _input_scales = None

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["box2box_transform"] = LegacyBox2BoxTransform(
            weights=cfg.MODEL.RPN.BBOX_REG_WEIGHTS, x2_offset=0.0
        )
        if len(ret["in_features"]) != 1:
            raise ValueError(
                f"BUTARPN takes one feature map (MODEL.RPN.IN_FEATURES); got {ret['in_features']}"
            )
        return ret

    @contextlib.contextmanager
    def input_scales(self, scales):
        """Within this context, each image's input scale (the resize factor of
        :class:`BUTARCNN`), which scales ``MIN_SIZE``."""
        outer, self._input_scales = self._input_scales, list(scales)
        try:
            yield
        finally:
            self._input_scales = outer

    def _num_anchors(self):
        return self.anchor_generator.num_cell_anchors[0]

    def losses(self, anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        log_odds = []
        for logits in pred_objectness_logits:
            pairs = pair_logits(logits, self._num_anchors())
            log_odds.append((pairs[:, :, 1] - pairs[:, :, 0]).flatten(1))
        return super().losses(anchors, log_odds, gt_labels, pred_anchor_deltas, gt_boxes)

    def predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes):
        """
        Args: as :meth:`RPN.predict_proposals`, one feature map: logits (N, Hi*Wi*2A),
        deltas (N, Hi*Wi*A, 4).

        Returns:
            list[Instances]: per image, ``proposal_boxes`` and ``objectness_logits``, in
            descending probability.
        """
        with torch.no_grad():
            proposals = self._decode_proposals(anchors, pred_anchor_deltas)[0]
            probs = F.softmax(pair_logits(pred_objectness_logits[0], self._num_anchors()), dim=2)
            probs = probs[:, :, 1].flatten(1)  # (N, Hi*Wi*A), anchors' order
            scales = self._input_scales or [1.0] * len(image_sizes)
            results = []
            for boxes, scores, size, scale in zip(proposals, probs, image_sizes, scales):
                boxes = clip_legacy(boxes, size)
                widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
                min_side = self.min_box_size * scale
                keep = (widths > 0) & (heights > 0) & (widths + 1 > min_side) & (heights + 1 > min_side)
                boxes, scores = boxes[keep], scores[keep]
                order = torch.sort(scores, descending=True, stable=True).indices
                order = order[: self.pre_nms_topk[self.training]]
                boxes, scores = boxes[order], scores[order]
                results.append(nms_proposals(boxes, scores, scores, size, self.nms_thresh,
                                             "legacy_ge", self.post_nms_topk[self.training]))
            return results


@ROI_BOX_PREDICTOR_REGISTRY.register()
class BUTAOutputLayers(FeatureFastRCNNOutputLayers):
    """
    :class:`FeatureFastRCNNOutputLayers` (same outputs) as BUTA.pt's box predictor:
    :class:`LegacyBox2BoxTransform` with ``x2_offset`` 0 (weights
    ``ROI_BOX_HEAD.BBOX_REG_WEIGHTS``), and ``bbox_pred`` = Linear(D, (K + 1) * 4) with the
    background's 4 rows first, as BUTA.pt's checkpoints hold it (detectron2's checkpointer
    would skip a same-named tensor of another shape before any conversion could run). Those
    rows are left out of ``proposal_deltas``: (R, K * 4) as detectron2's. A detectron2
    predictor's K * 4 rows load with zero background rows put first.
    """

    @configurable
    def __init__(self, input_shape, **kwargs):
        super().__init__(input_shape, **kwargs)
        if self.bbox_pred.out_features != 4 * self.num_classes:
            raise ValueError("BUTAOutputLayers regresses every class: set "
                             "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG False")
        self.bbox_pred = nn.Linear(self.bbox_pred.in_features, 4 * (self.num_classes + 1))
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.constant_(self.bbox_pred.bias, 0)
        stock = self.box2box_transform
        self.box2box_transform = LegacyBox2BoxTransform(stock.weights, stock.scale_clamp, 0.0)
        register_checkpoint_conversion(self)

    def forward(self, x):
        """As :meth:`FeatureFastRCNNOutputLayers.forward`; deltas (R, K * 4) without the
        background's."""
        out = super().forward(x)
        return RegionPredictions(out[0], out[1][:, 4:], out.features, out.attr_logits)


@CHECKPOINT_CONVERSION_REGISTRY.register()
def background_box_rows(module, state_dict, prefix):
    """A :class:`BUTAOutputLayers` given a detectron2 predictor's ``bbox_pred`` (K * 4 rows):
    4 zero rows put first for the background. Nothing for other modules."""
    if not isinstance(module, BUTAOutputLayers):
        return
    for name in ("weight", "bias"):
        key = f"{prefix}bbox_pred.{name}"
        value = state_dict.get(key)
        if value is not None and value.shape[0] == 4 * module.num_classes:
            state_dict[key] = torch.cat([value.new_zeros((4,) + value.shape[1:]), value])


def buta_norm(norm, channels, eps):
    """The batch norm of ``MODEL.RESNETS.NORM`` ("FrozenBN" or "BN") with ``eps``."""
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels, eps=eps)
    if norm == "BN":
        return nn.BatchNorm2d(channels, eps=eps)
    raise ValueError(f'MODEL.RESNETS.NORM must be "FrozenBN" or "BN" for BUTA.pt\'s R152; got {norm!r}')


class PreActConv2d(nn.Conv2d):
    """Conv2d preceded, when it has a ``norm``, by that norm and a ReLU (BUTA.pt's
    ``Conv2dv2``): (N, Cin, H, W) -> (N, Cout, H', W')."""

    def __init__(self, *args, norm=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm

    def forward(self, x):
        if self.norm is not None:
            x = F.relu(self.norm(x))
        return super().forward(x)


class PreActBottleneckBlock(CNNBlockBase):
    """
    BUTA.pt's ``BottleneckBlockv2``: ``pre = relu(norm(x))``; the branch is conv1 (1x1, no
    norm), conv2 (norm, ReLU, 3x3), conv3 (norm, ReLU, 1x1) on ``pre``; the shortcut is
    ``shortcut(pre)`` (1x1) when the channels change, else ``x``; no ReLU after the sum.
    (N, Cin, H, W) -> (N, Cout, H / stride, W / stride).
    """

    def __init__(self, in_channels, out_channels, *, bottleneck_channels, stride=1,
                 num_groups=1, norm="FrozenBN", stride_in_1x1=False, dilation=1, eps=2e-5):
        super().__init__(in_channels, out_channels, stride)
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = PreActConv2d(in_channels, out_channels, kernel_size=1, stride=stride,
                                         bias=False)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = PreActConv2d(in_channels, bottleneck_channels, kernel_size=1,
                                  stride=stride_1x1, bias=False)
        self.conv2 = PreActConv2d(
            bottleneck_channels, bottleneck_channels, kernel_size=3, stride=stride_3x3,
            padding=dilation, dilation=dilation, groups=num_groups, bias=False,
            norm=buta_norm(norm, bottleneck_channels, eps),
        )
        self.conv3 = PreActConv2d(bottleneck_channels, out_channels, kernel_size=1, bias=False,
                                  norm=buta_norm(norm, bottleneck_channels, eps))
        self.norm = buta_norm(norm, in_channels, eps)
        for layer in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if layer is not None:
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")

    def residual(self, pre, identity):
        """The branch on ``pre`` plus the shortcut (``shortcut(pre)``, or ``identity``)."""
        shortcut = identity if self.shortcut is None else self.shortcut(pre)
        return self.conv3(self.conv2(self.conv1(pre))) + shortcut

    def forward(self, x):
        return self.residual(F.relu(self.norm(x)), x)


class PreActStem(CaffeMaxPoolStem):
    """BUTA.pt's ``BUABasicStemv2``: a batch norm on the input (``norm``), then
    :class:`CaffeMaxPoolStem` with its conv's norm at ``eps``. (N, 3, H, W) -> (N, C, H/4, W/4)."""

    def __init__(self, in_channels=3, out_channels=64, norm="FrozenBN", eps=2e-5):
        super().__init__(in_channels=in_channels, out_channels=out_channels, norm=norm)
        self.conv1.norm = buta_norm(norm, out_channels, eps)
        self.norm = buta_norm(norm, in_channels, eps)

    def forward(self, x):
        return super().forward(self.norm(x))


BLOCKS_PER_STAGE = {50: [3, 4, 6], 101: [3, 4, 23], 152: [3, 8, 36]}  # res2..res4


@BACKBONE_REGISTRY.register()
def build_buta_preact_resnet_backbone(cfg, input_shape):
    """
    BUTA.pt's ``build_bua_resnet_backbone`` with ``RESNET_VERSION 2``: :class:`PreActStem`
    and :class:`PreActBottleneckBlock` stages up to res4 (``MODEL.RESNETS``: DEPTH,
    NUM_GROUPS, WIDTH_PER_GROUP, STEM_OUT_CHANNELS, RES2_OUT_CHANNELS, STRIDE_IN_1X1, NORM,
    OUT_FEATURES; ``MODEL.BACKBONE.FREEZE_AT``; eps ``MODEL.BUTA.BN_EPS``); res5 is the ROI
    head's (:class:`BUTAPreActRes5ROIHeads`).

    Returns:
        ResNet: outputs ``OUT_FEATURES`` among res2..res4, each (N, C, H/stride, W/stride).
    """
    r = cfg.MODEL.RESNETS
    eps = buta_node(cfg).BN_EPS
    if r.DEPTH not in BLOCKS_PER_STAGE:
        raise ValueError(f"build_buta_preact_resnet_backbone supports MODEL.RESNETS.DEPTH "
                         f"{sorted(BLOCKS_PER_STAGE)}; got {r.DEPTH}")
    names = ("res2", "res3", "res4")
    if not set(r.OUT_FEATURES) <= set(names):
        raise ValueError(f"build_buta_preact_resnet_backbone outputs res2..res4; "
                         f"MODEL.RESNETS.OUT_FEATURES is {r.OUT_FEATURES}")
    stem = PreActStem(input_shape.channels, r.STEM_OUT_CHANNELS, r.NORM, eps)
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    bottleneck = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for idx, count in enumerate(BLOCKS_PER_STAGE[r.DEPTH][: max(names.index(f) for f in r.OUT_FEATURES) + 1]):
        stages.append(ResNet.make_stage(
            PreActBottleneckBlock, count, stride_per_block=[1 if idx == 0 else 2] + [1] * (count - 1),
            in_channels=in_channels, out_channels=out_channels, bottleneck_channels=bottleneck,
            num_groups=r.NUM_GROUPS, norm=r.NORM, stride_in_1x1=r.STRIDE_IN_1X1, eps=eps,
        ))
        in_channels, out_channels, bottleneck = out_channels, out_channels * 2, bottleneck * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


class PreActRes5(nn.Module):
    """
    BUTA.pt's R152 res5 head (``_shared_roi_transform``): blocks ``0..n-1``
    (:class:`PreActBottleneckBlock`), the first applied to the pooled map without its
    pre-activation (``residual(x, x)``), then ``relu(norm(.))`` (its ``res5_bn``).
    (R, C, S, S) -> (R, 2C, S', S').
    """

    def __init__(self, blocks, norm):
        super().__init__()
        self.num_blocks = len(blocks)
        for i, block in enumerate(blocks):
            self.add_module(str(i), block)
        self.norm = norm

    def forward(self, x):
        blocks = [getattr(self, str(i)) for i in range(self.num_blocks)]
        x = blocks[0].residual(x, x)
        for block in blocks[1:]:
            x = block(x)
        return F.relu(self.norm(x))


@ROI_HEADS_REGISTRY.register()
class BUTAPreActRes5ROIHeads(FeatureRes5ROIHeads):
    """:class:`FeatureRes5ROIHeads` whose res5 is :class:`PreActRes5` (BUTA.pt's R152:
    stride 2 in the first block with ``RES5_DILATION`` 1, stride 1 and dilation 2 with 2)."""

    @classmethod
    def _build_res5_block(cls, cfg):
        r = cfg.MODEL.RESNETS
        eps = buta_node(cfg).BN_EPS
        out_channels = r.RES2_OUT_CHANNELS * 8  # res5 is 8x res2
        dilation = r.RES5_DILATION
        blocks = ResNet.make_stage(
            PreActBottleneckBlock, 3, stride_per_block=[2 if dilation == 1 else 1, 1, 1],
            in_channels=out_channels // 2, out_channels=out_channels,
            bottleneck_channels=r.NUM_GROUPS * r.WIDTH_PER_GROUP * 8, num_groups=r.NUM_GROUPS,
            norm=r.NORM, stride_in_1x1=r.STRIDE_IN_1X1, dilation=dilation, eps=eps,
        )
        return PreActRes5(blocks, buta_norm(r.NORM, out_channels, eps)), out_channels


@META_ARCH_REGISTRY.register()
class BUTARCNN(RegionFeatureRCNN):
    """
    :class:`RegionFeatureRCNN` as BUTA.pt's ``GeneralizedBUARCNN`` runs at extraction:

    * input (:meth:`preprocess_image`, at inference): each image, as the input side gives it
      (not resized: ``INPUT.MIN_SIZE_TEST: 0``), :func:`resize_by_scale` by
      :func:`buta_input_scale` (``MODEL.BUTA.TEST_SCALE`` / ``TEST_MAX_SIZE``), normalised by
      ``PIXEL_MEAN`` / ``PIXEL_STD`` before (``MODEL.BUTA.NORMALIZE_BEFORE_RESIZE``, caffe
      mode) or after (d2 mode); the scale reaches a :class:`BUTARPN`;
    * "butd" selection's NMS and the output boxes in original pixels = network-input
      pixels divided by the scale (not clipped);
    * its checkpoint conversion spans the whole model (BUTA.pt's caffe-mode keys,
      :mod:`d2_regionfeat.modeling.ports.buta`; a d2-mode checkpoint has detectron2's names
      and grid-feats-vqa's attribute head, which the ROI heads' hook converts,
      :mod:`d2_regionfeat.modeling.ports.grid_feats`).

    Training runs detectron2's input path (the images as the input side resized them).
    """

    @configurable
    def __init__(self, *, test_scale=600, test_max_size=1000, normalize_before_resize=True, **kwargs):
        super().__init__(**kwargs)
        self.test_scale = test_scale
        self.test_max_size = test_max_size
        self.normalize_before_resize = normalize_before_resize
        register_checkpoint_conversion(self)

    @classmethod
    def from_config(cls, cfg):
        node = buta_node(cfg)
        return {**super().from_config(cfg), "test_scale": node.TEST_SCALE,
                "test_max_size": node.TEST_MAX_SIZE,
                "normalize_before_resize": node.NORMALIZE_BEFORE_RESIZE}

    def input_scale(self, batched_input):
        """The resize factor of one input dict's ``image`` (C, H, W) at inference."""
        height, width = batched_input["image"].shape[-2:]
        return buta_input_scale(height, width, self.test_scale, self.test_max_size)

    def preprocess_image(self, batched_inputs):
        """
        At inference: per image, (C, H, W) -> float -> (C, round(H s), round(W s)), normalised
        before or after the resize, padded into an ImageList (detectron2's
        ``size_divisibility``). In training: detectron2's.
        """
        if self.training:
            return super().preprocess_image(batched_inputs)
        images = []
        for x in batched_inputs:
            image = x["image"].to(self.device).float()
            if self.normalize_before_resize:
                image = resize_by_scale((image - self.pixel_mean) / self.pixel_std, self.input_scale(x))
            else:
                image = (resize_by_scale(image, self.input_scale(x)) - self.pixel_mean) / self.pixel_std
            images.append(image)
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def output_shapes(self, batched_inputs):
        """(round(H s) / s, round(W s) / s): the network input divided by the scale."""
        shapes = []
        for x in batched_inputs:
            scale = self.input_scale(x)
            height, width = x["image"].shape[-2:]
            shapes.append((np.rint(height * scale) / scale, np.rint(width * scale) / scale))
        return shapes

    def inference(self, batched_inputs, detected_instances=None, do_postprocess=True):
        scales = [self.input_scale(x) for x in batched_inputs]
        # a BUTARPN scales its MIN_SIZE by them; detectron2's RPN (d2 mode) has no such rule
        scaled = getattr(self.proposal_generator, "input_scales", None)
        with scaled(scales) if scaled else contextlib.nullcontext():
            results = super().inference(batched_inputs, detected_instances, do_postprocess=False)
        if not do_postprocess:
            return results
        processed = []
        for result, x, scale in zip(results, batched_inputs, scales):
            size = (x.get("height", x["image"].shape[-2]), x.get("width", x["image"].shape[-1]))
            out = Instances(size, **result.get_fields())
            out.pred_boxes = Boxes(result.pred_boxes.tensor / scale)
            processed.append({"instances": out})
        return processed
