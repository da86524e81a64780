"""The Feature heads: same detections as the plain heads, plus the right region features."""
import functools

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from helpers import (
    MODELS, NUM_CLASSES, assert_float64_close, build, float64, float64_inputs, image, inputs, make_cfg, narrow,
    tame,
)
from reference import backbone_and_proposals, clipped_box, proposal_outputs

BATCH = ((1, 200, 280), (2, 210, 270), (3, 220, 260))  # different sizes, one padded size


def run(model, batched_inputs, postprocess=True):
    with torch.no_grad():
        outs = model.inference(batched_inputs, do_postprocess=postprocess)
    return [o["instances"] for o in outs] if postprocess else outs


def cheap(cfg, kind):
    """
    ``cfg`` made cheap: narrow, except a keypoint model's backbone (detectron2's heatmap
    post-processing asserts on the narrow model's maps), whose keypoint head is narrowed instead.
    """
    if kind != "keypoint":
        return narrow(cfg)
    cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS = (64,) * 8
    return cfg


@functools.lru_cache(maxsize=None)
def plain_and_feature(kind):
    """
    The plain and the Feature model of ``kind``, narrow, same weights; built once a session
    (the tests that take them leave them as they found them: eval mode, weights unchanged).
    """
    plain = build(cheap(make_cfg(kind, feature=False), kind))
    feature = build(cheap(make_cfg(kind), kind), wild=True)
    feature.load_state_dict(plain.state_dict())
    return plain, feature


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_same_init_and_keys_as_plain_heads(kind):
    plain = build(make_cfg(kind, feature=False), seed=3, wild=True)
    feature = build(make_cfg(kind), seed=3, wild=True)
    plain_state, feature_state = plain.state_dict(), feature.state_dict()
    assert list(plain_state) == list(feature_state)
    for key, value in plain_state.items():
        assert torch.equal(value, feature_state[key]), key


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_detections_bit_identical_to_plain_heads(kind):
    plain, feature = plain_and_feature(kind)
    batch = inputs(*BATCH)
    expected, got = run(plain, batch), run(feature, batch)
    assert sum(len(x) for x in expected) > 0
    for e, g in zip(expected, got):
        assert set(g.get_fields()) == set(e.get_fields()) | {"box_features", "proposal_index"}
        for name, value in e.get_fields().items():
            value = value.tensor if isinstance(value, Boxes) else value
            other = g.get(name)
            other = other.tensor if isinstance(other, Boxes) else other
            assert torch.equal(value, other), name


@pytest.mark.equality
@pytest.mark.parametrize("kind", ["fpn", "c4", "cascade"])
def test_box_features_are_those_of_the_producing_proposal(kind):
    model = build(narrow(make_cfg(kind, class_probs=True)))
    batch = inputs(*BATCH)
    with torch.no_grad():
        features, proposals = backbone_and_proposals(model, batch)
        reference = proposal_outputs(model, features, proposals)
    results = run(model, batch, postprocess=False)
    assert sum(len(r) for r in results) > 0
    for ref, res in zip(reference, results):
        idx = res.proposal_index
        torch.testing.assert_close(res.box_features, ref["head"][idx], rtol=0, atol=0)
        torch.testing.assert_close(res.class_probs, ref["probs"][idx], rtol=1e-6, atol=1e-7)
        # The index really is the proposal behind the detection: its score and its box.
        torch.testing.assert_close(
            res.scores, ref["probs"][idx, res.pred_classes], rtol=1e-6, atol=1e-7
        )
        for j in range(len(res)):
            box = clipped_box(ref["regressed"][idx[j]], res.pred_classes[j], res.image_size)
            torch.testing.assert_close(res.pred_boxes.tensor[j], box, rtol=0, atol=1e-4)


@pytest.mark.equality
@pytest.mark.parametrize("kind", ["fpn", "c4", "cascade"])
def test_pooled_source_is_the_spatial_mean_of_the_pooled_map(kind):
    model = build(narrow(make_cfg(kind, source="pooled")))
    batch = inputs(*BATCH[:2])
    with torch.no_grad():
        features, proposals = backbone_and_proposals(model, batch)
        reference = proposal_outputs(model, features, proposals)
    results = run(model, batch, postprocess=False)
    assert sum(len(r) for r in results) > 0
    for ref, res in zip(reference, results):
        torch.testing.assert_close(
            res.box_features, ref["pooled"][res.proposal_index], rtol=1e-5, atol=1e-6
        )


@pytest.mark.equality
@pytest.mark.parametrize("kind", ["fpn", "c4", "cascade"])
def test_batch_gives_the_per_image_results(kind):
    """
    Exact in float64. A batch sees what single images see only when padding does not
    change: FPN pads every image to a multiple of 32 (BATCH pads to one size), C4 pads to the
    batch's largest image, so its images share one size. In float32 a batched convolution
    sums in another order than a single-image one, which depends on the CPU's kernels; in
    float64 that rounding is ~1e-12, so rows, their order and the proposal behind each
    must agree.
    """
    model = build(narrow(make_cfg(kind, class_probs=True)))
    batch = inputs(*BATCH) if kind != "c4" else inputs(*[(s, 200, 280) for s, _, _ in BATCH])
    with float64(model):
        batched = run(model, float64_inputs(batch))
        singles = [run(model, float64_inputs([x]))[0] for x in batch]
    assert sum(len(x) for x in batched) > 0
    for single, from_batch in zip(singles, batched):
        assert len(single) == len(from_batch)
        assert torch.equal(single.pred_classes, from_batch.pred_classes)
        assert torch.equal(single.proposal_index, from_batch.proposal_index)
        for name in ("box_features", "class_probs", "scores"):
            assert_float64_close(single.get(name), from_batch.get(name))
        assert_float64_close(single.pred_boxes.tensor, from_batch.pred_boxes.tensor)


def test_feature_dimensions():
    dims = {"fpn": 1024, "c4": 2048, "cascade": 1024}
    for kind, dim in dims.items():
        (res,) = run(build(make_cfg(kind)), inputs(BATCH[0]))
        assert res.box_features.shape == (len(res), dim)
    (res,) = run(build(make_cfg("fpn", source="pooled")), inputs(BATCH[0]))
    assert res.box_features.shape == (len(res), 256)


@pytest.mark.parametrize("kind", ["fpn", "c4", "cascade"])
def test_zero_detections(kind):
    cfg = make_cfg(kind, class_probs=True)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 1.0
    (res,) = run(build(cfg), inputs(BATCH[0]))
    dim = 2048 if kind == "c4" else 1024
    assert len(res) == 0
    assert res.box_features.shape == (0, dim)
    assert res.proposal_index.shape == (0,)
    assert res.class_probs.shape == (0, NUM_CLASSES + 1)


def test_proposal_kept_for_two_classes_gives_two_rows_with_one_feature():
    cfg = make_cfg("fpn")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05
    (res,) = run(build(cfg), inputs(BATCH[0]))
    index = res.proposal_index
    repeated = [i for i in index.unique() if (index == i).sum() > 1]
    assert repeated, "the fixed seed should keep some proposal for two classes"
    for i in repeated:
        rows = (index == i).nonzero()[:, 0]
        assert len(res.pred_classes[rows].unique()) == len(rows)
        for row in rows[1:]:
            assert torch.equal(res.box_features[row], res.box_features[rows[0]])


def test_wild_model_drops_boxes_consistently():
    """A raw random-init model: huge deltas, degenerate boxes that postprocessing drops."""
    cfg = make_cfg("fpn", class_probs=True)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = build(cfg, seed=2, wild=True)
    batch = inputs(*BATCH)
    raw, final = run(model, batch, postprocess=False), run(model, batch)
    # This seed gives images with all, some and none of their boxes left after postprocessing.
    assert [len(x) for x in raw] == [2, 3, 2] and [len(x) for x in final] == [0, 0, 1]
    with torch.no_grad():
        features, proposals = backbone_and_proposals(model, batch)
        reference = proposal_outputs(model, features, proposals)
    for ref, res in zip(reference * 2, raw + final):
        assert len(res.box_features) == len(res.proposal_index) == len(res)
        torch.testing.assert_close(res.box_features, ref["head"][res.proposal_index], rtol=0, atol=0)
        torch.testing.assert_close(res.class_probs, ref["probs"][res.proposal_index])


@pytest.mark.parametrize("kind", ["fpn", "c4", "cascade"])
def test_training_losses_identical_to_plain_heads(kind):
    plain, feature = plain_and_feature(kind)
    batch = inputs(*BATCH[:2])
    for item in batch:
        gt = Instances(item["image"].shape[1:])
        gt.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 120.0, 150.0], [60.0, 5.0, 200.0, 90.0]]))
        gt.gt_classes = torch.tensor([0, 2])
        if kind != "c4":
            gt.gt_masks = gt.gt_boxes.clone()  # replaced below by polygon-free bitmasks
            masks = torch.zeros(2, *item["image"].shape[1:], dtype=torch.bool)
            masks[0, 20:150, 10:120] = masks[1, 5:90, 60:200] = True
            from detectron2.structures import BitMasks

            gt.gt_masks = BitMasks(masks)
        item["instances"] = gt
    losses = []
    for model in (plain, feature):
        model.train()
        torch.manual_seed(7)
        try:
            with EventStorage():
                losses.append(model(batch))
        finally:
            model.eval()
    assert losses[0].keys() == losses[1].keys()
    for name in losses[0]:
        assert torch.equal(losses[0][name], losses[1][name]), name


def test_default_predictor_returns_region_fields(tmp_path):
    cfg = make_cfg("fpn", class_probs=True)
    plain = build(make_cfg("fpn", feature=False))
    cfg.MODEL.WEIGHTS = str(tmp_path / "plain.pth")
    DetectionCheckpointer(plain, save_dir=str(tmp_path)).save("plain")
    predictor = DefaultPredictor(cfg)
    # The checkpoint of the plain model loads with no missing or unexpected keys.
    incompatible = predictor.model.load_state_dict(plain.state_dict())
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    bgr = image(5, 180, 240).permute(1, 2, 0).numpy().astype("uint8")
    out = predictor(bgr)["instances"]
    expected = DefaultPredictor(make_cfg("fpn", feature=False))
    expected.model.load_state_dict(plain.state_dict())
    plain_out = expected(bgr)["instances"]
    assert len(out) == len(plain_out) > 0
    assert out.image_size == (180, 240)
    assert torch.equal(out.pred_boxes.tensor, plain_out.pred_boxes.tensor)
    assert out.box_features.shape == (len(out), 1024)
    assert out.class_probs.shape == (len(out), NUM_CLASSES + 1)


def test_a_stock_predictor_is_kept_and_traced_through_the_selection():
    """Built from kwargs with a plain FastRCNNOutputLayers: the hooks give the same fields."""
    from d2_regionfeat import FeatureROIHeads

    cfg = make_cfg("fpn", class_probs=True)
    model = build(cfg)
    kwargs = StandardROIHeads.from_config(cfg, model.backbone.output_shape())
    plain = kwargs["box_predictor"]
    plain.load_state_dict(model.roi_heads.box_predictor.state_dict())
    heads = FeatureROIHeads(**kwargs, region_selection={"class_probs": True})
    heads.load_state_dict(model.roi_heads.state_dict())
    assert type(heads.box_predictor) is FastRCNNOutputLayers
    expected = run(model, inputs(*BATCH))
    model.roi_heads = heads.eval()
    got = run(model, inputs(*BATCH))
    assert sum(len(x) for x in got) > 0
    for e, g in zip(expected, got):
        for name in ("box_features", "proposal_index", "class_probs", "scores", "pred_classes"):
            assert torch.equal(e.get(name), g.get(name)), name
