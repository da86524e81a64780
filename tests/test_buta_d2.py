"""
BUTA.pt's detectron2-trained checkpoints (configs/BUTA/d2-*.yaml) at reduced depth and narrow
widths: a checkpoint in their key layout (detectron2's GeneralizedRCNN with Res5ROIHeads, plus
grid-feats-vqa's ``roi_heads.attribute_predictor``, as its detectron2 v0.2.1 saved it: with
``cell_anchors.0``, beside ``iteration``) loads with nothing missing, unused or skipped, and the
model's detections equal its extraction (``utils/extract_d2features.py`` ``model_inference``,
mode 1) restated on detectron2's stock modules: boxes, classes, class probabilities, features,
attribute probabilities.
"""
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import buta_network as net
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from helpers import assert_scaled_close, narrow, tame
from test_buta_model import images
from test_ports_grid_feats import AttributePredictor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, A = 5, 4
SHORT, MAX_SIZE = 96, 160
NAMES = ["d2-r50", "d2-r101", "d2-X152"]


# BUTA.pt's configs/d2/test-d2-*.yaml (over base-d2.yaml) on detectron2's defaults, restated:
# its network is detectron2's stock one with these values (its AttributeRes5ROIHeads adds the
# attribute head, restated separately)
BASE_D2 = ["MODEL.RPN.PRE_NMS_TOPK_TEST", 6000, "MODEL.RPN.POST_NMS_TOPK_TEST", 1000,
           "MODEL.ROI_HEADS.NAME", "Res5ROIHeads", "MODEL.ROI_HEADS.NUM_CLASSES", 1600,
           "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", 2]
BUTA_D2 = {
    "d2-r50": ["MODEL.RESNETS.DEPTH", 50],
    "d2-r101": ["MODEL.RESNETS.DEPTH", 101],
    "d2-X152": ["MODEL.RESNETS.STRIDE_IN_1X1", False, "MODEL.RESNETS.NUM_GROUPS", 32,
                "MODEL.RESNETS.WIDTH_PER_GROUP", 8, "MODEL.RESNETS.DEPTH", 152,
                "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7],
}


def reduced(cfg):
    """``cfg`` at reduced depth (res2..res4 = 3, 4, 6 blocks), narrow widths (at most 4
    groups), K classes and A attributes, on CPU."""
    cfg.MODEL.DEVICE = "cpu"
    narrow(cfg)
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.NUM_GROUPS = min(cfg.MODEL.RESNETS.NUM_GROUPS, 4)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = K
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES = A
    cfg.MODEL.ROI_ATTRIBUTE_HEAD.EMBED_DIM, cfg.MODEL.ROI_ATTRIBUTE_HEAD.HIDDEN_DIM = 16, 32
    return cfg


def narrow_cfg(name):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "BUTA", f"{name}.yaml"))
    cfg.MODEL.BUTA.TEST_SCALE, cfg.MODEL.BUTA.TEST_MAX_SIZE = SHORT, MAX_SIZE
    return reduced(cfg)


def stock_cfg(name):
    """BUTA.pt's d2-mode network as its config builds it: detectron2's stock parts."""
    cfg = get_cfg()
    cfg.merge_from_list(BASE_D2 + BUTA_D2[name])
    cfg.MODEL.WEIGHTS = ""
    return reduced(cfg)


@pytest.fixture(scope="module", params=NAMES)
def loaded(request, tmp_path_factory):
    name = request.param
    torch.manual_seed(1)
    stock = tame(build_model(stock_cfg(name)).eval())
    torch.manual_seed(2)
    # its add_attribute_config's OBJ_EMBED_DIM 256 and FC_DIM 512, narrowed
    attributes = AttributePredictor(K, stock.roi_heads.res5[-1].out_channels, 16, 32, A).eval()
    with torch.no_grad():
        attributes.attr_score.weight.normal_(std=0.3)
        attributes.attr_score.bias.normal_()
    sd = dict(stock.state_dict())
    sd.update({f"roi_heads.attribute_predictor.{k}": v for k, v in attributes.state_dict().items()})
    # v0.2.1 saved the anchor generator's cell anchors (persistent then)
    sd["proposal_generator.anchor_generator.cell_anchors.0"] = next(iter(stock.proposal_generator.anchor_generator.cell_anchors.buffers()))
    path = tmp_path_factory.mktemp("buta_d2") / f"bua-{name}.pth"
    torch.save({"model": {k: v.clone() for k, v in sd.items()}, "iteration": 179999}, path)
    torch.manual_seed(0)
    model = build_model(narrow_cfg(name)).eval()
    return name, model, stock, attributes, sd, path


def test_checkpoint_loads_with_nothing_missing_unused_or_skipped(loaded, caplog):
    name, model, stock, attributes, sd, path = loaded
    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(model).load(str(path))
    # fvcore warns of missing, unused and skipped (other shape) keys: none
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    own = model.state_dict()
    q = "roi_heads.box_predictor."
    renamed = {"cls_embedding": "obj_embed", "fc_attr": "fc.0"}
    for key, value in own.items():
        if key.startswith(q + "attr_score."):  # its A rows, then the "no attribute" row
            source = sd[key.replace(q, "roi_heads.attribute_predictor.")]
            assert torch.equal(value[:A], source), key
            no_attribute = torch.zeros_like(value[A]) if key.endswith("weight") else torch.tensor(float("-inf"))
            assert torch.equal(value[A], no_attribute), key
        elif key.startswith(tuple(q + k for k in renamed)):
            module = key[len(q):].split(".")[0]
            source = key.replace(q + module, "roi_heads.attribute_predictor." + renamed[module])
            assert torch.equal(value, sd[source]), key
        else:
            assert torch.equal(value, sd[key]), key


@torch.no_grad()
def extract_d2features(stock, attributes, image):
    """
    BUTA.pt's ``model_inference`` (extract mode 1, ``--mode d2``) on an (H, W, 3) BGR uint8
    image: ``get_image_blob`` with mean 0 (the float image resized as cv2 INTER_LINEAR does),
    then the model's own normalisation; its proposals, ``get_roi_features``, box predictor and
    ``box_predictor.inference``; attributes at the argmax of all K + 1 class logits; every row
    indexed by the detections' proposal indices; boxes divided by the scale.
    """
    h, w = image.shape[:2]
    scale = net.image_scale(h, w, SHORT, MAX_SIZE)
    blob = net.cv2_linear_resize(torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1), scale)
    images = stock.preprocess_image([{"image": blob.float()}])
    features = stock.backbone(images.tensor)
    proposals, _ = stock.proposal_generator(images, features, None)
    heads = stock.roi_heads
    pooled = heads._shared_roi_transform([features[f] for f in heads.in_features],
                                         [p.proposal_boxes for p in proposals]).mean(dim=[2, 3])
    predictions = heads.box_predictor(pooled)
    labels = predictions[0].argmax(dim=1)
    cls_probs = F.softmax(predictions[0], dim=-1)[:, :-1]
    (instances,), (rows,) = heads.box_predictor.inference(predictions, proposals)
    attr_probs = F.softmax(attributes(pooled, labels), dim=-1)[rows]
    return {"bbox": instances.pred_boxes.tensor / scale, "objects": instances.pred_classes,
            "scores": instances.scores, "cls_prob": cls_probs[rows], "x": pooled[rows],
            "attr_probs": attr_probs}


@pytest.mark.equality
@torch.no_grad()
def test_detections_equal_its_extraction_restated(loaded):
    name, model, stock, attributes, sd, path = loaded
    DetectionCheckpointer(model).load(str(path))
    for image in images():
        ref = extract_d2features(stock, attributes, image)
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        h, w = image.shape[:2]
        out = model([{"image": tensor, "height": h, "width": w}])[0]["instances"]
        assert out.image_size == (h, w)
        assert 0 < len(out) == len(ref["x"])
        assert torch.equal(out.pred_classes, ref["objects"])
        assert_scaled_close(out.pred_boxes.tensor, ref["bbox"])
        assert_scaled_close(out.scores, ref["scores"])
        assert_scaled_close(out.box_features, ref["x"])
        assert_scaled_close(out.class_probs[:, :-1], ref["cls_prob"])
        assert_scaled_close(out.attr_probs[:, :-1], ref["attr_probs"])
        assert torch.equal(out.attr_probs[:, -1], torch.zeros(len(out)))


@torch.no_grad()
def test_input_is_resized_then_normalised_as_its_d2_mode(loaded):
    """--mode d2: get_image_blob resizes the float image (mean 0), then detectron2's
    preprocess_image normalises it: the same operations in that order give the same bits."""
    from d2_regionfeat.modeling.buta import resize_by_scale

    name, model, stock, *_ = loaded
    for image in images():
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        scale = net.image_scale(*image.shape[:2], SHORT, MAX_SIZE)
        theirs = stock.preprocess_image([{"image": resize_by_scale(tensor.float(), scale)}]).tensor
        assert torch.equal(model.preprocess_image([{"image": tensor}]).tensor, theirs)
