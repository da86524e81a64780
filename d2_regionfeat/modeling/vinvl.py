"""
The parts of scene_graph_benchmark's VinVL detector (maskrcnn-benchmark conventions) that
differ numerically from detectron2's stock ones, each a registered part or a config value
(``MODEL.VINVL``, see :func:`d2_regionfeat.modeling.config.add_regionfeat_config`); nothing
here changes a stock part:

* :class:`LegacyFrozenBatchNorm2d`: ``x * w / sqrt(var) + (b - mean * w / sqrt(var))``, no
  eps (``MODEL.VINVL.FROZEN_BN_NO_EPS``, applied by :class:`VinVLRCNN`);
* :class:`VinVLAnchorGenerator` (``ANCHOR_GENERATOR.NAME``): py-faster-rcnn's
  ``generate_anchors``, rounded sizes, +1 convention, centre 7.5 of a 16-px cell, ratio-major;
* :class:`~d2_regionfeat.modeling.legacy.LegacyBox2BoxTransform` (shared with BUTA.pt's
  parts): widths ``x2 - x1 + 1``, ``x2 = cx + w / 2 - 1``;
* :class:`VinVLRPN` (``PROPOSAL_GENERATOR.NAME``): the legacy box coder, top-k and NMS on the
  sigmoid probability, clipping to [0, W - 1] x [0, H - 1], the min-size filter with +1
  widths (keeps boxes clipped to zero width), NMS IoU ``MODEL.VINVL.NMS_IOU``;
* :class:`VinVLOutputLayers` (``REGION_FEATURES.PREDICTOR``): the legacy box coder in the box
  predictor, and VinVL's attribute head (``ROI_ATTRIBUTE_HEAD.KIND: "vinvl"``, see
  :func:`d2_regionfeat.modeling.attributes.vinvl_attribute_fields`);
* the test resize with the long side truncated, not rounded (``INPUT.RESIZE_LONG_SIDE:
  "truncate"``), is on the input side: :class:`d2_regionfeat.data.transforms.VinVLResize`;
* :class:`VinVLRCNN` (``META_ARCHITECTURE``): output boxes only rescaled to the original
  image, never clipped nor dropped when empty (``MODEL.VINVL.KEEP_EMPTY_BOXES``).

ROIAlign with ``aligned=False`` is detectron2's ``ROI_BOX_HEAD.POOLER_TYPE: "ROIAlign"``;
background first in the class rows is the checkpoint conversion's business
(:mod:`d2_regionfeat.modeling.ports.vinvl`).
"""
import warnings

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import META_ARCH_REGISTRY, PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.anchor_generator import ANCHOR_GENERATOR_REGISTRY, DefaultAnchorGenerator
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, Instances

from ..data.transforms import build_test_transform
from .attributes import vinvl_attribute_fields
from .checkpoint import register_checkpoint_conversion
from .config import vinvl_node
from .legacy import LegacyBox2BoxTransform, clip_legacy, nms_proposals
from .meta_arch import RegionFeatureRCNN
from .predictor import ROI_BOX_PREDICTOR_REGISTRY, FeatureFastRCNNOutputLayers


class LegacyFrozenBatchNorm2d(FrozenBatchNorm2d):
    """detectron2's FrozenBatchNorm2d (same buffers) with maskrcnn-benchmark's formula."""

    def forward(self, x):
        """(N, C, H, W) -> (N, C, H, W): ``x * scale + shift``, scale = weight / sqrt(var)."""
        scale = self.weight * self.running_var.rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


def use_legacy_frozen_bn(module):
    """Switch every FrozenBatchNorm2d under ``module`` to :class:`LegacyFrozenBatchNorm2d`
    (in place, buffers kept); returns how many."""
    count = 0
    for m in module.modules():
        if type(m) is FrozenBatchNorm2d:
            m.__class__ = LegacyFrozenBatchNorm2d
            count += 1
    return count


def legacy_cell_anchors(stride, sizes, aspect_ratios):
    """
    py-faster-rcnn's ``generate_anchors(stride, sizes / stride, ratios)``: around the centre
    ((stride - 1) / 2, (stride - 1) / 2), widths ``round(sqrt(stride^2 / r))`` and heights
    ``round(w * r)`` (numpy rounding, half to even) scaled by size / stride, corners at
    ``centre -+ (w - 1) / 2``.

    Returns:
        Tensor (len(aspect_ratios) * len(sizes), 4) float32, ratio-major.
    """
    centre = (stride - 1) / 2.0
    anchors = []
    for ratio in aspect_ratios:
        base_w = np.round(np.sqrt(stride * stride / ratio))
        base_h = np.round(base_w * ratio)
        for size in sizes:
            w, h = base_w * size / stride, base_h * size / stride
            anchors.append([centre - (w - 1) / 2, centre - (h - 1) / 2,
                            centre + (w - 1) / 2, centre + (h - 1) / 2])
    return torch.tensor(anchors, dtype=torch.float32)


@ANCHOR_GENERATOR_REGISTRY.register()
class VinVLAnchorGenerator(DefaultAnchorGenerator):
    """
    :class:`DefaultAnchorGenerator` with maskrcnn-benchmark's cell anchors
    (:func:`legacy_cell_anchors`, one feature map per stride); the grid starts at 0
    (``ANCHOR_GENERATOR.OFFSET`` must be 0: the cell anchors are already centred at
    (stride - 1) / 2).
    """

    @configurable
    def __init__(self, *, sizes, aspect_ratios, strides, offset=0.0):
        if offset != 0.0:
            raise ValueError(
                f"MODEL.ANCHOR_GENERATOR.OFFSET must be 0.0 for VinVLAnchorGenerator; got {offset}"
            )
        self._strides_for_cells = strides
        super().__init__(sizes=sizes, aspect_ratios=aspect_ratios, strides=strides, offset=offset)

    def _calculate_anchors(self, sizes, aspect_ratios):
        from detectron2.modeling.anchor_generator import BufferList

        return BufferList([
            legacy_cell_anchors(stride, s, a)
            for stride, s, a in zip(self._strides_for_cells, sizes, aspect_ratios)
        ])


@PROPOSAL_GENERATOR_REGISTRY.register()
class VinVLRPN(RPN):
    """
    :class:`RPN` (same head, anchors from ``ANCHOR_GENERATOR``, same training) whose box coder
    is :class:`LegacyBox2BoxTransform` and whose inference is maskrcnn-benchmark's
    ``RPNPostProcessor`` on one feature map, per image: the top ``PRE_NMS_TOPK_TEST`` by
    sigmoid probability (ties: lower index first), decoded, clipped to [0, W - 1] x
    [0, H - 1], kept when ``x2 - x1 + 1 >= MIN_SIZE`` and ``y2 - y1 + 1 >= MIN_SIZE``, NMS at
    ``NMS_THRESH`` (IoU ``MODEL.VINVL.NMS_IOU``) on the probability, the first
    ``POST_NMS_TOPK_TEST``. Proposals keep ``objectness_logits`` (the logits).
    """

    @configurable
    def __init__(self, *, nms_iou: str = "torchvision", **kwargs):
        super().__init__(**kwargs)
        self.nms_iou = nms_iou

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["box2box_transform"] = LegacyBox2BoxTransform(weights=cfg.MODEL.RPN.BBOX_REG_WEIGHTS)
        ret["nms_iou"] = vinvl_node(cfg).NMS_IOU
        if len(ret["in_features"]) != 1:
            raise ValueError(
                f"VinVLRPN takes one feature map (MODEL.RPN.IN_FEATURES); got {ret['in_features']}"
            )
        return ret

    def predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes):
        """
        Args: as :meth:`RPN.predict_proposals`, one feature map: logits (N, Hi*Wi*A),
        deltas (N, Hi*Wi*A, 4).

        Returns:
            list[Instances]: per image, ``proposal_boxes`` and ``objectness_logits``, in
            descending probability.
        """
        with torch.no_grad():
            proposals = self._decode_proposals(anchors, pred_anchor_deltas)[0]
            topk = self.pre_nms_topk[self.training]
            results = []
            for boxes, logits, size in zip(proposals, pred_objectness_logits[0], image_sizes):
                probs = logits.sigmoid()
                order = torch.sort(probs, descending=True, stable=True).indices[:topk]
                boxes, probs, logits = clip_legacy(boxes[order], size), probs[order], logits[order]
                widths, heights = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
                keep = (widths >= self.min_box_size) & (heights >= self.min_box_size)
                boxes, probs, logits = boxes[keep], probs[keep], logits[keep]
                results.append(nms_proposals(boxes, probs, logits, size, self.nms_thresh,
                                             self.nms_iou, self.post_nms_topk[self.training]))
            return results


@ROI_BOX_PREDICTOR_REGISTRY.register()
class VinVLOutputLayers(FeatureFastRCNNOutputLayers):
    """
    :class:`FeatureFastRCNNOutputLayers` (same parameters and outputs) with maskrcnn-benchmark's
    box coder (:class:`LegacyBox2BoxTransform`, weights ``ROI_BOX_HEAD.BBOX_REG_WEIGHTS``).
    With ``ROI_ATTRIBUTE_HEAD.KIND: "vinvl"`` it leaves the attributes out of the selection:
    :class:`VinVLRCNN` adds VinVL's afterwards, from the output boxes.
    """

    @configurable
    def __init__(self, input_shape, *, attribute_kind: str = "butd", max_attributes_per_region=16,
                 **kwargs):
        super().__init__(input_shape, **kwargs)
        # the given transform's weights and clamp (a Feature head passes its stock one) in
        # maskrcnn-benchmark's +1 convention
        stock = self.box2box_transform
        self.box2box_transform = LegacyBox2BoxTransform(stock.weights, stock.scale_clamp)
        self.attribute_kind = attribute_kind
        # what region_fields() reports of the attribute fields
        self.attribute_outputs = {
            "attribute_kind": attribute_kind, "max_attributes": max_attributes_per_region
        }

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["attribute_kind"] = cfg.MODEL.ROI_ATTRIBUTE_HEAD.KIND
        ret["max_attributes_per_region"] = cfg.MODEL.ROI_ATTRIBUTE_HEAD.MAX_PER_REGION
        return ret

    def predict_attr_probs(self, predictions):
        if self.attribute_kind == "vinvl":
            return None
        return super().predict_attr_probs(predictions)


def rescale_boxes(instances, height, width):
    """``BoxList.resize``: ``instances`` with ``pred_boxes`` scaled to (height, width), no clip."""
    out = Instances((height, width), **instances.get_fields())
    boxes = Boxes(instances.pred_boxes.tensor.clone())
    boxes.scale(width / instances.image_size[1], height / instances.image_size[0])
    out.pred_boxes = boxes
    return out


@META_ARCH_REGISTRY.register()
class VinVLRCNN(RegionFeatureRCNN):
    """
    :class:`RegionFeatureRCNN` as scene_graph_benchmark's ``AttrRCNN`` runs at test:

    * every FrozenBatchNorm2d without eps (``MODEL.VINVL.FROZEN_BN_NO_EPS``);
    * with ``ROI_ATTRIBUTE_HEAD.KIND: "vinvl"``, VinVL's attribute head on the output
      regions (:func:`vinvl_attribute_fields`): their features pooled again at the output
      boxes (network-input pixels) and the selected classes;
    * output boxes rescaled to the original size only (``MODEL.VINVL.KEEP_EMPTY_BOXES``),
      not clipped, and regions of zero width or height kept;
    * the names of ``MODEL.VINVL.LABELMAP`` (read with the other names files by
      :mod:`~d2_regionfeat.modeling.vocabulary`: runs, tools and ``DATASETS.TEST``'s metadata);
    * a warning, once, when an input was not resized by ``test_resize`` (the config's
      :func:`~d2_regionfeat.data.build_test_transform`): detectron2's ``DefaultPredictor``
      builds its own rounding resize, which gives a long side one pixel off VinVL's
      truncating one for many sizes, and no hook of it lets the config's reach it.
    """

    @configurable
    def __init__(self, *, legacy_frozen_bn=True, keep_empty_boxes=True, attribute_head=None,
                 test_resize=None, **kwargs):
        super().__init__(**kwargs)
        self.test_resize = test_resize
        self._resize_warned = False
        register_checkpoint_conversion(self)  # VinVL's checkpoint spans the whole model
        if legacy_frozen_bn:
            use_legacy_frozen_bn(self)
        self.keep_empty_boxes = keep_empty_boxes
        self.attribute_head = attribute_head
        if attribute_head is not None:
            self.roi_heads.register_forward_hook(self._add_attributes)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        node = vinvl_node(cfg)
        ret.update(legacy_frozen_bn=node.FROZEN_BN_NO_EPS, keep_empty_boxes=node.KEEP_EMPTY_BOXES,
                   test_resize=build_test_transform(cfg))
        attributes = cfg.MODEL.ROI_ATTRIBUTE_HEAD
        if cfg.MODEL.ATTRIBUTE_ON and attributes.KIND == "vinvl":
            ret["attribute_head"] = (attributes.SCORE_THRESH, attributes.MAX_PER_REGION)
        return ret

    def _add_attributes(self, roi_heads, args, output):
        """Forward hook of the ROI heads: VinVL's attribute fields on each output Instances."""
        if self.training:
            return
        _, features, _ = args[:3]
        instances = output[0]
        boxes = [x.pred_boxes for x in instances]
        if sum(len(b) for b in boxes) == 0:
            feats = None
        else:
            feats = roi_heads.region_features(
                {k: v.float() for k, v in features.items()}, boxes
            ).split([len(b) for b in boxes])
        for i, x in enumerate(instances):
            region = feats[i] if feats is not None else x.box_features[:0]
            for name, value in vinvl_attribute_fields(
                roi_heads.feature_predictor, region, x.pred_classes, *self.attribute_head
            ).items():
                x.set(name, value)

    def _check_resize(self, batched_inputs):
        """Warn once about an input whose size is not what ``test_resize`` makes of its original."""
        if self.test_resize is None or self._resize_warned:
            return
        for x in batched_inputs:
            if "height" not in x or "width" not in x:
                continue
            resize = self.test_resize.get_transform(np.empty((x["height"], x["width"], 0), np.uint8))
            expected, got = (resize.new_h, resize.new_w), tuple(x["image"].shape[-2:])
            if got != expected:
                self._resize_warned = True
                warnings.warn(
                    f"a {x['height']}x{x['width']} image came resized to {got[0]}x{got[1]}, not the "
                    f"{expected[0]}x{expected[1]} of this config's test resize (INPUT.RESIZE_LONG_SIDE); "
                    "DefaultPredictor resizes by rounding: use d2_regionfeat.modeling.given_boxes.RegionPredictor, or "
                    "d2_regionfeat.data.build_test_transform(cfg), for the features VinVL gives"
                )
                return

    def inference(self, batched_inputs, detected_instances=None, do_postprocess=True):
        self._check_resize(batched_inputs)
        results = super().inference(batched_inputs, detected_instances, do_postprocess=False)
        if not do_postprocess:
            return results
        processed = []
        for result, x in zip(results, batched_inputs):
            height = x.get("height", result.image_size[0])
            width = x.get("width", result.image_size[1])
            if self.keep_empty_boxes:
                processed.append({"instances": rescale_boxes(result, height, width)})
            else:
                processed.append({"instances": detector_postprocess(result, height, width)})
        return processed
