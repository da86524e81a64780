"""The config node, its validation, and the shipped configs."""
import glob
import os

import pytest
import torch

import d2_regionfeat
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model

from helpers import image, make_cfg, tame

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAMLS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
MODEL_YAMLS = [p for p in YAMLS if not os.path.basename(p).startswith(("Base-", "region", "regions"))]


def test_import_adds_the_node_to_default_config():
    cfg = get_cfg()
    assert cfg.MODEL.REGION_FEATURES.SOURCE == "box_head"
    assert cfg.MODEL.REGION_FEATURES.SELECTION == "detections"
    d2_regionfeat.add_regionfeat_config(cfg)  # idempotent
    assert cfg.MODEL.REGION_FEATURES.PREDICTOR == "FeatureFastRCNNOutputLayers"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("SOURCE", "res5", "MODEL.REGION_FEATURES.SOURCE must be one of box_head, pooled; got 'res5'"),
        ("SELECTION", "all", "MODEL.REGION_FEATURES.SELECTION must be one of"),
        ("BOX", "gt", "MODEL.REGION_FEATURES.BOX must be one of"),
        ("POOL_AT", "image", "MODEL.REGION_FEATURES.POOL_AT must be one of"),
        ("CONF_THRESH", 1.5, "MODEL.REGION_FEATURES.CONF_THRESH must be within"),
        ("MIN_BOXES", -1, "MODEL.REGION_FEATURES.MIN_BOXES must be >= 0"),
        ("MAX_BOXES", 5, r"MODEL.REGION_FEATURES.MAX_BOXES \(5\) must be >= MIN_BOXES \(10\)"),
    ],
)
def test_bad_values_fail_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        build_model(make_cfg("fpn", **{key: value}))


def test_unknown_and_ill_typed_keys_fail_naming_the_key(tmp_path):
    cfg = get_cfg()
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  REGION_FEATURES:\n    SOURCES: pooled\n")
    with pytest.raises(KeyError, match="MODEL.REGION_FEATURES.SOURCES"):
        cfg.merge_from_file(str(bad))
    bad.write_text("MODEL:\n  REGION_FEATURES:\n    MIN_BOXES: many\n")
    with pytest.raises(ValueError, match="MODEL.REGION_FEATURES.MIN_BOXES"):
        cfg.merge_from_file(str(bad))


def test_unknown_predictor_name_fails_naming_it():
    with pytest.raises(KeyError, match="NoSuchPredictor"):
        build_model(make_cfg("fpn", predictor="NoSuchPredictor"))


def test_config_without_the_node_gets_a_clear_error():
    cfg = make_cfg("fpn")
    del cfg.MODEL["REGION_FEATURES"]
    with pytest.raises(ValueError, match="add_regionfeat_config"):
        build_model(cfg)


def small_cpu(cfg):
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.1
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
    return cfg


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=os.path.basename)
def test_shipped_yaml_configs_give_region_features(path):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    torch.manual_seed(0)
    model = tame(build_model(small_cpu(cfg)).eval())
    with torch.no_grad():
        outs = model([{"image": image(seed, 160, 200)} for seed in range(3)])
    for out in outs:
        res = out["instances"]
        assert res.has("box_features") and res.has("class_probs") and res.has("proposal_index")
    assert sum(len(out["instances"]) for out in outs) > 0


@pytest.mark.parametrize("overlay", ["region_features.yaml", "regions_bottom_up_36.yaml"])
def test_overlay_turns_an_existing_config_on(overlay):
    cfg = make_cfg("fpn", feature=False)
    cfg.merge_from_file(os.path.join(REPO, "configs", overlay))
    assert cfg.MODEL.ROI_HEADS.NAME == "FeatureROIHeads"
    torch.manual_seed(0)
    model = tame(build_model(cfg).eval())
    with torch.no_grad():
        (out,) = model([{"image": image(1, 160, 200)}])
    assert out["instances"].has("box_features")


def test_lazy_config_example():
    cfg = LazyConfig.load(os.path.join(REPO, "configs", "mask_rcnn_R_50_FPN_lazy.py"))
    cfg.model.roi_heads.num_classes = 3
    cfg.model.roi_heads.box_predictor.test_score_thresh = 0.1
    cfg.model.proposal_generator.post_nms_topk = (100, 100)
    torch.manual_seed(0)
    model = tame(instantiate(cfg.model).eval())
    assert type(model.roi_heads).__name__ == "FeatureROIHeads"
    with torch.no_grad():
        (out,) = model([{"image": image(1, 160, 200)}])
    res = out["instances"]
    assert len(res) > 0 and res.box_features.shape == (len(res), 1024)
    assert res.class_probs.shape == (len(res), 4)
