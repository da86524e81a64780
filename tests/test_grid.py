"""Grid features: the map of the whole image, beside the instances, from one backbone run."""
import os

import pytest
import torch
import torch.nn.functional as F

from d2_regionfeat import region_fields
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor

from helpers import assert_float64_close, build, float64, float64_inputs, image, make_cfg, narrow

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
# two sizes that pad alike (FPN: to 224 x 288) but cover different numbers of p3 cells
SIZES = [(11, 200, 280), (12, 220, 262)]


def grid_cfg(kind, feature, **grid):
    cfg = narrow(make_cfg(kind))
    cfg.MODEL.META_ARCHITECTURE = "RegionFeatureRCNN"
    cfg.MODEL.REGION_FEATURES.GRID.ENABLED = True
    cfg.MODEL.REGION_FEATURES.GRID.FEATURE = feature
    for key, value in grid.items():
        cfg.MODEL.REGION_FEATURES.GRID[key.upper()] = value
    return cfg


def narrow_grid_cfg():
    """configs/grid/R-50-grid.yaml, narrow (res5 of 256 channels) and with few proposals."""
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, "grid", "R-50-grid.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.RES5_DILATION = 1  # extract_grid_feature.py's
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES = 4
    cfg.INPUT.MIN_SIZE_TEST = 224
    cfg.INPUT.MAX_SIZE_TEST = 320
    return narrow(cfg)


def by_hand(model, x, feature):
    """The map of ``x`` alone, computed from the model's modules, as extract_grid_feature.py."""
    images = model.preprocess_image([x])
    maps = model.backbone(images.tensor)
    if feature in maps:
        return maps[feature][0]
    return model.roi_heads.res5(maps[model.roi_heads.in_features[0]])[0]


def calls(module):
    count = []
    handle = module.register_forward_hook(lambda *args: count.append(1))
    return count, handle


@pytest.fixture(scope="module")
def models():
    return {
        "fpn": build(grid_cfg("fpn", "p5")),
        "c4": build(grid_cfg("c4", "res5")),
        "grid": build(narrow_grid_cfg()),
    }


@pytest.mark.parametrize("kind,feature,stride", [("fpn", "p5", 32), ("c4", "res5", 32), ("grid", "res5", 32)])
def test_grid_is_the_backbone_map_by_hand(models, kind, feature, stride):
    model = models[kind]
    x = {"image": image(3, 200, 280)}
    with torch.no_grad():
        (out,) = model([x])
        expected = by_hand(model, x, feature)
    grid = out["grid"]
    assert len(out["instances"]) > 0
    rows, cols = -(-200 // stride), -(-280 // stride)
    assert grid["features"].shape == (region_fields(model).grid.channels, rows, cols)
    torch.testing.assert_close(grid["features"], expected[:, :rows, :cols])
    assert grid["image_size"] == (200, 280) and grid["stride"] == (stride, stride)
    assert region_fields(model).grid.stride == stride


def test_pooling_is_adaptive_average_of_the_cells(models):
    cfg = grid_cfg("fpn", "p5", pool=[7, 8])
    model = build(cfg)
    x = {"image": image(4, 170, 230)}
    with torch.no_grad():
        (out,) = model([x])
        cells = by_hand(model, x, "p5")[:, :6, :8]
    torch.testing.assert_close(out["grid"]["features"], F.adaptive_avg_pool2d(cells, (7, 8)))
    assert out["grid"]["stride"] == (6 * 32 / 7, 8 * 32 / 8)
    assert region_fields(model).grid.output_fields()["features"] == "(32, 7, 8)"


@pytest.mark.equality
def test_batch_of_two_sizes_equals_single_images():
    """
    Exact in float64. Images that detectron2 pads alike (FPN: to multiples of 32) see in a
    batch what they see alone; the grid of each is cut to its own cells (p3: 25 x 35 and
    28 x 33 of the batch's 28 x 36).
    """
    model = build(grid_cfg("fpn", "p3"))
    batch = [{"image": image(s, h, w)} for s, h, w in SIZES]
    with torch.no_grad(), float64(model):
        batched = model(float64_inputs(batch))
        singles = [model(float64_inputs([x]))[0] for x in batch]
    assert batched[0]["grid"]["features"].shape[1:] == (25, 35)
    assert batched[1]["grid"]["features"].shape[1:] == (28, 33)
    for single, from_batch in zip(singles, batched):
        assert_float64_close(from_batch["grid"]["features"], single["grid"]["features"])
        assert from_batch["grid"]["image_size"] == single["grid"]["image_size"]


@pytest.mark.equality
def test_an_image_that_pads_differently_sees_the_batch_padding():
    """
    Exact in float64. A 130 x 170 image pads alone to 160 x 192 but in a batch with a
    200 x 280 one to 224 x 288. What is equal: the larger image's grid (it pads alike); the
    smaller one's cells and image size; and its grid in the batch equals its grid computed by
    hand on it padded to the batch's 224 x 288. What is not: its grid alone, in every cell (the
    cells' receptive fields reach the padded edge, where the batch has activations of the
    padding and a lone image has the convolutions' zero padding).
    """
    model = build(grid_cfg("fpn", "p3"))
    batch = [{"image": image(s, h, w)} for s, h, w in [(11, 200, 280), (13, 130, 170)]]
    with torch.no_grad(), float64(model):
        batched = model(float64_inputs(batch))
        singles = [model(float64_inputs([x]))[0] for x in batch]
        small = float64_inputs(batch)[1]
        normalised = (small["image"].to(model.pixel_mean) - model.pixel_mean) / model.pixel_std
        padded = F.pad(normalised, (0, 288 - 170, 0, 224 - 130))  # the batch's padding, zeros
        by_hand_p3 = model.backbone(padded[None])["p3"][0][:, :17, :22]  # ceil(130 / 8) x ceil(170 / 8)
    assert_float64_close(batched[0]["grid"]["features"], singles[0]["grid"]["features"])
    grid, alone = batched[1]["grid"], singles[1]["grid"]
    assert grid["features"].shape == alone["features"].shape == (32, 17, 22)
    assert grid["image_size"] == alone["image_size"] == (130, 170)
    assert_float64_close(grid["features"], by_hand_p3)
    differs = (grid["features"] - alone["features"]).abs().amax(0) > 1e-6 * float(alone["features"].abs().max())
    assert bool(differs.all()), "every cell sees the padded edge"


def test_one_backbone_run_gives_grid_and_detections(models):
    model = models["c4"]
    backbone, handle = calls(model.backbone)
    res5, handle5 = calls(model.roi_heads.res5)
    try:
        with torch.no_grad():
            outs = model([{"image": image(s, h, w)} for s, h, w in SIZES])
    finally:
        handle.remove()
        handle5.remove()
    assert len(backbone) == 1  # one backbone run for the batch
    assert len(res5) == 2  # once on the boxes, once on the whole res4 map
    assert all(len(o["instances"]) > 0 and "grid" in o for o in outs)


def test_default_predictor_returns_grid_beside_instances():
    cfg = grid_cfg("fpn", "p4")
    cfg.MODEL.REGION_FEATURES.CLASS_PROBS = True
    predictor = DefaultPredictor(cfg)
    bgr = image(5, 120, 160).permute(1, 2, 0).numpy().astype("uint8")
    out = predictor(bgr)
    # resized to 224 x 299 (MIN_SIZE_TEST 224): p4 cells of stride 16
    assert out["grid"]["image_size"] == (224, 299)
    assert out["grid"]["features"].shape == (32, 14, 19)
    assert "box_features" in out["instances"].get_fields()


def test_grid_only_runs_no_proposals_nor_roi_heads():
    cfg = grid_cfg("c4", "res5", only=True)
    model = build(cfg, wild=True)
    rpn, h1 = calls(model.proposal_generator)
    heads, h2 = calls(model.roi_heads)
    x = {"image": image(6, 200, 280)}
    try:
        with torch.no_grad():
            (out,) = model([x])
            expected = by_hand(model, x, "res5")
    finally:
        h1.remove()
        h2.remove()
    assert not rpn and not heads and set(out) == {"grid"}
    torch.testing.assert_close(out["grid"]["features"], expected[:, :7, :9])


def _train_step(cfg):
    """One SGD step of ``cfg``'s model from seed 0 on two images: (losses, weights after)."""
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    cfg.MODEL.MASK_ON = False
    model = build(cfg, wild=True).train()
    batch = []
    for s, h, w in SIZES:
        gt = Instances((h, w))
        gt.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 120.0, 150.0], [60.0, 5.0, 200.0, 90.0]]))
        gt.gt_classes = torch.tensor([0, 2])
        batch.append({"image": image(s, h, w), "instances": gt})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    torch.manual_seed(7)  # the heads' sampling
    with EventStorage():
        losses = model(batch)
    sum(losses.values()).backward()
    optimizer.step()
    return losses, model.state_dict()


def test_training_is_untouched_by_the_grid():
    """A training step with the grid enabled gives the losses and weights of one without."""
    plain = narrow(make_cfg("fpn"))
    plain.MODEL.META_ARCHITECTURE = "RegionFeatureRCNN"
    assert plain.MODEL.REGION_FEATURES.GRID.ENABLED is False
    (losses, weights), (grid_losses, grid_weights) = _train_step(plain), _train_step(grid_cfg("fpn", "p3"))
    assert losses.keys() == grid_losses.keys() and len(losses) >= 4
    for name in losses:
        assert torch.equal(losses[name], grid_losses[name]), name
    assert weights.keys() == grid_weights.keys()
    for key, value in weights.items():
        assert torch.equal(value, grid_weights[key]), key
    # the step did train: the box predictor's weights moved from their initial values
    initial = build(grid_cfg("fpn", "p3"), wild=True).state_dict()
    assert not torch.equal(initial["roi_heads.box_predictor.cls_score.weight"],
                           weights["roi_heads.box_predictor.cls_score.weight"])


def test_bad_grid_keys_are_one_line_errors():
    with pytest.raises(ValueError, match="GRID.FEATURE 'p9' is not an output of the backbone"):
        build(grid_cfg("fpn", "p9"), wild=True)
    with pytest.raises(ValueError, match="GRID.FEATURE 'res5' is not an output"):
        build(grid_cfg("fpn", "res5"), wild=True)
    with pytest.raises(ValueError, match="GRID.POOL must be"):
        build(grid_cfg("fpn", "p5", pool=[7]), wild=True)
    cfg = grid_cfg("fpn", "p5")
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    with pytest.raises(ValueError, match='GRID.ENABLED needs MODEL.META_ARCHITECTURE "RegionFeatureRCNN"'):
        build(cfg, wild=True)
