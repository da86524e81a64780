"""grid-feats-vqa's checkpoints and config keys on our heads (configs/grid/)."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2_regionfeat.modeling.config import attribute_head_node
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from helpers import image
from test_grid import CONFIGS, narrow_grid_cfg


def add_attribute_config(cfg):
    """What grid-feats-vqa's grid_feats/config.py add_attribute_config does to a config."""
    cfg.MODEL.ATTRIBUTE_ON = False
    cfg.INPUT.MAX_ATTR_PER_INS = 16
    cfg.MODEL.ROI_ATTRIBUTE_HEAD = CN({"OBJ_EMBED_DIM": 256, "FC_DIM": 512, "LOSS_WEIGHT": 0.2, "NUM_CLASSES": 400})
    cfg.MODEL.RPN.BBOX_LOSS_WEIGHT = 1.0
    cfg.MODEL.ROI_BOX_HEAD.BBOX_LOSS_WEIGHT = 1.0


class AttributePredictor(nn.Module):
    """grid-feats-vqa's AttributePredictor (grid_feats/roi_heads.py), restated: its modules and forward."""

    def __init__(self, num_classes, input_dim, embed_dim, fc_dim, num_attributes):
        super().__init__()
        self.obj_embed = nn.Embedding(num_classes + 1, embed_dim)
        self.fc = nn.Sequential(nn.Linear(input_dim + embed_dim, fc_dim), nn.ReLU())
        self.attr_score = nn.Linear(fc_dim, num_attributes)

    def forward(self, x, obj_labels):
        return self.attr_score(self.fc(torch.cat((x, self.obj_embed(obj_labels)), dim=1)))


def grid_feats_state_dict(model, predictor):
    """A checkpoint in its key layout: the detectron2 modules' keys, its attribute head's."""
    ours = tuple(f"roi_heads.box_predictor.{name}." for name in ("cls_embedding", "fc_attr", "attr_score"))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(ours)}
    state.update({f"roi_heads.attribute_predictor.{k}": v for k, v in predictor.state_dict().items()})
    return state


@pytest.fixture(scope="module")
def ported():
    cfg = narrow_grid_cfg()
    cfg.MODEL.REGION_FEATURES.CLASS_PROBS = True
    torch.manual_seed(1)
    source = build_model(cfg).eval()  # random detectron2 weights, as its checkpoint's
    node = attribute_head_node(cfg)
    torch.manual_seed(2)
    predictor = AttributePredictor(5, 64, node.EMBED_DIM, node.HIDDEN_DIM, node.NUM_ATTRIBUTES).eval()
    with torch.no_grad():
        predictor.attr_score.weight.normal_(std=0.3)
        predictor.attr_score.bias.normal_()
    state = grid_feats_state_dict(source, predictor)
    assert any(k.startswith("roi_heads.attribute_predictor.fc.0.") for k in state)
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)  # nothing missing/unexpected
    return model, predictor


def test_checkpoint_loads_with_nothing_missing_or_unexpected(ported, tmp_path, caplog):
    import logging

    from detectron2.checkpoint import DetectionCheckpointer

    model, predictor = ported
    path = tmp_path / "grid_feats.pth"
    torch.save({"model": grid_feats_state_dict(model, predictor)}, path)
    torch.manual_seed(4)
    fresh = build_model(narrow_grid_cfg()).eval()
    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(fresh).load(str(path))
    # fvcore warns of missing, unused and skipped (other shape) keys: none
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    expected = model.state_dict()
    loaded = fresh.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_attributes_equal_its_head_restated(ported):
    model, predictor = ported
    with torch.no_grad():
        (out,) = model([{"image": image(7, 200, 280)}])
        res = out["instances"]
        assert len(res) > 0
        classes = res.class_probs.argmax(dim=1)  # our head's class: argmax over K+1 (see attributes.py)
        expected = F.softmax(predictor(res.box_features, classes), dim=1)
    torch.testing.assert_close(res.attr_probs[:, :-1], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(res.attr_probs[:, -1], torch.zeros(len(res)))  # no "no attribute" in its head


def test_its_attribute_keys_are_aliases_of_ours():
    cfg = get_cfg()
    add_attribute_config(cfg)  # after ours (importing d2_regionfeat added them): its node replaces ours
    cfg.merge_from_file(os.path.join(CONFIGS, "grid", "R-50-grid.yaml"))
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES = 7
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.FC_DIM = 24
    node = attribute_head_node(cfg)
    assert (node.NUM_ATTRIBUTES, node.EMBED_DIM, node.HIDDEN_DIM, node.LOSS_WEIGHT) == (7, 256, 24, 0.2)
    assert node.MAX_ATTRIBUTES_PER_INSTANCE == 16
    from d2_regionfeat.modeling.config import add_regionfeat_config

    add_regionfeat_config(cfg)  # ours after its: its node stays, read through the aliases
    assert attribute_head_node(cfg).NUM_ATTRIBUTES == 7


def test_a_key_in_both_spellings_with_two_values_is_a_clash():
    cfg = get_cfg()
    cfg.MODEL.ATTRIBUTE_ON = True
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES = 300
    with pytest.raises(ValueError, match=r"NUM_ATTRIBUTES \(400\) and grid-feats-vqa's NUM_CLASSES \(300\) clash"):
        attribute_head_node(cfg)


def test_other_attribute_count_is_a_one_line_error(ported):
    model, predictor = ported
    state = grid_feats_state_dict(model, predictor)
    state["roi_heads.attribute_predictor.attr_score.weight"] = state["roi_heads.attribute_predictor.attr_score.weight"][:3]
    state["roi_heads.attribute_predictor.attr_score.bias"] = state["roi_heads.attribute_predictor.attr_score.bias"][:3]
    with pytest.raises(ValueError, match="checkpoint scores 3 attributes; MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES is 4"):
        model.load_state_dict(state)


@pytest.mark.parametrize("name", ["X-152-grid", "X-152-challenge"])
def test_x152_configs_build_and_give_a_finite_grid(name):
    """The X-152 configs as they are (ResNeXt-152 32x8d; the challenge one deformable in res4
    and res5), random weights, through DefaultPredictor on a small image."""
    import numpy as np
    from detectron2.engine import DefaultPredictor
    from detectron2.layers import DeformConv
    from detectron2.modeling.backbone.resnet import DeformBottleneckBlock

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, "grid", f"{name}.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96  # the cost: a 64 x 96 input
    torch.manual_seed(0)
    predictor = DefaultPredictor(cfg)
    backbone = predictor.model.backbone
    assert [len(backbone.res2), len(backbone.res3), len(backbone.res4)] == [3, 8, 36]
    assert len(predictor.model.roi_heads.box_head.fc1.weight) == 1024
    deformable = [isinstance(stage[0], DeformBottleneckBlock) for stage in (backbone.res2, backbone.res3, backbone.res4, backbone.res5)]
    assert deformable == ([False, False, True, True] if name == "X-152-challenge" else [False] * 4)
    block = backbone.res5[0]
    assert (block.conv2.groups, block.conv2.out_channels) == (32, 2048)
    assert isinstance(block, DeformBottleneckBlock) == isinstance(block.conv2, DeformConv)
    bgr = (np.random.RandomState(0).rand(64, 96, 3) * 255).astype(np.uint8)
    with torch.no_grad():
        out = predictor(bgr)
    grid = out["grid"]
    assert tuple(grid["features"].shape) == (2048, 4, 6)  # res5 with dilation 2: stride 16
    assert tuple(grid["stride"]) == (16, 16) and tuple(grid["image_size"]) == (64, 96)
    assert torch.isfinite(grid["features"]).all() and grid["features"].abs().sum() > 0
    assert len(out["instances"]) > 0
