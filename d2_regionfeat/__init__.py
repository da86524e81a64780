"""
d2_regionfeat: region features from detectron2 detectors, through config keys alone.

Importing this package registers the Feature ROI heads and box predictors, the backbones
(the narrow ResNet-FPN of the shipped default model, the caffe max-pool ResNet of
bottom-up-attention) and the RegionFeatureRCNN meta-architecture, and adds the
``MODEL.REGION_FEATURES``, ``MODEL.ATTRIBUTE_ON`` and ``MODEL.ROI_ATTRIBUTE_HEAD`` keys to
detectron2's default config.
"""
from detectron2.config.defaults import _C as _detectron2_defaults

from .attributes import AttributeDatasetMapper
from .backbone import build_narrow_resnet_fpn_backbone
from .config import add_regionfeat_config
from .heads import FeatureCascadeROIHeads, FeatureRes5ROIHeads, FeatureROIHeads
from .meta_arch import RegionFeatureRCNN
from .predictor import (
    ROI_BOX_PREDICTOR_REGISTRY,
    FeatureFastRCNNOutputLayers,
    RegionPredictions,
    build_box_predictor,
)

add_regionfeat_config(_detectron2_defaults)

__all__ = [
    "add_regionfeat_config",
    "AttributeDatasetMapper",
    "RegionFeatureRCNN",
    "build_narrow_resnet_fpn_backbone",
    "FeatureROIHeads",
    "FeatureRes5ROIHeads",
    "FeatureCascadeROIHeads",
    "FeatureFastRCNNOutputLayers",
    "RegionPredictions",
    "ROI_BOX_PREDICTOR_REGISTRY",
    "build_box_predictor",
]
