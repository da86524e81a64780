"""
The VinVL config (configs/VinVL) at narrow widths: a checkpoint in maskrcnn-benchmark's key
layout loads completely, and the model equals a plain-PyTorch restatement of AttrRCNN
(vinvl_network.py) on it: res4, proposals, features, classes, boxes, attributes.
"""
import os

import numpy as np
import pytest
import torch

import vinvl_network as net
from d2_regionfeat.data.transforms import VinVLResize, vinvl_resize_shape
from d2_regionfeat.modeling.vinvl import legacy_cell_anchors
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "VinVL", "vinvl_vg_x152c4.yaml")
WIDTHS = (8, 32, 4, 2)  # stem, res2 out, groups, width per group: X152's 32x8d shape, narrow
K, A, EMBED, HIDDEN = 5, 7, 16, 32


def narrow_cfg():
    cfg = get_cfg()
    cfg.merge_from_file(CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    r = cfg.MODEL.RESNETS
    r.DEPTH = 50  # reduced depth: layer1..3 = 3, 4, 6 blocks
    r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, r.NUM_GROUPS, r.WIDTH_PER_GROUP = WIDTHS
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = K
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES = A
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.EMBED_DIM = EMBED
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.HIDDEN_DIM = HIDDEN
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 300
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    return cfg


def tamed_state_dict():
    """mb_state_dict with predictor weights scaled to the features (spread scores), and one
    anchor kind pushed off the right border (proposals clipped to zero width)."""
    sd = net.mb_state_dict(WIDTHS, K + 1, A + 1, EMBED, HIDDEN)
    g = torch.Generator().manual_seed(1)
    like_input = torch.rand(3, 128, 128, generator=g) * 255 - 115  # as normalised pixels
    sample = net.run(sd, like_input, WIDTHS[2], (128, 128))
    # distinct objectness probabilities (no sigmoid saturation), small anchor deltas
    sd["rpn.head.cls_logits.weight"] *= 2.0 / sample["logits"].std()
    sd["rpn.head.bbox_pred.weight"] *= 0.2 / sample["codes"].std()
    sd["rpn.head.bbox_pred.bias"][4 * 5] = 15.0  # anchor 5 (ratio 1, size 32): dx = +15 widths
    feats = net.run(sd, like_input, WIDTHS[2], (128, 128))["features"]
    rms = feats.pow(2).mean().sqrt()
    dim = feats.shape[1]
    for key, std in (("cls_score", 2.5), ("bbox_pred", 0.2)):
        sd[f"roi_heads.box.predictor.{key}.weight"] *= std / (rms * dim ** 0.5)
    sd["attribute.predictor.fc_attr.weight"] *= 3.0 / (rms * dim ** 0.5)
    sd["attribute.predictor.attr_score.weight"] *= 0.3
    return sd


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    sd = tamed_state_dict()
    path = tmp_path_factory.mktemp("vinvl") / "vinvl_narrow.pth"
    torch.save({"model": sd, "iteration": 7}, path)
    torch.manual_seed(0)
    model = build_model(narrow_cfg()).eval()
    DetectionCheckpointer(model).load(str(path))
    return model, sd


def test_checkpoint_loads_every_key_converted(loaded):
    model, sd = loaded
    own = model.state_dict()
    # one check per kind of rename / row move
    torch.testing.assert_close(own["backbone.stem.conv1.norm.running_var"], sd["backbone.body.stem.bn1.running_var"])
    torch.testing.assert_close(own["backbone.res4.0.shortcut.norm.bias"], sd["backbone.body.layer3.0.downsample.1.bias"])
    torch.testing.assert_close(own["roi_heads.res5.2.conv2.weight"], sd["roi_heads.box.feature_extractor.head.layer4.2.conv2.weight"])
    torch.testing.assert_close(own["proposal_generator.rpn_head.anchor_deltas.bias"], sd["rpn.head.bbox_pred.bias"])
    cls = sd["roi_heads.box.predictor.cls_score.weight"]
    torch.testing.assert_close(own["roi_heads.box_predictor.cls_score.weight"], torch.cat([cls[1:], cls[:1]]))
    torch.testing.assert_close(own["roi_heads.box_predictor.bbox_pred.weight"], sd["roi_heads.box.predictor.bbox_pred.weight"][4:])
    attr = sd["attribute.predictor.attr_score.bias"]
    torch.testing.assert_close(own["roi_heads.box_predictor.attr_score.bias"], torch.cat([attr[1:], attr[:1]]))
    # every model tensor came from the checkpoint: counted against the keys §4 derives
    backbone = sum(k.startswith("backbone.body.") for k in sd)
    res5 = sum(k.startswith("roi_heads.box.feature_extractor.") for k in sd)
    assert len(own) == backbone + res5 + 6 + 4 + 5  # rpn head, box predictor, attribute predictor


@pytest.mark.parametrize("change", ["missing", "extra", "shape", "anchors"])
def test_partial_or_foreign_checkpoint_is_a_one_line_error(loaded, change):
    model, sd = loaded
    bad = dict(sd)
    if change == "missing":
        del bad["backbone.body.layer2.3.bn2.running_var"]
    elif change == "extra":
        bad["backbone.body.layer3.6.conv1.weight"] = bad["backbone.body.layer3.5.conv1.weight"]
    elif change == "shape":
        bad["roi_heads.box.predictor.bbox_pred.weight"] = bad["roi_heads.box.predictor.bbox_pred.weight"][4:]
    else:
        bad["rpn.anchor_generator.cell_anchors.0"] = bad["rpn.anchor_generator.cell_anchors.0"] + 0.5
    with pytest.raises(ValueError, match="^VinVL checkpoint") as info:
        model.load_state_dict(bad, strict=False)
    assert "\n" not in str(info.value)


def test_legacy_anchors_and_resize_are_vinvls():
    assert torch.equal(legacy_cell_anchors(16, (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)), net.generate_anchors())
    # VINVL.md §1 examples (w x h -> h x w)
    for (w, h), expected in {(640, 480): (600, 800), (500, 333): (600, 900), (1280, 720): (562, 999),
                             (640, 427): (600, 899)}.items():
        assert vinvl_resize_shape(h, w, 600, 1000) == expected
        assert VinVLResize(600, 1000).get_transform(np.zeros((h, w, 3), np.uint8)).new_h == expected[0]


SIZES = [((149, 203), (298, 406)), ((187, 131), (187, 131))]  # odd long sides


@pytest.mark.equality
@pytest.mark.parametrize("box_mode", ["proposal", "regressed"])
@pytest.mark.parametrize("size, out_size", SIZES)
def test_network_equals_restatement(loaded, size, out_size, box_mode):
    model, sd = loaded
    g = torch.Generator().manual_seed(size[0])
    image = torch.rand(3, *size, generator=g) * 255
    seen = {}
    hooks = [
        model.backbone.register_forward_hook(lambda m, i, o: seen.update(res4=o["res4"])),
        model.proposal_generator.register_forward_hook(lambda m, i, o: seen.update(props=o[0][0])),
    ]
    model.roi_heads.box_predictor.region_box = box_mode
    try:
        with torch.no_grad():
            out = model([{"image": image, "height": out_size[0], "width": out_size[1]}])[0]["instances"]
    finally:
        model.roi_heads.box_predictor.region_box = "proposal"
        for h in hooks:
            h.remove()
    normalised = (image - model.pixel_mean) / model.pixel_std
    ref = net.run(sd, normalised, WIDTHS[2], out_size, ignore_box_regression=box_mode == "proposal")

    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen["res4"][0], ref["res4"][0], **tol)
    props = seen["props"].proposal_boxes.tensor
    torch.testing.assert_close(props, ref["proposals"], **tol)
    assert (props[:, 2] == props[:, 0]).any()  # proposals clipped to zero width are kept

    assert out.proposal_index.tolist() == ref["rows"].tolist()
    assert (out.pred_classes + 1).tolist() == ref["labels"].tolist()
    torch.testing.assert_close(out.scores, torch.from_numpy(ref["conf"]), **tol)
    torch.testing.assert_close(out.box_features, ref["features"][ref["rows"]], **tol)
    probs = ref["scores"][ref["rows"]]
    torch.testing.assert_close(out.class_probs, torch.cat([probs[:, 1:], probs[:, :1]], 1), **tol)
    torch.testing.assert_close(out.pred_boxes.tensor, ref["rect"], **tol)
    kept = ref["attr_scores"] > 0
    torch.testing.assert_close(out.attr_scores[:, : kept.shape[1]], ref["attr_scores"], **tol)
    assert torch.equal(out.attr_labels[:, : kept.shape[1]][kept] + 1, ref["attr_labels"][kept])
    assert (out.attr_labels[:, : kept.shape[1]][~kept] == -1).all()
    assert kept.any() and (~kept).any()
