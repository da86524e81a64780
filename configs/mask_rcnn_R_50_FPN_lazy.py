"""LazyConfig: detectron2's Mask R-CNN R50-FPN with the Feature ROI heads and predictor."""
from detectron2 import model_zoo

from d2_regionfeat import FeatureFastRCNNOutputLayers, FeatureROIHeads

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.roi_heads._target_ = FeatureROIHeads
model.roi_heads.region_source = "box_head"  # or "pooled"
model.roi_heads.pool_at = "proposal"  # or "final"
model.roi_heads.box_predictor._target_ = FeatureFastRCNNOutputLayers
model.roi_heads.box_predictor.class_probs = True
model.roi_heads.box_predictor.selection = "detections"  # or "regions"
