"""
The BUTA.pt configs (configs/BUTA) at reduced depth and narrow widths: a checkpoint in
BUTA.pt's key layout (as its detectron2 v0.2.1 saved it) loads with nothing missing, unused or
skipped, and the model's regions equal a plain-PyTorch restatement of BUTA.pt's forward and
extraction (buta_network.py): count, order, boxes, classes, features, attributes.
"""
import os

import numpy as np
import pytest
import torch

import buta_network as net
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from helpers import assert_scaled_close

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = (8, 32, 8)  # stem, res2 out, res2 bottleneck
K, A, EMBED, HIDDEN, RPN_DIM = 6, 5, 16, 32, 64
SHORT, MAX_SIZE = 96, 160
VERSIONS = {"caffe-r101": 1, "caffe-r101-fix36": 1, "caffe-r152": 2}


def narrow_cfg(name):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "BUTA", f"{name}.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    r = cfg.MODEL.RESNETS
    r.DEPTH = 50  # reduced depth: res2..res4 = 3, 4, 6 blocks
    r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, r.WIDTH_PER_GROUP = WIDTHS
    cfg.MODEL.RPN.CONV_DIMS = [RPN_DIM]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = K
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES = A
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.EMBED_DIM = EMBED
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.HIDDEN_DIM = HIDDEN
    cfg.MODEL.BUTA.TEST_SCALE, cfg.MODEL.BUTA.TEST_MAX_SIZE = SHORT, MAX_SIZE
    return cfg


def tamed_state_dict(version):
    """buta_state_dict with its RPN and predictor weights scaled to the features they see on
    a sample input: spread objectness probabilities, small anchor deltas, class and attribute
    probabilities neither flat nor saturated."""
    sd = net.buta_state_dict(version, WIDTHS, K + 1, A + 1, EMBED, HIDDEN, RPN_DIM)
    g = torch.Generator().manual_seed(1)
    sample = torch.rand(1, 3, SHORT, SHORT * 4 // 3, generator=g) * 255 - 115
    with torch.no_grad():
        res4 = net.backbone(sample, sd, version)
        p = "proposal_generator.rpn_head."
        sd[p + "conv.weight"] /= float(res4.std())
        t = torch.relu(torch.nn.functional.conv2d(res4, sd[p + "conv.weight"], sd[p + "conv.bias"], padding=1))
        for key, std in (("objectness_logits", 2.0), ("anchor_deltas", 0.15)):
            out = torch.nn.functional.conv2d(t, sd[p + key + ".weight"])
            sd[p + key + ".weight"] *= std / float(out.std())
        box = torch.tensor([[0.0, 0.0, 0.0, sample.shape[-1] - 1.0, sample.shape[-2] - 1.0]])
        feats = net.res5(net.roi_pool(res4, box, (14, 14), 1.0 / 16), sd, version).mean(dim=[2, 3])
    rms = float(feats.pow(2).mean().sqrt())
    q = "roi_heads.box_predictor."
    sd[q + "cls_score.weight"] *= 2.5 / rms
    sd[q + "attr_linear1.weight"] *= 1.0 / rms
    sd[q + "attr_linear2.weight"] *= 3.0
    return sd


def images():
    """(H, W, 3) BGR uint8: one downscaled (0.8), one capped by MAX_SIZE and upscaled
    (160 / 150, sides rounded)."""
    g = np.random.default_rng(3)
    smooth = [np.kron(g.integers(0, 256, (h // 10, w // 10, 3)), np.ones((10, 10, 1)))
              for h, w in ((120, 160), (70, 150))]
    return [(s + g.integers(-20, 20, s.shape)).clip(0, 255).astype(np.uint8) for s in smooth]


@pytest.fixture(scope="module", params=sorted(VERSIONS))
def loaded(request, tmp_path_factory):
    name = request.param
    sd = tamed_state_dict(VERSIONS[name])
    path = tmp_path_factory.mktemp("buta") / f"{name}.pth"
    # BUTA.pt's checkpoints come either way: {"model": ...} or the plain state dict
    torch.save({"model": dict(sd)} if name != "caffe-r152" else dict(sd), path)
    torch.manual_seed(0)
    cfg = narrow_cfg(name)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(path))
    return name, cfg, model, sd


def test_checkpoint_loads_every_key_converted(loaded):
    name, _, model, sd = loaded
    own = model.state_dict()
    q = "roi_heads.box_predictor."
    # background / "no attribute" row 0 there, last here; bbox_pred kept with its 4 rows
    torch.testing.assert_close(own[q + "cls_score.weight"][-1], sd[q + "cls_score.weight"][0])
    torch.testing.assert_close(own[q + "cls_score.bias"][:-1], sd[q + "cls_score.bias"][1:])
    torch.testing.assert_close(own[q + "cls_embedding.weight"][0], sd[q + "cls_embed.weight"][1])
    torch.testing.assert_close(own[q + "fc_attr.weight"], sd[q + "attr_linear1.weight"])
    torch.testing.assert_close(own[q + "attr_score.bias"][-1], sd[q + "attr_linear2.bias"][0])
    torch.testing.assert_close(own[q + "bbox_pred.weight"], sd[q + "bbox_pred.weight"])
    if VERSIONS[name] == 2:
        torch.testing.assert_close(own["roi_heads.res5.norm.running_var"], sd["roi_heads.res5_bn.running_var"])
        torch.testing.assert_close(own["backbone.stem.norm.weight"], sd["backbone.stem.norm.weight"])
    saved = {k for k in sd if not k.endswith("num_batches_tracked") and "cell_anchors" not in k}
    assert len(own) == len(saved)


@pytest.mark.parametrize("change", ["missing", "extra", "anchors", "depth"])
def test_partial_or_foreign_checkpoint_is_a_one_line_error(loaded, change, tmp_path):
    name, cfg, model, sd = loaded
    bad = dict(sd)
    if change == "missing":
        del bad["backbone.res3.2.conv2.norm.running_var"]
    elif change == "extra":
        bad["backbone.res4.6.conv1.weight"] = bad["backbone.res4.5.conv1.weight"]
    elif change == "anchors":
        bad["proposal_generator.anchor_generator.cell_anchors.0"] = bad["proposal_generator.anchor_generator.cell_anchors.0"] * 16
    else:  # a shape detectron2's checkpointer skips before any hook: reported, not kept random
        bad["roi_heads.box_predictor.fc_attr.weight"] = bad.pop("roi_heads.box_predictor.attr_linear1.weight")[:, 1:]
        path = tmp_path / "bad.pth"
        torch.save({"model": bad}, path)
        with pytest.raises(ValueError, match="^BUTA.pt checkpoint: .*fc_attr.weight") as info:
            DetectionCheckpointer(model).load(str(path))
        assert "\n" not in str(info.value)
        return
    with pytest.raises(ValueError, match="^BUTA.pt checkpoint") as info:
        model.load_state_dict(bad, strict=False)
    assert "\n" not in str(info.value)


def test_buta_checkpoint_into_another_model_is_an_error():
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "VG", "faster_rcnn_R_101_C4_attr_butd.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    narrow = narrow_cfg("caffe-r101")
    for key in ("RESNETS", "ROI_ATTRIBUTE_HEAD"):
        cfg.MODEL[key] = narrow.MODEL[key]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = K
    model = build_model(cfg)
    with pytest.raises(ValueError, match='^BUTA.pt checkpoint: load it into .*"BUTARCNN"'):
        model.load_state_dict(tamed_state_dict(1), strict=False)


@pytest.mark.equality
@torch.no_grad()
def test_regions_equal_the_restatement(loaded):
    name, cfg, model, sd = loaded
    node = cfg.MODEL.REGION_FEATURES
    version = VERSIONS[name]
    for image in images():
        ref = net.run(sd, image, version, list(cfg.MODEL.PIXEL_MEAN), SHORT, MAX_SIZE,
                      min_boxes=node.MIN_BOXES, max_boxes=node.MAX_BOXES)
        # the row count is the selection's, not a bound hit by too few proposals
        assert len(ref["proposals"]) > node.MAX_BOXES or len(ref["x"]) < len(ref["proposals"])
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        h, w = image.shape[:2]
        out = model([{"image": tensor, "height": h, "width": w}])[0]["instances"]
        assert out.image_size == (h, w)
        assert len(out) == len(ref["x"]) > 0
        # rows tied in max_conf (proposals with the same ROIPool cells, or 0 where no class
        # keeps them) are taken in an order of the sort's choosing, there and here: a tied row
        # is compared with the tied proposal nearest to it (proposal order has no such choice)
        max_conf, kept = ref["max_conf"], ref["kept"].clone()
        by_score = not node.MIN_BOXES <= int((max_conf >= node.CONF_THRESH).sum()) <= node.MAX_BOXES
        dets = ref["proposals"] / ref["scale"]
        for i, row in enumerate(ref["kept"]):
            candidates = (max_conf == max_conf[row]).nonzero()[:, 0]
            if by_score and len(candidates) > 1:
                distance = (dets[candidates] - out.pred_boxes.tensor[i]).abs().max(dim=1).values
                kept[i] = candidates[distance.argmin()]
        assert_scaled_close(out.pred_boxes.tensor, dets[kept])
        assert_scaled_close(out.box_features, ref["feats"][kept])
        if not by_score or torch.equal(kept, ref["kept"]):
            assert torch.equal(out.pred_classes, ref["objects_id"])
            assert_scaled_close(out.scores, ref["objects_conf"])
            assert torch.equal(out.attrs_id, ref["attrs_id"])
            assert_scaled_close(out.attrs_conf, ref["attrs_conf"])
        else:  # classes and attributes follow the features: checked on the untied rows
            same = kept == ref["kept"]
            assert torch.equal(out.pred_classes[same], ref["objects_id"][same])
            assert_scaled_close(out.scores[same], ref["objects_conf"][same])
            assert torch.equal(out.attrs_id[same], ref["attrs_id"][same])
            assert_scaled_close(out.attrs_conf[same], ref["attrs_conf"][same])


def test_input_rule_is_get_image_blobs():
    from d2_regionfeat.modeling.buta import buta_input_scale, resize_by_scale

    g = torch.Generator().manual_seed(0)
    for (h, w), short, max_size in (((120, 160), 96, 160), ((70, 150), 96, 160), ((33, 47), 600, 1000)):
        scale = buta_input_scale(h, w, short, max_size)
        assert scale == net.image_scale(h, w, short, max_size)
        image = torch.randn(3, h, w, generator=g, dtype=torch.float64) * 50
        assert_scaled_close(resize_by_scale(image, scale), net.cv2_linear_resize(image, scale), rel=1e-9)
