"""LazyConfig: detectron2's Mask R-CNN R50-FPN with region features (FeatureROIHeads)."""
from detectron2 import model_zoo

from d2_regionfeat import enable_region_features

# roi_heads._target_ -> FeatureROIHeads, box_predictor._target_ -> FeatureFastRCNNOutputLayers,
# every other argument kept; the same call works on any LazyConfig with model.roi_heads.
model = enable_region_features(model_zoo.get_config("common/models/mask_rcnn_fpn.py")).model
model.roi_heads.region_source = "box_head"  # or "pooled"
model.roi_heads.pool_at = "proposal"  # or "final"
model.roi_heads.source_module = ""  # or e.g. "box_head.fc1"
model.roi_heads.box_predictor.class_probs = True
model.roi_heads.box_predictor.selection = "detections"  # or "regions"
