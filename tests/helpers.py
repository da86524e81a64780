"""Random-init detectron2 models for the tests: small inputs, fixed seeds, CPU."""
import contextlib

import numpy as np
import torch
import torchvision

import d2_regionfeat  # noqa: F401  (registers the heads, adds the config node)
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model

# kind -> (detectron2 model-zoo config, plain ROI head, Feature ROI head)
MODELS = {
    "fpn": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", "StandardROIHeads", "FeatureROIHeads"),
    "c4": ("COCO-Detection/faster_rcnn_R_50_C4_3x.yaml", "Res5ROIHeads", "FeatureRes5ROIHeads"),
    "cascade": ("Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml", "CascadeROIHeads", "FeatureCascadeROIHeads"),
    "keypoint": ("COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml", "StandardROIHeads", "FeatureROIHeads"),
}
NUM_CLASSES = 3


def make_cfg(kind="fpn", feature=True, **region_features):
    """A small CPU config of ``kind``; ``region_features`` set MODEL.REGION_FEATURES keys."""
    zoo_file, plain_head, feature_head = MODELS[kind]
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo_file))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NAME = feature_head if feature else plain_head
    if kind != "keypoint":
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.1
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 200
    cfg.INPUT.MIN_SIZE_TEST = 224
    cfg.INPUT.MAX_SIZE_TEST = 320
    for key, value in region_features.items():
        cfg.MODEL.REGION_FEATURES[key.upper()] = value
    return cfg


def narrow(cfg):
    """
    ``cfg`` with a narrow ResNet (res5: 256 channels), FPN and box head and few proposals:
    the same modules and code paths at a fraction of the cost (float64 tests run on it).
    """
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    return cfg


def _predictors(model):
    predictors = model.roi_heads.box_predictor
    return list(predictors) if isinstance(predictors, torch.nn.ModuleList) else [predictors]


@torch.no_grad()
def tame(model, logit_std=1.5, delta_std=0.1):
    """
    Rescale the box predictors of a random-init model (and its RPN deltas and keypoint
    logits) so that it gives spread, realistic detections instead of huge box deltas,
    near-certain scores and degenerate boxes: each predictor's weights are redrawn from the
    fixed generator and scaled by the size of the features it sees on a sample image.
    """
    rpn_deltas = model.proposal_generator.rpn_head.anchor_deltas
    rpn_deltas.weight.mul_(1e-2)
    rpn_deltas.bias.zero_()
    seen = {}

    def record_input(module, args, output):
        seen[module] = args[0].flatten(1)

    hooks = [p.register_forward_hook(record_input) for p in _predictors(model)]
    model([{"image": image(12345)}])
    for hook in hooks:
        hook.remove()
    for predictor in _predictors(model):
        feature_rms = seen[predictor].pow(2).mean().sqrt().clamp(min=1e-6)
        fan_in = predictor.cls_score.in_features
        for layer, std in ((predictor.cls_score, logit_std), (predictor.bbox_pred, delta_std)):
            layer.weight.normal_().mul_(std / (feature_rms * fan_in ** 0.5))
            layer.bias.zero_()
    if getattr(model.roi_heads, "keypoint_on", False):
        model.roi_heads.keypoint_head.score_lowres.weight.mul_(1e-3)
    return model


def build(cfg, seed=0, wild=False):
    """Build ``cfg`` from ``seed`` in eval mode, tamed unless ``wild``."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    return model if wild else tame(model)


def image(seed, height=200, width=280):
    """(3, H, W) float BGR image tensor with some structure (blobs on noise)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(height, width, 3)).astype(np.float32)
    for _ in range(6):
        y, x = rng.integers(0, height - 20), rng.integers(0, width - 20)
        h, w = rng.integers(20, height // 2), rng.integers(20, width // 2)
        img[y : y + h, x : x + w] = rng.integers(0, 256, size=3)
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


def inputs(*seeds_and_sizes):
    """model(inputs) dicts for (seed, height, width) triples."""
    return [{"image": image(s, h, w), "height": h, "width": w} for s, h, w in seeds_and_sizes]


# ---- equality in float64 -------------------------------------------------------------------
#
# A test that states two computations equal (batch vs single calls, ours vs a restatement)
# takes one of two forms, and says which:
# - "exact in float64": the model cast with ``float64(model)`` and fed float64 images, where
#   kernels of any CPU (oneDNN or not, AVX2 or AVX-512, 1 or 2 threads) round alike to ~1e-12,
#   so the tolerance stays tight (``assert_float64_close``);
# - "float32, tolerance of the tensor's scale": ``atol = 1e-4 * max|x|``, boxes in pixels.
# Either way a misaligned or swapped row differs by the scale of the rows and fails.


def _batched_nms_of_one_dtype(boxes, scores, idxs, iou_threshold, _batched_nms=torchvision.ops.boxes.batched_nms):
    # detectron2's batched_nms casts the boxes to float32 but not the scores, which
    # torchvision refuses; the kept set is that of the float32 values for both runs compared
    return _batched_nms(boxes.float(), scores.float(), idxs, iou_threshold)


@contextlib.contextmanager
def float64(model):
    """``model`` cast to float64 (and back to float32 after), its NMS fed one dtype."""
    saved = torchvision.ops.boxes.batched_nms
    torchvision.ops.boxes.batched_nms = _batched_nms_of_one_dtype
    try:
        yield model.double()
    finally:
        torchvision.ops.boxes.batched_nms = saved
        model.float()


def float64_inputs(batch):
    """``batch`` (model input dicts) with float64 images."""
    return [dict(x, image=x["image"].double()) for x in batch]


def assert_float64_close(actual, expected):
    """Equal to float64 rounding: within 1e-9 of the tensors' scale."""
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-9 * max(scale, 1.0))


def assert_scaled_close(actual, expected, rel=1e-4):
    """float32 rounding of another kernel path: within ``rel`` of the tensors' scale."""
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * max(scale, 1e-6))
