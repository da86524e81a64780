"""
d2_regionfeat: region features from detectron2 detectors, through config keys alone.

Importing this package registers the Feature ROI heads and box predictors, the backbones
(the narrow ResNet-FPN of the shipped default model, the caffe max-pool ResNet of
bottom-up-attention) and the RegionFeatureRCNN meta-architecture, and adds the
``MODEL.REGION_FEATURES``, ``MODEL.ATTRIBUTE_ON`` and ``MODEL.ROI_ATTRIBUTE_HEAD`` keys to
detectron2's default config.

The package has three parts: the model side in :mod:`d2_regionfeat.modeling`, extraction at
dataset scale in :mod:`d2_regionfeat.extraction`, and the on-disk layouts in
:mod:`d2_regionfeat.formats` (read back through :mod:`d2_regionfeat.io`).
"""
from detectron2.config.defaults import _C as _detectron2_defaults

from . import modeling
from .modeling import *  # noqa: F401,F403  (the model side's public names)

add_regionfeat_config(_detectron2_defaults)  # noqa: F405

__all__ = modeling.__all__
