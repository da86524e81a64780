"""
The bottom-up-attention VG detector from configs/VG: the network against an independent
re-statement (butd_reference.py), the "butd" selection against generate_tsv.py's, and the
ports' checkpoints. The network is the VG config's with narrow widths (same depth, layout,
pooling and heads), random weights, CPU.
"""
import copy
import logging
import os
import pickle

import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

import butd_reference as ref
from d2_regionfeat.modeling.selection import select_butd
from helpers import assert_scaled_close, image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VG = os.path.join(REPO, "configs", "VG", "faster_rcnn_R_101_C4_attr_butd.yaml")
VG36 = os.path.join(REPO, "configs", "VG", "faster_rcnn_R_101_C4_attr_butd_36.yaml")
POST_NMS = 40


def vg_cfg(path=VG):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    # Narrow widths (res2 32 channels, res5 256) keep the test cheap; depth and layout stay.
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = POST_NMS
    return cfg


@torch.no_grad()
def randomize(model, seed=0):
    """Random frozen-BN statistics and a predictor spread enough to give varied outputs."""
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if type(module).__name__ == "FrozenBatchNorm2d":
            n = module.weight.numel()
            module.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            module.bias.copy_(torch.randn(n, generator=g) * 0.1)
            module.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    model.proposal_generator.rpn_head.anchor_deltas.weight.mul_(1e-2)
    predictor = model.roi_heads.box_predictor
    for layer, std in ((predictor.cls_score, 30.0), (predictor.bbox_pred, 0.1), (predictor.attr_score, 3.0)):
        fan_in = layer.weight.shape[1]
        layer.weight.normal_(generator=g).mul_(std / fan_in ** 0.5)
    return model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize(build_model(vg_cfg()).eval())


def test_vg_config_builds_the_butd_architecture(model):
    cfg = vg_cfg()
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1600
    assert cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES == 400
    assert type(model.backbone.stem).__name__ == "CaffeMaxPoolStem"
    assert type(model.roi_heads.pooler.level_poolers[0]).__name__ == "RoIPool"
    first = model.roi_heads.res5[0]
    assert first.conv1.stride == (1, 1) and first.shortcut.stride == (1, 1)
    assert all(b.conv2.dilation == (2, 2) and b.conv2.padding == (2, 2) for b in model.roi_heads.res5)
    predictor = model.roi_heads.box_predictor
    assert predictor.cls_embedding.weight.shape == (1601, 256)
    assert predictor.fc_attr.weight.shape == (512, 256 + 256)
    assert predictor.attr_score.weight.shape == (401, 512)
    assert predictor.cls_score.weight.shape[0] == 1601 and predictor.bbox_pred.weight.shape[0] == 6400
    assert vg_cfg(VG36).MODEL.REGION_FEATURES.MIN_BOXES == 36


@pytest.mark.parametrize("size", [(150, 200), (187, 133)])
def test_network_matches_independent_reimplementation(model, size):
    h, w = size
    img = image(7 + h, h, w)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    pixel = (img - model.pixel_mean) / model.pixel_std
    with torch.no_grad():
        feature = ref.res4(pixel, sd, 101)
        ours_feature = model.backbone(pixel[None])["res4"]
        assert_scaled_close(ours_feature, feature)
        boxes = ref.proposals(feature, sd, (h, w), 6000, POST_NMS, 0.7)
        images = model.preprocess_image([{"image": img}])
        (ours_proposals,), _ = model.proposal_generator(images, {"res4": ours_feature})
        assert_scaled_close(ours_proposals.proposal_boxes.tensor, boxes)
        expected = ref.head(feature, boxes, sd, 101)

        # Every proposal as a region (MIN_BOXES above the count): rows by proposal_index.
        predictor = model.roi_heads.box_predictor
        predictor.min_boxes = predictor.max_boxes = 1000
        try:
            (out,) = model([{"image": img}])
        finally:
            predictor.min_boxes, predictor.max_boxes = 10, 100
        res = out["instances"]
        assert len(res) == len(boxes) > 10
        idx = res.proposal_index
        assert_scaled_close(res.pred_boxes.tensor, boxes[idx])
        assert_scaled_close(res.box_features, expected["pool5"][idx])
        assert_scaled_close(res.class_probs, expected["class_probs"][idx])
        assert_scaled_close(res.attr_probs, expected["attr_probs"][idx])
        scores, deltas = predictor(res.box_features)[:2]
        regressed = predictor.box2box_transform.apply_deltas(deltas, res.pred_boxes.tensor)
        assert_scaled_close(regressed, expected["regressed"][idx])
        conf, ids = expected["attr_probs"][idx, :-1].max(dim=1)
        assert torch.equal(res.attrs_id, ids)
        assert_scaled_close(res.attrs_conf, conf)


def test_selection_end_to_end_is_generate_tsv(model):
    """Original size twice the input: NMS in original pixels, boxes reported there."""
    h, w = 150, 200
    img = image(11, h, w)
    sd = model.state_dict()
    pixel = (img - model.pixel_mean) / model.pixel_std
    with torch.no_grad():
        feature = ref.res4(pixel, sd, 101)
        boxes = ref.proposals(feature, sd, (h, w), 6000, POST_NMS, 0.7)
        expected = ref.head(feature, boxes, sd, 101)
        (out,) = model([{"image": img, "height": 2 * h, "width": 2 * w}])
    res = out["instances"]
    original = (boxes * 2).numpy()
    probs = expected["class_probs"].numpy()
    caffe_probs = np.concatenate([probs[:, -1:], probs[:, :-1]], axis=1)  # background first
    rows = ref.generate_tsv_rows(original, caffe_probs, nms_thresh=0.3)
    assert res.proposal_index.tolist() == rows.tolist()
    assert_scaled_close(res.pred_boxes.tensor, torch.from_numpy(original[rows]))
    conf, ids = expected["class_probs"][rows, :-1].max(dim=1)
    assert torch.equal(res.pred_classes, ids)
    assert_scaled_close(res.scores, conf)


def random_case(rng, num_boxes, num_classes, integer):
    if integer:
        xy = rng.integers(0, 40, size=(num_boxes, 2))
        wh = rng.integers(0, 25, size=(num_boxes, 2))
    else:
        xy = rng.uniform(0, 300, size=(num_boxes, 2))
        wh = rng.uniform(0.5, 120, size=(num_boxes, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    logits = rng.normal(size=(num_boxes, num_classes + 1)) * rng.uniform(0.5, 6)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return boxes, probs.astype(np.float32)


def test_butd_selection_rows_and_order_equal_generate_tsv():
    rng = np.random.default_rng(0)
    counts = {"below": 0, "within": 0, "above": 0}
    for case in range(90):
        integer = case % 2 == 0
        num_boxes = int(rng.choice([0, 3, 9, 30, 80, 160, 220]))
        num_classes = int(rng.integers(1, 12))
        boxes, probs = random_case(rng, num_boxes, num_classes, integer)
        nms_thresh = float(rng.choice([0.3, 0.5, 0.7]))
        conf_thresh = float(rng.choice([0.05, 0.2, 0.5]))
        min_boxes, max_boxes = (10, 100) if case % 3 else (36, 36)
        caffe_probs = np.concatenate([probs[:, -1:], probs[:, :-1]], axis=1)
        expected = ref.generate_tsv_rows(boxes, caffe_probs, conf_thresh, min_boxes, max_boxes, nms_thresh)
        size = (400, 400)
        result, kept = select_butd(
            torch.from_numpy(probs), Boxes(torch.from_numpy(boxes)), size, size,
            conf_thresh, min_boxes, max_boxes, nms_thresh,
        )
        assert kept.tolist() == expected.tolist(), case
        assert torch.equal(result.pred_boxes.tensor, torch.from_numpy(boxes[expected]))
        confident = len(ref.generate_tsv_rows(boxes, caffe_probs, conf_thresh, 0, 10 ** 6, nms_thresh))
        counts["below" if confident < min_boxes else "above" if confident > max_boxes else "within"] += 1
    assert min(counts.values()) >= 5, counts


def test_legacy_iou_plus_one_and_greater_or_equal_decide():
    # [0,0,9,9] has area 100 with +1; [0,0,9,2] inside it has 30: IoU exactly 0.3 -> removed.
    # Without +1 the IoU would be 18/81 < 0.3 and both would stay.
    boxes = torch.tensor([[0, 0, 9, 9], [0, 0, 9, 2], [50, 50, 59, 59]], dtype=torch.float32)
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    _, kept = select_butd(probs, Boxes(boxes), (100, 100), (100, 100), 0.2, 0, 100, 0.3)
    assert kept.tolist() == [0, 2]  # proposal order, row 1 suppressed for the only class
    _, kept = select_butd(probs, Boxes(boxes), (100, 100), (100, 100), 0.2, 0, 100, 0.31)
    assert kept.tolist() == [0, 1, 2]
    # The same boxes at half the scale of the original: NMS sees original pixels.
    half = Boxes(boxes / 2)
    _, kept = select_butd(probs, half, (50, 50), (100, 100), 0.2, 0, 100, 0.3)
    assert kept.tolist() == [0, 2]


def ports_state_dict(model):
    """Our state dict in the ports' layout: plain BatchNorm counters, anchors as a parameter."""
    state = dict(model.state_dict())
    for key in list(state):
        if key.endswith("norm.running_var"):
            state[key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
    state["proposal_generator.anchor_generator.cell_anchors.0"] = torch.randn(12, 4)
    return state


@pytest.mark.parametrize("layout", ["hf_bin", "airsplay_pkl"])
def test_ports_checkpoints_load_with_only_parameterless_keys_dropped(model, tmp_path, layout, caplog):
    state = ports_state_dict(model)
    if layout == "hf_bin":
        path = tmp_path / "pytorch_model.bin"
        torch.save(state, path)
    else:
        path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "port"}, f)
    torch.manual_seed(1)
    other = build_model(vg_cfg())
    # through the public load(): the checkpointer warns of every missing, unused or
    # mis-shaped key, so none may be logged
    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(other).load(str(path))
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [m for m in warned if "not found in the checkpoint" in m or "not used by the model" in m
                or "Skip loading" in m or "shape" in m], warned
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_default_predictor_loads_weights_and_names_from_vocabularies(model, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(ports_state_dict(model), path)
    objects = tmp_path / "objects_vocab.txt"
    objects.write_text("".join(f"object{i},synonym{i}\n" for i in range(1600)))
    attributes = tmp_path / "attributes_vocab.txt"
    attributes.write_text("".join(f"attr{i}\n" for i in range(400)))
    cfg = vg_cfg()
    cfg.MODEL.WEIGHTS = str(path)
    cfg.MODEL.REGION_FEATURES.CLASS_NAMES_FILE = str(objects)
    cfg.MODEL.REGION_FEATURES.ATTRIBUTE_NAMES_FILE = str(attributes)
    cfg.DATASETS.TEST = ("butd_vocab_test",)
    predictor = DefaultPredictor(cfg)
    metadata = MetadataCatalog.get("butd_vocab_test")
    assert metadata.thing_classes[:2] == ["object0", "object1"] and len(metadata.thing_classes) == 1600
    assert metadata.attribute_classes[-1] == "attr399"
    for key, value in model.state_dict().items():
        assert torch.equal(predictor.model.state_dict()[key], value), key
    bgr = image(3, 120, 160).permute(1, 2, 0).numpy().astype("uint8")
    res = predictor(bgr)["instances"]
    assert 10 <= len(res) <= 100 and res.image_size == (120, 160)
    assert res.box_features.shape == (len(res), 256) and res.attr_probs.shape == (len(res), 401)


def test_butd_needs_the_original_sizes(model):
    predictor = model.roi_heads.box_predictor
    probs = torch.full((2, 1601), 1.0 / 1601)
    proposals = [Instances((9, 9), proposal_boxes=Boxes(torch.zeros(2, 4)))]
    with pytest.raises(RuntimeError, match='META_ARCHITECTURE "RegionFeatureRCNN"'):
        predictor.select([torch.zeros(2, 6400)], [probs], torch.zeros(2, 256), proposals)


@pytest.mark.equality
def test_batch_gives_the_per_image_results(model):
    """
    float32, within 1e-4 of each tensor's scale (detectron2's ROIPool of the legacy pooler
    takes float32 boxes only, so this model cannot run in float64): a batched convolution
    sums in another order than a single-image one, by the CPU's kernels, to ~1e-6 of the
    scale; a misaligned or swapped row differs by the scale itself.
    """
    batch = [{"image": image(s, 150, 200), "height": 300, "width": 400} for s in (21, 22)]
    with torch.no_grad():
        batched = [o["instances"] for o in model(batch)]
        singles = [model([x])[0]["instances"] for x in batch]
    for single, from_batch in zip(singles, batched):
        assert len(single) > 0
        assert single.proposal_index.tolist() == from_batch.proposal_index.tolist()
        for name in ("box_features", "class_probs", "attr_probs", "scores"):
            assert_scaled_close(from_batch.get(name), single.get(name))
        # boxes in pixels: 1e-4 of the image size
        assert_scaled_close(from_batch.pred_boxes.tensor, single.pred_boxes.tensor)


def test_explain_report_prints_class_names(tmp_path):
    from d2_regionfeat.modeling.explain import format_report
    from d2_regionfeat.modeling.vocabulary import read_vocabulary

    report = {
        "score_thresh": 0.5, "stages": [{"stage": "proposals", "count": 2}], "final": 1,
        "removed_by_nms": [{"proposal": 1, "class": 1, "score": 0.6, "iou": 0.8,
                            "by_proposal": 0, "by_score": 0.9}],
    }
    path = tmp_path / "objects_vocab.txt"
    path.write_text("red ball,ball\n\ntable, desk\n")
    names = read_vocabulary(str(path))
    assert names == ["red ball", "table"]
    assert "class table (score 0.600)" in format_report(report, "img", names)
    assert "class 1 (score 0.600)" in format_report(report, "img")


def test_vg_model_trains_with_attributes(model):
    from detectron2.utils.events import EventStorage

    trained = copy.deepcopy(model).train()
    trained.roi_heads.batch_size_per_image = 32
    item = {"image": image(5, 150, 200)}
    gt = Instances((150, 200))
    gt.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 120.0, 140.0], [60.0, 5.0, 190.0, 90.0]]))
    gt.gt_classes = torch.tensor([3, 1500])
    gt.gt_attributes = torch.full((2, 16), -1, dtype=torch.int64)
    gt.gt_attributes[0, :2] = torch.tensor([7, 399])
    item["instances"] = gt
    torch.manual_seed(0)
    with EventStorage():
        losses = trained([item])
    assert {"loss_cls", "loss_box_reg", "loss_attr", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert trained.roi_heads.box_predictor.fc_attr.weight.grad.abs().sum() > 0
