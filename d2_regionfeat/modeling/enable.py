"""Switch a config you trained with (yacs or LazyConfig) to its region-feature version."""
import copy

from detectron2.config import CfgNode
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

from .config import region_features_node
from .meta_arch import RegionFeatureRCNN, region_rcnn_setting
from .predictor import FeatureFastRCNNOutputLayers
from .region_heads import RegionFeatureHeadsMixin, region_feature_heads


def enable_region_features(cfg):
    """
    A copy of ``cfg`` whose model gives region features (``cfg`` itself is left alone).

    * yacs ``CfgNode``: ``MODEL.ROI_HEADS.NAME`` becomes ``FeatureROIHeads`` and
      ``MODEL.REGION_FEATURES.BASE_ROI_HEADS`` the head it named (any name in
      ``ROI_HEADS_REGISTRY``); with ``SELECTION: butd`` or ``GRID.ENABLED`` a plain
      ``GeneralizedRCNN`` becomes ``RegionFeatureRCNN``.
    * LazyConfig (an omegaconf ``DictConfig`` with ``model.roi_heads``): ``_target_`` of
      ``model.roi_heads`` becomes the region-feature version of its class, every argument
      kept; a stock ``FastRCNNOutputLayers`` predictor (the last stage's of a cascade)
      becomes ``FeatureFastRCNNOutputLayers``, same arguments; with ``selection="butd"`` a
      plain ``GeneralizedRCNN`` ``model._target_`` becomes ``RegionFeatureRCNN``.

    A config that already gives region features comes back unchanged (as a copy).

    Raises:
        ValueError: the config names no ROI heads, or a head not registered (one line).
    """
    if isinstance(cfg, CfgNode):
        return _enable_yacs(cfg.clone())
    return _enable_lazy(copy.deepcopy(cfg))


def _enable_yacs(cfg):
    name = cfg.MODEL.ROI_HEADS.NAME
    try:
        head = ROI_HEADS_REGISTRY.get(name)
    except KeyError:
        raise ValueError(f"MODEL.ROI_HEADS.NAME {name!r} is not in ROI_HEADS_REGISTRY") from None
    if not issubclass(head, RegionFeatureHeadsMixin):
        cfg.MODEL.ROI_HEADS.NAME = "FeatureROIHeads"
        cfg.MODEL.REGION_FEATURES.BASE_ROI_HEADS = name
    node = region_features_node(cfg)
    if region_rcnn_setting(node.SELECTION, node.GRID.ENABLED) and cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN":
        cfg.MODEL.META_ARCHITECTURE = "RegionFeatureRCNN"
    return cfg


def locate_target(target):
    """A LazyConfig ``_target_`` as the object it names (a dotted string located; else itself)."""
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        return locate(target)
    return target


def _enable_lazy(cfg):
    heads = cfg.get("model", {}).get("roi_heads") if hasattr(cfg, "get") else None
    if heads is None or "_target_" not in heads:
        raise ValueError("the LazyConfig has no model.roi_heads._target_ to give region features")
    heads._target_ = region_feature_heads(locate_target(heads._target_))
    node = lazy_box_predictor(heads)
    if node is not None and locate_target(node.get("_target_")) is FastRCNNOutputLayers:
        node._target_ = FeatureFastRCNNOutputLayers
    if region_rcnn_setting(_lazy_selection(heads)) and locate_target(cfg.model.get("_target_")) is GeneralizedRCNN:
        cfg.model._target_ = RegionFeatureRCNN
    return cfg


def lazy_box_predictor(heads):
    """
    The box predictor node of LazyConfig ROI heads that gives the outputs (a cascade's last
    stage's), or None where the heads name none.
    """
    node = heads["box_predictors"][-1] if "box_predictors" in heads else heads.get("box_predictor")
    return node if hasattr(node, "keys") else None


def is_feature_predictor(node) -> bool:
    """Whether a box predictor node (:func:`lazy_box_predictor`) is a FeatureFastRCNNOutputLayers."""
    return node is not None and locate_target(node.get("_target_")) is FeatureFastRCNNOutputLayers


def _lazy_selection(heads) -> str:
    """The selection of LazyConfig ROI heads: their Feature predictor's, else their ``region_selection``'s."""
    predictor = lazy_box_predictor(heads)
    if is_feature_predictor(predictor):
        return predictor.get("selection", "detections")
    return (heads.get("region_selection") or {}).get("selection", "detections")
