"""The shipped default model and the synthetic shapes it is trained on."""
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

import d2_regionfeat  # noqa: F401  (registers the heads and backbone, adds the config node)
from d2_regionfeat.data.synthetic import (
    CLASSES,
    image_seed,
    load_synthetic_shapes,
    register_synthetic_shapes,
    render_image,
)
from d2_regionfeat.default_model import WEIGHTS_FILE, get_default_model_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, pairwise_iou

MAX_WEIGHTS_BYTES = 20 * 2**20


def box_of_mask(mask):
    """(x0, y0, x1, y1) extent of a boolean (H, W) mask, x1 and y1 exclusive."""
    ys, xs = np.nonzero(mask)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


# ---------------------------------------------------------------- the synthetic generator


def test_render_image_is_deterministic_by_seed():
    image, anns = render_image(image_seed(0, "val", 7))
    again, anns_again = render_image(image_seed(0, "val", 7))
    other, _ = render_image(image_seed(1, "val", 7))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    np.testing.assert_array_equal(image, again)
    assert [(a["category_id"], a["bbox"]) for a in anns] == [
        (a["category_id"], a["bbox"]) for a in anns_again
    ]
    for a, b in zip(anns, anns_again):
        np.testing.assert_array_equal(a["mask"], b["mask"])
    assert image.shape != other.shape or not np.array_equal(image, other)


@pytest.mark.parametrize("index", range(5))
def test_boxes_are_the_extent_of_disjoint_visible_masks(index):
    image, anns = render_image(image_seed(0, "train", index))
    assert anns, "every image has objects"
    union = np.zeros(image.shape[:2], dtype=int)
    for ann in anns:
        assert 0 <= ann["category_id"] < len(CLASSES)
        assert ann["mask"].shape == image.shape[:2] and ann["mask"].any()
        assert tuple(ann["bbox"]) == box_of_mask(ann["mask"])
        union += ann["mask"]
    assert union.max() == 1, "visible masks do not overlap"


def test_split_is_written_once_and_registered(tmp_path):
    records = load_synthetic_shapes(str(tmp_path), "val", num_images=3, seed=5)
    assert [r["image_id"] for r in records] == [0, 1, 2]
    for index, record in enumerate(records):
        assert os.path.isfile(record["file_name"])
        image, anns = render_image(image_seed(5, "val", index))
        assert (record["height"], record["width"]) == image.shape[:2]
        assert len(record["annotations"]) == len(anns)
        for obj, ann in zip(record["annotations"], anns):
            mask = mask_util.decode(obj["segmentation"]).astype(bool)
            np.testing.assert_array_equal(mask, ann["mask"])
            x0, y0, x1, y1 = box_of_mask(mask)
            assert obj["bbox_mode"] == BoxMode.XYWH_ABS
            assert obj["bbox"] == [x0, y0, x1 - x0, y1 - y0]
    os.remove(records[0]["file_name"])  # the cached annotations are read back, not remade
    assert load_synthetic_shapes(str(tmp_path), "val", num_images=3, seed=5) == records

    names = register_synthetic_shapes(str(tmp_path), seed=5, prefix="test_shapes")
    try:
        assert names == ["test_shapes_train", "test_shapes_val"]
        assert MetadataCatalog.get("test_shapes_val").thing_classes == list(CLASSES)
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        image_seed(0, "test", 0)
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        load_synthetic_shapes(str(tmp_path), "test")
    with pytest.raises(ValueError, match="num_images must be at least 1"):
        load_synthetic_shapes(str(tmp_path), "val", num_images=0)
    with pytest.raises(ValueError, match="height must be at least"):
        render_image(0, height=20, width=300)


# ---------------------------------------------------------------- the shipped model


@pytest.fixture(scope="module")
def cfg():
    cfg = get_default_model_cfg(device="cpu")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.5
    return cfg


def test_weights_are_small_and_load_with_no_missing_or_unexpected_keys(cfg):
    assert os.path.getsize(WEIGHTS_FILE) <= MAX_WEIGHTS_BYTES
    assert cfg.MODEL.ROI_HEADS.NAME == "FeatureROIHeads"
    model = build_model(cfg)
    checkpoint = torch.load(WEIGHTS_FILE, map_location="cpu", weights_only=True)
    incompatible = model.load_state_dict(checkpoint["model"], strict=False)
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    # detectron2's checkpointer loads the float16 weights into the float32 model.
    model = build_model(cfg)
    DetectionCheckpointer(model).load(WEIGHTS_FILE)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32 or not value.is_floating_point()
        torch.testing.assert_close(value, checkpoint["model"][key].to(value.dtype), msg=key)
    # The plain heads have the same keys but the attribute head's: the weights are those of
    # an ordinary Mask R-CNN plus cls_embedding, fc_attr and attr_score.
    cfg = cfg.clone()
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    extra = set(checkpoint["model"]) - set(build_model(cfg).state_dict())
    prefix = "roi_heads.box_predictor."
    assert extra == {
        prefix + layer + suffix
        for layer, suffixes in (("cls_embedding", [".weight"]), ("fc_attr", [".weight", ".bias"]),
                                ("attr_score", [".weight", ".bias"]))
        for suffix in suffixes
    }
    assert set(checkpoint["model"]) - extra == set(build_model(cfg).state_dict())


def test_detects_every_object_of_a_val_image(cfg):
    image, anns = render_image(image_seed(0, "val", 0))
    predictor = DefaultPredictor(cfg)
    instances = predictor(np.ascontiguousarray(image[:, :, ::-1]))["instances"]
    gt = Boxes(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32))
    iou = pairwise_iou(gt, instances.pred_boxes)
    for i, ann in enumerate(anns):
        best = int(iou[i].argmax())
        assert iou[i, best] >= 0.7, f"object {i} ({CLASSES[ann['category_id']]}) missed"
        assert int(instances.pred_classes[best]) == ann["category_id"]
    n = len(instances)
    assert n >= len(anns)
    assert instances.box_features.shape == (n, cfg.MODEL.ROI_BOX_HEAD.FC_DIM)
    assert instances.class_probs.shape == (n, len(CLASSES) + 1)
    assert instances.proposal_index.shape == (n,)
