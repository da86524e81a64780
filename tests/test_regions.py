"""Region selection, given boxes, re-pooling at final boxes, and the drop explanation."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.structures import Boxes

from d2_regionfeat.modeling.explain import explain_detections, format_report
from d2_regionfeat.modeling.given_boxes import RegionPredictor, regions_for_boxes
from d2_regionfeat.modeling.selection import select_regions

from helpers import assert_float64_close, assert_scaled_close, build, float64, float64_inputs, image, inputs, make_cfg, narrow
from reference import backbone_and_proposals, clipped_box, pooled_and_head, proposal_outputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ["fpn", "c4", "cascade"]


def run(model, batched_inputs, postprocess=False):
    with torch.no_grad():
        outs = model.inference(batched_inputs, do_postprocess=postprocess)
    return [o["instances"] for o in outs] if postprocess else outs


def regions_cfg(kind, **keys):
    keys = {"selection": "regions", "min_boxes": 10, "max_boxes": 100, "conf_thresh": 0.2, **keys}
    return make_cfg(kind, **keys)


# ---- regions mode -------------------------------------------------------------------------


def test_select_regions_by_hand():
    # Proposals 0 and 1 overlap heavily; 2 is apart. Class-agnostic boxes, two classes.
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], dtype=torch.float32)
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.05, 0.15, 0.8]])
    proposals = Boxes(boxes + 1)
    result, kept = select_regions(boxes, probs, proposals, (100, 100), 0.5, 0.2, 1, 10)
    # 1 loses class 0 to 0 under NMS, keeps class 1 (0.4); 0 also keeps class 1? No: for
    # class 1, 1 (0.4) suppresses 0 (0.3). So 0 -> class 0 (0.6), 1 -> class 1 (0.4),
    # 2 -> class 1 (0.15), below the threshold.
    assert kept.tolist() == [0, 1]
    assert result.pred_classes.tolist() == [0, 1]
    torch.testing.assert_close(result.scores, torch.tensor([0.6, 0.4]))
    assert torch.equal(result.pred_boxes.tensor, proposals.tensor[[0, 1]])
    # MIN_BOXES brings in proposal 2 with its best surviving class.
    result, kept = select_regions(boxes, probs, proposals, (100, 100), 0.5, 0.2, 3, 10)
    assert kept.tolist() == [0, 1, 2] and result.pred_classes.tolist() == [0, 1, 1]
    # MAX_BOXES cuts; "regressed" boxes are the class boxes.
    result, kept = select_regions(boxes, probs, proposals, (100, 100), 0.5, 0.0, 0, 1, "regressed")
    assert kept.tolist() == [0] and torch.equal(result.pred_boxes.tensor, boxes[:1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("thresh, expect", [(0.2, None), (1.0, "min"), (0.0, "max")])
def test_regions_count_order_and_uniqueness(kind, thresh, expect):
    model = build(narrow(regions_cfg(kind, conf_thresh=thresh, min_boxes=7, max_boxes=15)))
    batch = inputs((1, 200, 280), (2, 210, 270))
    with torch.no_grad():
        features, proposals = backbone_and_proposals(model, batch)
        reference = proposal_outputs(model, features, proposals)
    for res, props, ref in zip(run(model, batch), proposals, reference):
        n = len(props)
        assert min(7, n) <= len(res) <= min(15, n)
        if expect == "min":
            assert len(res) == min(7, n)
        if expect == "max":
            assert len(res) == min(15, n)
        idx = res.proposal_index
        assert len(idx.unique()) == len(idx)
        assert torch.all(res.scores[:-1] >= res.scores[1:])
        # The box the feature was pooled from (for Cascade, the last stage's input box).
        assert torch.equal(res.pred_boxes.tensor, ref["boxes"].tensor[idx])
        torch.testing.assert_close(res.box_features, ref["head"][idx], rtol=0, atol=0)
        torch.testing.assert_close(res.class_probs, ref["probs"][idx], rtol=1e-6, atol=1e-7)
        confident = res.scores >= thresh
        if expect is None:
            assert confident.sum() == len(res) or len(res) == min(7, n)


def test_regions_regressed_boxes_are_the_class_boxes():
    model = build(regions_cfg("fpn", box="regressed", conf_thresh=0.0, max_boxes=20))
    batch = inputs((3, 200, 280))
    with torch.no_grad():
        features, proposals = backbone_and_proposals(model, batch)
        (ref,) = proposal_outputs(model, features, proposals)
    (res,) = run(model, batch)
    assert len(res) == 20
    for j, p in enumerate(res.proposal_index):
        if res.scores[j] > 0:
            box = clipped_box(ref["regressed"][p], res.pred_classes[j], res.image_size)
            torch.testing.assert_close(res.pred_boxes.tensor[j], box)


@pytest.mark.equality
def test_regions_batch_equals_single():
    """Exact in float64 (float32 batched convolutions round with the CPU's kernels)."""
    model = build(narrow(regions_cfg("fpn", min_boxes=5, max_boxes=12)))
    batch = inputs((1, 200, 280), (2, 210, 270), (3, 220, 260))
    with float64(model):
        batched = run(model, float64_inputs(batch), postprocess=True)
        singles = [run(model, float64_inputs([x]), postprocess=True)[0] for x in batch]
    for single, from_batch in zip(singles, batched):
        assert len(single) == len(from_batch) >= 5
        assert torch.equal(single.proposal_index, from_batch.proposal_index)
        for name in ("scores", "box_features"):
            assert_float64_close(single.get(name), from_batch.get(name))
        assert_float64_close(single.pred_boxes.tensor, from_batch.pred_boxes.tensor)


# ---- given boxes --------------------------------------------------------------------------


@pytest.mark.equality
@pytest.mark.parametrize("kind", KINDS)
def test_given_box_features_equal_pooler_and_box_head(kind):
    model = build(make_cfg(kind))
    batch = inputs((1, 200, 280), (2, 210, 270))
    given = [
        np.array([[10, 20, 120, 150], [-30, -10, 60, 70], [250, 150, 400, 260]], dtype=np.float32),
        np.zeros((0, 4), dtype=np.float32),
    ]
    results = regions_for_boxes(model, batch, given)
    with torch.no_grad():
        features, _ = backbone_and_proposals(model, batch)
        clipped = Boxes(torch.from_numpy(given[0]).clone())
        clipped.clip((200, 280))
        _, head = pooled_and_head(model, features, [clipped, Boxes(torch.zeros(0, 4))])
        predictor = model.roi_heads.feature_predictor
        probs = torch.softmax(predictor.cls_score(head), dim=-1)
    first, empty = results
    assert len(first) == 3 and len(empty) == 0
    assert empty.box_features.shape == (0, head.shape[1])
    assert torch.equal(first.pred_boxes.tensor, clipped.tensor)  # same size: no rescaling
    torch.testing.assert_close(first.box_features, head, rtol=0, atol=0)
    torch.testing.assert_close(first.class_probs, probs)
    assert first.proposal_index.tolist() == [0, 1, 2]
    torch.testing.assert_close(first.scores, probs[:, :-1].max(dim=1).values)
    assert torch.equal(first.pred_classes, probs[:, :-1].argmax(dim=1))


def test_given_boxes_map_through_the_predictor_resize(tmp_path):
    cfg = make_cfg("fpn", source="pooled")
    model = build(cfg)
    cfg.MODEL.WEIGHTS = str(tmp_path / "model.pth")
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    predictor = RegionPredictor(cfg)
    original = image(9, 150, 200).permute(1, 2, 0).numpy().astype("uint8")  # resized to 224
    boxes = np.array([[10, 15, 90, 120], [100, 40, 199, 149]], dtype=np.float32)
    res = predictor(original, boxes)["instances"]
    assert res.image_size == (150, 200)
    torch.testing.assert_close(res.pred_boxes.tensor, torch.from_numpy(boxes), rtol=0, atol=1e-3)
    inputs_ = predictor.model_inputs(original)
    assert tuple(inputs_["image"].shape[1:]) == (224, 299)
    scale = torch.tensor([299 / 200, 224 / 150] * 2)
    with torch.no_grad():
        features, _ = backbone_and_proposals(model, [inputs_])
        pooled, _ = pooled_and_head(model, features, [Boxes(torch.from_numpy(boxes) * scale)])
    torch.testing.assert_close(res.box_features, pooled.mean(dim=[2, 3]), rtol=1e-5, atol=1e-5)
    # Without boxes it is DefaultPredictor, detections and their fields.
    assert predictor(original)["instances"].has("box_features")


# ---- features re-pooled at the final boxes ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", ["box_head", "pooled"])
def test_final_pooling_equals_repooling_at_final_boxes(kind, source):
    model = build(narrow(make_cfg(kind, pool_at="final", source=source)))
    batch = inputs((1, 200, 280), (2, 210, 270))
    results = run(model, batch)
    assert sum(len(r) for r in results) > 0
    with torch.no_grad():
        features, _ = backbone_and_proposals(model, batch)
        pooled, head = pooled_and_head(model, features, [r.pred_boxes for r in results])
    expected = pooled.mean(dim=[2, 3]) if source == "pooled" else head
    got = torch.cat([r.box_features for r in results])
    assert_scaled_close(got, expected)


# ---- explaining the drops -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_explain_final_count_equals_the_plain_model(kind):
    def cfg(**options):  # narrow widths, with the kind's own number of proposals
        narrowed = narrow(make_cfg(kind, **options))
        narrowed.MODEL.RPN.POST_NMS_TOPK_TEST = make_cfg(kind).MODEL.RPN.POST_NMS_TOPK_TEST
        return narrowed

    feature = build(cfg())
    plain = build(cfg(feature=False), wild=True)
    plain.load_state_dict(feature.state_dict())
    predictors = plain.roi_heads.box_predictor
    batch = inputs((1, 200, 280), (4, 190, 250), (7, 230, 210))
    for thresh in (0.05, 0.3):
        for predictor in predictors if isinstance(predictors, torch.nn.ModuleList) else [predictors]:
            predictor.test_score_thresh = thresh  # what ROI_HEADS.SCORE_THRESH_TEST sets
        with torch.no_grad():
            expected = [len(o["instances"]) for o in plain(batch)]
        reports = explain_detections(feature, batch, thresh)
        for report, count in zip(reports, expected):
            stages = {s["stage"].split(" (")[0]: s["count"] for s in report["stages"]}
            assert report["final"] == report["model_final"] == count
            counts = [s["count"] for s in report["stages"]]
            candidates, after_nms, after_topk, final = counts[3:]
            assert len(report["removed_by_nms"]) == candidates - after_nms
            assert report["removed_by_topk"] == after_nms - after_topk
            assert report["removed_by_postprocessing"] == after_topk - final
            assert counts[0] >= counts[1] >= counts[2]
            assert stages["proposals"] == 200 or kind == "c4"
            for item in report["removed_by_nms"]:
                assert item["iou"] > 0.5 and item["by_score"] >= item["score"]
    assert feature.roi_heads.feature_predictor.test_score_thresh == 0.1  # restored


def test_explain_counts_topk_and_postprocessing_removals():
    cfg = make_cfg("fpn")
    cfg.TEST.DETECTIONS_PER_IMAGE = 3
    model = build(cfg, seed=2, wild=True)
    reports = explain_detections(model, inputs((1, 200, 280), (2, 210, 270), (3, 220, 260)), 0.0)
    assert sum(r["removed_by_postprocessing"] for r in reports) > 0
    cfg.TEST.DETECTIONS_PER_IMAGE = 2
    reports = explain_detections(build(cfg, seed=2, wild=True), inputs((2, 210, 270)), 0.0)
    assert reports[0]["removed_by_topk"] > 0
    assert reports[0]["final"] == reports[0]["model_final"]
    assert "final detections" in format_report(reports[0], "img")


def test_explain_tool(tmp_path):
    cfg = narrow(make_cfg("fpn", feature=False))
    model = build(narrow(make_cfg("fpn")))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    (tmp_path / "cfg.yaml").write_text(cfg.dump())
    from PIL import Image

    Image.fromarray(image(3, 120, 160).permute(1, 2, 0).numpy().astype("uint8")).save(
        tmp_path / "img.png"
    )
    cmd = [sys.executable, os.path.join(REPO, "tools", "explain_detections.py"),
           "--config-file", str(tmp_path / "cfg.yaml"), "--input", str(tmp_path / "img.png"),
           "--thresh", "0.05"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    opts = ["--opts", "MODEL.WEIGHTS", str(tmp_path / "model.pth")]
    text = subprocess.run(cmd + opts, capture_output=True, text=True, env=env, check=True).stdout
    assert "candidate (proposal, class) pairs" in text and "final detections" in text
    out = subprocess.run(cmd + ["--json"] + opts, capture_output=True, text=True, env=env, check=True)
    report = json.loads(out.stdout)[str(tmp_path / "img.png")]
    assert report["final"] == report["model_final"]
    bad = subprocess.run(cmd[:4] + ["--input", str(tmp_path / "missing.png")] + opts,
                         capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "missing.png" in bad.stderr.strip().splitlines()[-1]
