"""
The model side of d2_regionfeat: the ``MODEL.REGION_FEATURES`` / ``MODEL.ROI_ATTRIBUTE_HEAD``
config (:mod:`.config`), the Feature ROI heads (:mod:`.heads`) and box predictors
(:mod:`.predictor`), what they emit (:mod:`.outputs`), per-image selection (:mod:`.selection`), the attribute head
(:mod:`.attributes`), the backbones (:mod:`.backbone`), the meta-architecture
(:mod:`.meta_arch`), the ports' checkpoint hook (:mod:`.checkpoint`), vocabulary files
(:mod:`.vocabulary`), the legacy detectors' parts (:mod:`.vinvl`, :mod:`.buta`, :mod:`.legacy`), features of given boxes (:mod:`.given_boxes`) and the accounting of
dropped detections (:mod:`.explain`).

Importing it registers the heads, predictors, backbones and meta-architecture in detectron2's
registries.
"""
from .attributes import AttributeDatasetMapper
from .backbone import build_narrow_resnet_fpn_backbone, build_resnet_caffe_maxpool_backbone
from .config import add_regionfeat_config
from .enable import enable_region_features
from .heads import FeatureCascadeROIHeads, FeatureRes5ROIHeads, FeatureROIHeads
from .meta_arch import RegionFeatureRCNN
from .ports import grid_feats  # noqa: F401  (registers its checkpoint conversion)
from .outputs import RegionFields, region_fields
from .region_heads import region_feature_heads
from . import vinvl  # noqa: F401  (registers VinVL's legacy parts)
from .ports import vinvl as _vinvl_port  # noqa: F401  (registers its checkpoint conversion)
from . import buta  # noqa: F401  (registers BUTA.pt's parts)
from .ports import buta as _buta_port  # noqa: F401  (registers its checkpoint conversion)
from .predictor import (
    ROI_BOX_PREDICTOR_REGISTRY,
    FeatureFastRCNNOutputLayers,
    RegionPredictions,
    build_box_predictor,
)

__all__ = [
    "add_regionfeat_config",
    "enable_region_features",
    "region_feature_heads",
    "AttributeDatasetMapper",
    "RegionFeatureRCNN",
    "build_narrow_resnet_fpn_backbone",
    "build_resnet_caffe_maxpool_backbone",
    "FeatureROIHeads",
    "FeatureRes5ROIHeads",
    "FeatureCascadeROIHeads",
    "FeatureFastRCNNOutputLayers",
    "RegionPredictions",
    "RegionFields",
    "region_fields",
    "ROI_BOX_PREDICTOR_REGISTRY",
    "build_box_predictor",
]
