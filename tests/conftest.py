"""
Session-scoped models shared by the test modules: built and tamed once per session, not
once per module.
"""
from types import SimpleNamespace

import pytest
import torch

from detectron2.engine import DefaultPredictor
from helpers import build, make_cfg


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """
    The tools' model: a small tamed FPN model (ResNet-18, 36-region style selection) saved
    as yaml + weights, with its DefaultPredictor (tests/test_extract_net.py, test_formats.py,
    test_names.py; a module's own ``model`` fixture takes its place there).
    """
    folder = tmp_path_factory.mktemp("model")
    cfg = make_cfg("fpn", SELECTION="regions", MIN_BOXES=3, MAX_BOXES=8)
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 192
    torch.save({"model": build(cfg).state_dict()}, folder / "model.pth")
    cfg.MODEL.WEIGHTS = str(folder / "model.pth")
    (folder / "model.yaml").write_text(cfg.dump())
    return SimpleNamespace(cfg=cfg, yaml=folder / "model.yaml", predictor=DefaultPredictor(cfg))


