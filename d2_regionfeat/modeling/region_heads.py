"""
The region-feature version of any ROI heads class, made by hooks, never by copying its code.

:func:`region_feature_heads` turns an ROI heads class (detectron2's, a project's such as
TridentNet's or DensePose's, Detic's, your own subclass) into ``Feature<Base>``: the same
parameters (state-dict keys unchanged), training and detections, whose inference outputs
also carry, per detection, ``box_features`` (M, D) of the proposal behind it,
``proposal_index`` (M,), ``class_probs`` (M, K+1) when asked and the attribute fields with
``MODEL.ATTRIBUTE_ON``. At inference, and only then, the head records through hooks:

* the input rows of every call of its box predictor (each stage's in a cascade; the last
  call before the selection is the one that counts), or the output of the module at
  ``source_module``, whose rows must match that call's;
* the boxes its box pooler received in that call (the proposals, for selections that need
  them and for ``SOURCE: pooled``);
* the selection: detectron2's ``fast_rcnn_inference_single_image`` is wrapped once, at import,
  so that while a head records, every per-image selection reached through
  ``predictor.inference`` or the module-level ``fast_rcnn_inference`` (Cascade, Detic) runs
  the head's selection (``detections``: detectron2's own, bit for bit) and attaches the
  fields of the kept rows to the Instances it returns. They then follow whatever the head
  does to them afterwards (Trident's merge, Detic's re-scoring, mask heads): every
  ``Instances`` operation carries fields along.

A head that breaks this contract (its predictor is never called, the selection sees other
rows than the predictor did, the selection is never reached) fails with one line naming the
head and the reason; it never returns wrong features.
"""
import sys
import threading
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
from torch import nn

from detectron2.config import CfgNode
from detectron2.modeling.roi_heads import CascadeROIHeads, Res5ROIHeads, StandardROIHeads
from detectron2.modeling.roi_heads import fast_rcnn
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances

from .attributes import attribute_fields
from .checkpoint import register_checkpoint_conversion
from .config import check_region_settings, region_features_node, region_selection_settings
from .meta_arch import check_config_meta_architecture
from .outputs import RegionFields
from .predictor import FeatureFastRCNNOutputLayers, RegionSelection, RegionSettings, feature_predictor_like
from .vocabulary import register_vocabularies

_recording = threading.local()
_stock_single_image = fast_rcnn.fast_rcnn_inference_single_image


def _select_single_image(boxes, scores, image_shape, score_thresh, nms_thresh, topk_per_image):
    """detectron2's per-image selection, or, while a region-feature head records, its own."""
    recorder = getattr(_recording, "recorder", None)
    if recorder is None:
        return _stock_single_image(boxes, scores, image_shape, score_thresh, nms_thresh, topk_per_image)
    return recorder.select_image(boxes, scores, image_shape, score_thresh, nms_thresh, topk_per_image)


fast_rcnn.fast_rcnn_inference_single_image = _select_single_image


class ContractError(RuntimeError):
    """A head gave no way to know which proposal a detection came from (one line)."""


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


def _predictors(heads) -> List[nn.Module]:
    predictor = heads.box_predictor
    return list(predictor) if isinstance(predictor, nn.ModuleList) else [predictor]


def _pooler(heads) -> Optional[nn.Module]:
    for name in ("box_pooler", "pooler"):
        if isinstance(getattr(heads, name, None), nn.Module):
            return getattr(heads, name)
    return None


class _Recorder:
    """What one inference call of a head records, and the selection it runs (see module doc)."""

    def __init__(self, heads):
        self.heads = heads
        self.name = type(heads).__name__
        self.settings = heads.region_selection
        self.calls = 0
        self.selections = 0
        self.rows = self.attr_probs = self.proposal_boxes = None
        self.pooled_boxes = self.source_rows = self.source_problem = None
        self.offset = self.image = 0

    def error(self, reason):
        return ContractError(f"{self.name}: {reason}, so no detection can be traced to its proposal")

    def on_pool(self, module, args):
        self.pooled_boxes = list(args[1])

    def on_source(self, module, args, output):
        self.source_rows = output.flatten(1) if output.dim() > 2 else output

    def on_predictor(self, module, args, output):
        rows = args[0].flatten(1)
        self.source_problem = None
        if self.heads.source_module:
            if self.source_rows is None or len(self.source_rows) != len(rows):
                got = "no output" if self.source_rows is None else f"{len(self.source_rows)} rows"
                self.source_problem = (
                    f"MODEL.REGION_FEATURES.SOURCE_MODULE {self.heads.source_module!r} of {self.name} "
                    f"gave {got} in the box predictor call of {len(rows)} proposals that made the "
                    "detections; it must give one row per proposal"
                )
            rows, self.source_rows = self.source_rows, None
        # the predictor's own attribute probabilities (None without an attribute head)
        predict_attr_probs = getattr(module, "predict_attr_probs", None)
        self.attr_probs = predict_attr_probs(output) if predict_attr_probs is not None else None
        self.rows, self.proposal_boxes = rows, self.pooled_boxes
        self.offset = self.image = 0
        self.calls += 1

    def source_rows_of(self, instances):
        """
        Per output image, the recorded rows of its detections' proposals, for a predictor
        that attached its own (one image of output per pooled image).
        """
        if self.source_problem:
            raise ValueError(self.source_problem)
        if self.proposal_boxes is None or len(self.proposal_boxes) != len(instances):
            raise self.error("its outputs are not one per image its box pooler received")
        rows = self.rows.split([len(b) for b in self.proposal_boxes])
        return [r[x.proposal_index] for r, x in zip(rows, instances)]

    def select_image(self, boxes, scores, image_shape, score_thresh, nms_thresh, topk_per_image):
        """The stand-in for ``fast_rcnn_inference_single_image`` while the head records."""
        count = len(boxes)
        if self.source_problem:
            raise ValueError(self.source_problem)
        if self.rows is None:
            raise self.error("its selection ran before any call of its box predictor")
        if self.offset + count > len(self.rows):
            raise self.error(
                f"its selection saw more proposals than the {len(self.rows)} rows its box "
                "predictor's last call had"
            )
        proposal_boxes = None
        if self.proposal_boxes is not None and self.image < len(self.proposal_boxes):
            proposal_boxes = self.proposal_boxes[self.image]
        if self.settings.needs_proposal_boxes and (
            proposal_boxes is None or len(proposal_boxes) != count
        ):
            raise self.error(
                f'SELECTION "{self.settings.selection}" needs the proposal boxes of image '
                f"{self.image}, which its box pooler did not receive"
            )
        rows = slice(self.offset, self.offset + count)
        result, kept = self.settings.select_image(
            self.image, boxes, scores, proposal_boxes, image_shape, score_thresh, nms_thresh,
            topk_per_image,
        )
        attr_probs = self.attr_probs[rows] if self.attr_probs is not None else None
        self.settings.attach_region_fields(result, kept, self.rows[rows], scores, attr_probs)
        self.offset += count
        self.image += 1
        self.selections += 1
        return result, kept


class RegionFeatureHeadsMixin:
    """
    What every region-feature head adds to its ROI heads base (see the module doc).

    Construction takes the base's own arguments: ``(cfg, input_shape)`` (yacs; the settings
    then come from ``MODEL.REGION_FEATURES``) or keyword arguments (LazyConfig, direct), plus
    these keywords:

    Args:
        region_source: "box_head" (the predictor input) or "pooled" (the ROI-pooled map
            averaged over its cells).
        pool_at: "proposal" (the feature of the proposal behind a region) or "final"
            (pooled again at the region's final box).
        source_module: "" or a dotted module path under the heads whose output rows are
            the features.
        region_selection (dict): the selection settings of :class:`RegionSettings`, used
            when the box predictor is not a :class:`FeatureFastRCNNOutputLayers` (which
            holds its own).
    """

    def __init__(self, *args, region_source="box_head", pool_at="proposal", source_module="",
                 region_selection=None, **kwargs):
        cfg = args[0] if args and isinstance(args[0], CfgNode) else kwargs.get("cfg")
        if isinstance(cfg, CfgNode):
            node = region_features_node(cfg)
            region_source, pool_at, source_module = node.SOURCE, node.POOL_AT, node.SOURCE_MODULE
            region_selection = region_selection_settings(cfg)
            check_config_meta_architecture(cfg)
            register_vocabularies(cfg)
        check_region_settings(region_source=region_source, pool_at=pool_at)
        super().__init__(*args, **kwargs)
        self.region_source = region_source
        self.pool_at = pool_at
        self.source_module = source_module
        if not isinstance(getattr(self, "box_predictor", None), nn.Module):
            raise ValueError(
                f"{type(self).__name__}: region features need a box_predictor module (or a "
                "ModuleList of them, one per stage) whose input rows are the proposals"
            )
        if isinstance(cfg, CfgNode):
            self._use_feature_predictors(cfg)
        self._settings = None
        if not isinstance(self.feature_predictor, RegionSelection):
            if cfg is not None and cfg.MODEL.get("ATTRIBUTE_ON", False):
                raise ValueError(
                    f"{type(self).__name__}: MODEL.ATTRIBUTE_ON needs a stock box predictor to "
                    f"extend; {type(self.feature_predictor).__name__} is kept as it is"
                )
            self._settings = RegionSettings(**(region_selection or {}))
        self._check_sources()
        register_checkpoint_conversion(self)

    def _use_feature_predictors(self, cfg):
        """Swap a stock FastRCNNOutputLayers (the last stage's in a cascade) for the Feature one."""
        predictors = self.box_predictor
        if isinstance(predictors, nn.ModuleList):
            if type(predictors[-1]) is FastRCNNOutputLayers:
                predictors[-1] = feature_predictor_like(cfg, predictors[-1])
        elif type(predictors) is FastRCNNOutputLayers:
            self.box_predictor = feature_predictor_like(cfg, predictors)

    def _check_sources(self):
        name = type(self).__name__
        if self.source_module:
            if self.region_source != "box_head" or self.pool_at != "proposal":
                raise ValueError(
                    f"{name}: MODEL.REGION_FEATURES.SOURCE_MODULE {self.source_module!r} takes the "
                    "module's output as it is; SOURCE must be box_head and POOL_AT proposal"
                )
            try:
                self.get_submodule(self.source_module)
            except AttributeError:
                raise ValueError(
                    f"MODEL.REGION_FEATURES.SOURCE_MODULE {self.source_module!r} is not a module "
                    f"of {name}"
                ) from None
        if (self.region_source == "pooled" or self.pool_at == "final") and self._box_family() is None:
            raise ValueError(
                f"{name}: SOURCE pooled and POOL_AT final need a known box pooler and box head "
                "(StandardROIHeads, Res5ROIHeads, CascadeROIHeads or a subclass)"
            )

    def _box_family(self):
        for family in (CascadeROIHeads, StandardROIHeads, Res5ROIHeads):
            if isinstance(self, family):
                return family
        return None

    @property
    def feature_predictor(self):
        """The box predictor whose call makes the detections (the last stage's)."""
        return _predictors(self)[-1]

    @property
    def region_selection(self) -> RegionSelection:
        """The settings that select the output regions."""
        return self._settings if self._settings is not None else self.feature_predictor

    @contextmanager
    def output_shapes(self, shapes):
        """The images' original sizes for "butd" selection (see :class:`RegionSelection`)."""
        with self.region_selection.output_shapes(shapes):
            yield

    def region_fields(self) -> RegionFields:
        """What every output ``Instances`` carries (see :mod:`d2_regionfeat.modeling.outputs`)."""
        predictor, settings = self.feature_predictor, self.region_selection
        feature_dim = None  # "pooled", SOURCE_MODULE: what the first call tells
        if self.region_source == "box_head" and not self.source_module:
            feature_dim = getattr(getattr(predictor, "cls_score", None), "in_features", None)
        with_attributes = getattr(predictor, "attribute_on", False)
        return RegionFields(
            feature_dim=feature_dim,
            num_classes=predictor.num_classes,
            class_probs=settings.class_probs,
            num_attributes=predictor.attr_score.out_features - 1 if with_attributes else 0,
            selection=settings.selection,
            **getattr(predictor, "attribute_outputs", {}),
        )

    def forward(self, images, features, proposals, *args, **kwargs):
        if self.training:
            return super().forward(images, features, proposals, *args, **kwargs)
        # the box path (which makes the region features, scores and boxes) in float32
        with float32_regions(features) as features, self._recording() as recorder:
            instances, losses = super().forward(images, features, proposals, *args, **kwargs)
            self._check_outputs(recorder, instances)
            self._finish_region_features(features, recorder, instances)
        return instances, losses

    @contextmanager
    def _recording(self):
        recorder = _Recorder(self)
        handles = [p.register_forward_hook(recorder.on_predictor) for p in _predictors(self)]
        pooler = _pooler(self)
        if pooler is not None:
            handles.append(pooler.register_forward_pre_hook(recorder.on_pool))
        if self.source_module:
            handles.append(
                self.get_submodule(self.source_module).register_forward_hook(recorder.on_source)
            )
        outer = getattr(_recording, "recorder", None)
        _recording.recorder = recorder
        try:
            yield recorder
        finally:
            _recording.recorder = outer
            for handle in handles:
                handle.remove()

    def _check_outputs(self, recorder, instances):
        if recorder.calls == 0:
            raise recorder.error("its box predictor was never called")
        if any(not x.has("box_features") for x in instances):
            raise recorder.error(
                "its detections never went through fast_rcnn_inference or its predictor's "
                "inference"
            )

    def _pool(self, features, boxes):
        if self._box_family() is Res5ROIHeads:
            return self.pooler([features[f] for f in self.in_features], boxes)
        return self.box_pooler([features[f] for f in self.box_in_features], boxes)

    def _head(self, pooled):
        """(R, C, S, S) pooled map -> (R, D) predictor input, for the known families."""
        family = self._box_family()
        if family is Res5ROIHeads:
            return self.res5(pooled).mean(dim=[2, 3])
        box_head = self.box_head[-1] if family is CascadeROIHeads else self.box_head
        return box_head(pooled).flatten(1)

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

    def _finish_region_features(self, features, recorder, instances):
        """Replace the recorded ``box_features`` where the config asks for other ones."""
        if self.source_module and recorder.selections == 0:  # the predictor selected itself
            for x, rows in zip(instances, recorder.source_rows_of(instances)):
                x.box_features = rows
            return
        if self.pool_at == "final":
            boxes = [x.pred_boxes for x in instances]
        elif self.region_source == "pooled":
            proposals = recorder.proposal_boxes
            if proposals is None or len(proposals) != len(instances):
                raise recorder.error("SOURCE pooled: its outputs are not one per pooled image")
            boxes = [p[x.proposal_index] for p, x in zip(proposals, instances)]
        else:
            return
        region_features = self.region_features(features, boxes)
        for x, feats in zip(instances, region_features.split([len(x) for x in instances])):
            x.box_features = feats

    def forward_with_given_boxes(self, features, instances: List[Instances], *args, **kwargs):
        """
        As the base (masks, keypoints, ... for the given ``pred_boxes``); given boxes that
        come without region fields (``model.inference(inputs, detected_instances=...)``)
        first get them from the box head and predictor, without the RPN:

        * ``box_features`` (M, D) as configured by ``region_source``;
        * ``class_probs`` (M, K+1) from the predictor (the last stage's for Cascade);
        * ``proposal_index`` (M,): the row among the given boxes;
        * ``pred_classes`` and ``scores``, where missing: the most probable foreground class
          and its probability;
        * with the attribute head: ``attr_probs``, ``attrs_id``, ``attrs_conf``.
        """
        recorder = getattr(_recording, "recorder", None)
        describe = recorder is None or recorder.heads is not self  # not the detections' own
        if describe and instances and not instances[0].has("box_features"):
            if self._box_family() is None or not isinstance(
                self.feature_predictor, FeatureFastRCNNOutputLayers
            ):
                raise ValueError(
                    f"{type(self).__name__}: features of given boxes need a known box pooler and "
                    "box head and a FeatureFastRCNNOutputLayers predictor"
                )
            with float32_regions(features) as float_features:
                self._describe_given_boxes(float_features, instances)
        return super().forward_with_given_boxes(features, instances, *args, **kwargs)

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


_FEATURE_CLASSES = {}


def region_feature_heads(base: type) -> type:
    """
    The region-feature version ``Feature<Base>`` of the ROI heads class ``base`` (made once
    per class; a region-feature class is returned as it is).
    """
    if issubclass(base, RegionFeatureHeadsMixin):
        return base
    if base not in _FEATURE_CLASSES:
        name = f"Feature{base.__name__}"
        cls = type(
            name,
            (RegionFeatureHeadsMixin, base),
            {"__module__": __name__, "__doc__": f":class:`{base.__name__}` giving region features."},
        )
        module = sys.modules[__name__]
        if not hasattr(module, name):  # locatable by its dotted name (LazyConfig.save, pickle)
            setattr(module, name, cls)
        _FEATURE_CLASSES[base] = cls
    return _FEATURE_CLASSES[base]


def register_region_feature_heads(base: type):
    """Class decorator: the decorated class is ``region_feature_heads(base)``."""

    def register(cls):
        _FEATURE_CLASSES[base] = cls
        return cls

    return register
