"""The attribute head: outputs in every mode, AttributeDatasetMapper, loss_attr training."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from d2_regionfeat import AttributeDatasetMapper
from d2_regionfeat.modeling.given_boxes import regions_for_boxes
from helpers import build, image, inputs, make_cfg

NUM_ATTRIBUTES = 4


def attr_cfg(**region_features):
    """A small FPN R-CNN (the narrow ResNet-18 of the shipped model) with the head on."""
    cfg = make_cfg("fpn", class_probs=True, **region_features)
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.BACKBONE.NAME = "build_narrow_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 16
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ATTRIBUTE_ON = True
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES = NUM_ATTRIBUTES
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.MAX_ATTRIBUTES_PER_INSTANCE = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 128
    cfg.INPUT.MIN_SIZE_TRAIN = (160,)
    cfg.INPUT.MAX_SIZE_TRAIN = 240
    cfg.INPUT.RANDOM_FLIP = "none"
    return cfg


@pytest.fixture(scope="module")
def model():
    return build(attr_cfg())


def expected_attr_probs(predictor, features, class_probs):
    embedding = predictor.cls_embedding.weight[class_probs.argmax(dim=1)]
    hidden = F.relu(predictor.fc_attr(torch.cat([features, embedding], dim=1)))
    return F.softmax(predictor.attr_score(hidden), dim=1)


def check_attribute_fields(res, predictor):
    assert len(res) > 0
    assert res.attr_probs.shape == (len(res), NUM_ATTRIBUTES + 1)
    torch.testing.assert_close(
        res.attr_probs, expected_attr_probs(predictor, res.box_features, res.class_probs)
    )
    conf, ids = res.attr_probs[:, :-1].max(dim=1)
    assert torch.equal(res.attrs_id, ids) and torch.equal(res.attrs_conf, conf)


@pytest.mark.parametrize("selection", ["detections", "regions"])
def test_outputs_carry_attributes_in_every_mode(model, selection):
    predictor = model.roi_heads.box_predictor
    predictor.selection = selection
    try:
        with torch.no_grad():
            (out,) = model(inputs((1, 200, 280)))
    finally:
        predictor.selection = "detections"
    check_attribute_fields(out["instances"], predictor)


def test_given_boxes_carry_attributes(model):
    boxes = np.array([[10, 20, 120, 150], [60, 5, 200, 90]], dtype=np.float32)
    (res,) = regions_for_boxes(model, inputs((2, 200, 280)), [boxes])
    check_attribute_fields(res, model.roi_heads.box_predictor)


def test_parameters_and_keys():
    cfg = attr_cfg()
    cfg.MODEL.ATTRIBUTE_ON = False
    torch.manual_seed(0)
    plain = build_model(cfg).state_dict()
    torch.manual_seed(0)
    with_attributes = build_model(attr_cfg()).state_dict()
    added = [k for k in with_attributes if k not in plain]
    assert added == [
        "roi_heads.box_predictor.cls_embedding.weight",
        "roi_heads.box_predictor.fc_attr.weight",
        "roi_heads.box_predictor.fc_attr.bias",
        "roi_heads.box_predictor.attr_score.weight",
        "roi_heads.box_predictor.attr_score.bias",
    ]
    assert with_attributes[added[0]].shape == (4, 256)  # K + 1 classes
    assert with_attributes[added[1]].shape == (512, 64 + 256)
    assert with_attributes[added[3]].shape == (NUM_ATTRIBUTES + 1, 512)
    for key, value in plain.items():  # the rest is the plain model's, same seed
        assert torch.equal(value, with_attributes[key]), key


def test_bad_attribute_config_fails_naming_the_key():
    cfg = attr_cfg()
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES = 0
    with pytest.raises(ValueError, match="MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES must be >= 1"):
        build_model(cfg)


def dataset_dicts(tmp_path):
    """Two synthetic images: attributes on some annotations, an empty box, a crowd box."""
    dicts = []
    for i, (h, w) in enumerate([(160, 200), (160, 220)]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(image(20 + i, h, w).permute(1, 2, 0).numpy().astype("uint8")).save(path)
        annotations = [
            {"bbox": [10, 20, 90, 120], "bbox_mode": 0, "category_id": 0, "attribute_ids": [2, 0]},
            {"bbox": [50, 50, 50, 80], "bbox_mode": 0, "category_id": 1, "attribute_ids": [1]},
            {"bbox": [100, 10, 190, 70], "bbox_mode": 0, "category_id": 2, "attribute_ids": [3]},
            {"bbox": [5, 5, 60, 60], "bbox_mode": 0, "category_id": 1, "iscrowd": 1},
            {"bbox": [120, 90, 180, 150], "bbox_mode": 0, "category_id": 1},
        ]
        dicts.append({"file_name": str(path), "height": h, "width": w, "image_id": i,
                      "annotations": annotations})
    return dicts


def test_mapper_keeps_attribute_rows_aligned_with_instances(tmp_path):
    mapper = AttributeDatasetMapper(attr_cfg(), is_train=True)
    mapped = mapper(dataset_dicts(tmp_path)[0])
    instances = mapped["instances"]
    # The empty box and the crowd box are gone; rows follow the instances left.
    assert instances.gt_classes.tolist() == [0, 2, 1]
    assert instances.gt_attributes.tolist() == [[0, 2, -1], [3, -1, -1], [-1, -1, -1]]


@pytest.mark.parametrize(
    "ids, message",
    [([0, 1, 2, 3], "more than MODEL.ROI_ATTRIBUTE_HEAD.MAX_ATTRIBUTES_PER_INSTANCE"),
     ([4], r"out of range \[0, 4\)")],
)
def test_mapper_rejects_bad_attribute_ids(tmp_path, ids, message):
    d = dataset_dicts(tmp_path)[0]
    d["annotations"][0]["attribute_ids"] = ids
    with pytest.raises(ValueError, match=message):
        AttributeDatasetMapper(attr_cfg(), is_train=True)(d)


def test_attribute_loss_trains(model, tmp_path):
    mapper = AttributeDatasetMapper(attr_cfg(), is_train=True)
    batch = [mapper(d) for d in dataset_dicts(tmp_path)]
    batch.append({"image": batch[0]["image"], "instances": batch[0]["instances"][:0]})  # no objects
    trained = copy.deepcopy(model).train()
    params = [p for n, p in trained.named_parameters() if "attr" in n or "cls_embedding" in n]
    optimizer = torch.optim.Adam(params, lr=3e-4)
    history = []
    for _ in range(4):
        torch.manual_seed(3)  # the same proposals are sampled every iteration
        with EventStorage():
            losses = trained(batch)
        assert all(torch.isfinite(v) for v in losses.values())
        history.append(float(losses["loss_attr"]))
        optimizer.zero_grad()
        losses["loss_attr"].backward()
        optimizer.step()
    assert all(a > b for a, b in zip(history, history[1:])), history
