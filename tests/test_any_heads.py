"""
Region features from any ROI heads: stand-ins that restate each pattern of real heads
(TridentNet's branch merge, Detic's re-scored cascade and custom Res5 with an extra-argument
predictor, DensePose's extra head, a lab's own subclass), the contract errors, SOURCE_MODULE,
and enable_region_features on yacs and LazyConfig configs.
"""
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2 import model_zoo
from detectron2.config import LazyConfig, configurable, instantiate
from detectron2.layers import ShapeSpec, batched_nms
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads import (
    ROI_HEADS_REGISTRY,
    CascadeROIHeads,
    Res5ROIHeads,
    ROIHeads,
    StandardROIHeads,
)
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, Instances

from d2_regionfeat import FeatureFastRCNNOutputLayers, enable_region_features, region_feature_heads
from d2_regionfeat.modeling.region_heads import ContractError
from helpers import build as build_tamed
from helpers import assert_float64_close, float64, float64_inputs, inputs, make_cfg
from reference import backbone_and_proposals, pooled_and_head, proposal_outputs

BATCH = ((1, 200, 280), (2, 210, 270))


def build_model_of(cfg, seed):
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    return build_model(cfg).eval()


# ---- stand-ins, each restating one pattern -------------------------------------------------


def _tiled(proposals, shift):
    out = []
    for p in proposals:
        q = Instances(p.image_size)
        q.proposal_boxes = Boxes(p.proposal_boxes.tensor + shift)
        q.proposal_boxes.clip(p.image_size)
        q.objectness_logits = p.objectness_logits
        out.append(q)
    return out


@ROI_HEADS_REGISTRY.register()
class TridentLikeROIHeads(StandardROIHeads):
    """Plain ``__init__(cfg, input_shape)``; two branches (the second on shifted proposals),
    run through ``super().forward``, then merged per image: cat, NMS, top-k."""

    def __init__(self, cfg, input_shape):
        super().__init__(cfg, input_shape)
        self.num_branch = 2

    def forward(self, images, features, proposals, targets=None):
        if self.training:
            return super().forward(images, features, proposals, targets)
        n = len(proposals)
        features = {k: torch.cat([v] * self.num_branch) for k, v in features.items()}
        proposals = list(proposals) + _tiled(proposals, 6.0)
        instances, losses = super().forward(images, features, proposals, targets)
        merged = []
        for i in range(n):
            x = Instances.cat([instances[i + n * j] for j in range(self.num_branch)])
            keep = batched_nms(x.pred_boxes.tensor, x.scores, x.pred_classes, 0.5)[:50]
            merged.append(x[keep])
        return merged, losses


class ZeroShotLike(nn.Module):
    """Detic's classifier: a linear map to an embedding, L2-normalised, times class embeddings."""

    def __init__(self, dim, embed_dim, num_classes):
        super().__init__()
        self.linear = nn.Linear(dim, embed_dim)
        weight = F.normalize(torch.randn(embed_dim, num_classes), dim=0)
        self.register_buffer("zs_weight", torch.cat([weight, torch.zeros(embed_dim, 1)], dim=1))

    def forward(self, x, classifier=None):
        return 5.0 * F.normalize(self.linear(x), dim=1) @ self.zs_weight


class ExtraArgPredictor(FastRCNNOutputLayers):
    """A predictor whose forward takes ``classifier_info`` and whose cls_score has no in_features."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        dim = self.bbox_pred.in_features
        self.cls_score = ZeroShotLike(dim, 16, self.num_classes)

    def forward(self, x, classifier_info=(None, None, None)):
        x = x.flatten(1)
        return self.cls_score(x, classifier_info[0]), self.bbox_pred(x)


@ROI_HEADS_REGISTRY.register()
class DeticLikeCascadeROIHeads(CascadeROIHeads):
    """Stage scores averaged and re-scored by the proposal score, then the module-level
    ``fast_rcnn_inference``; per-stage predictors taking ``classifier_info``."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictors"] = [
            ExtraArgPredictor(cfg, head.output_shape, box2box_transform=Box2BoxTransform(weights=w))
            for head, w in zip(ret["box_heads"], cfg.MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS)
        ]
        return ret

    def _create_proposals_from_boxes(self, boxes, image_sizes, logits):
        proposals = super()._create_proposals_from_boxes(boxes, image_sizes)
        for p, logit in zip(proposals, logits):
            p.objectness_logits = logit
        return proposals

    def _run_stage(self, features, proposals, stage, classifier_info=(None, None, None)):
        pooled = self.box_pooler(features, [x.proposal_boxes for x in proposals])
        return self.box_predictor[stage](self.box_head[stage](pooled), classifier_info=classifier_info)

    def _forward_box(self, features, proposals, targets=None, classifier_info=(None, None, None)):
        if self.training:
            return super()._forward_box(features, proposals, targets)
        features = [features[f] for f in self.box_in_features]
        proposal_scores = [p.objectness_logits.sigmoid() for p in proposals]
        image_sizes = [x.image_size for x in proposals]
        scores_per_stage, boxes = [], None
        for k in range(self.num_cascade_stages):
            if k > 0:
                proposals = self._create_proposals_from_boxes(
                    boxes, image_sizes, [p.objectness_logits for p in proposals]
                )
            predictions = self._run_stage(features, proposals, k, classifier_info)
            predictor = self.box_predictor[k]
            boxes = predictor.predict_boxes((predictions[0], predictions[1]), proposals)
            scores_per_stage.append(predictor.predict_probs(predictions, proposals))
        scores = [
            (sum(s) / self.num_cascade_stages * ps[:, None]).sqrt()
            for s, ps in zip(zip(*scores_per_stage), proposal_scores)
        ]
        last = self.box_predictor[-1]
        instances, _ = fast_rcnn_inference(
            boxes, scores, image_sizes, last.test_score_thresh, last.test_nms_thresh,
            last.test_topk_per_image,
        )
        return instances

    def forward(self, images, features, proposals, targets=None, ann_type="box",
                classifier_info=(None, None, None)):
        if self.training:
            return super().forward(images, features, proposals, targets)
        instances = self._forward_box(features, proposals, classifier_info=classifier_info)
        return self.forward_with_given_boxes(features, instances), {}


@ROI_HEADS_REGISTRY.register()
class CustomRes5LikeROIHeads(Res5ROIHeads):
    """``cfg`` in the kwargs, the predictor replaced after ``super().__init__``, its own forward."""

    @configurable
    def __init__(self, **kwargs):
        cfg = kwargs.pop("cfg")
        super().__init__(**kwargs)
        channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8
        self.box_predictor = ExtraArgPredictor(cfg, ShapeSpec(channels=channels, height=1, width=1))

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["cfg"] = cfg
        return ret

    def forward(self, images, features, proposals, targets=None, ann_type="box",
                classifier_info=(None, None, None)):
        if self.training:
            return super().forward(images, features, proposals, targets)
        boxes = [x.proposal_boxes for x in proposals]
        box_features = self._shared_roi_transform([features[f] for f in self.in_features], boxes)
        predictions = self.box_predictor(box_features.mean(dim=[2, 3]), classifier_info=classifier_info)
        instances, _ = self.box_predictor.inference(predictions, proposals)
        return self.forward_with_given_boxes(features, instances), {}


@ROI_HEADS_REGISTRY.register()
class DensePoseLikeROIHeads(StandardROIHeads):
    """Plain ``__init__(cfg, input_shape)`` adding its own head, run on the final boxes."""

    def __init__(self, cfg, input_shape):
        super().__init__(cfg, input_shape)
        self.extra_head = nn.Conv2d(cfg.MODEL.FPN.OUT_CHANNELS, 2, 1)

    def forward_with_given_boxes(self, features, instances):
        instances = super().forward_with_given_boxes(features, instances)
        pooled = self.box_pooler([features[f] for f in self.box_in_features], [x.pred_boxes for x in instances])
        extra = self.extra_head(pooled).mean(dim=[2, 3])
        for x, e in zip(instances, extra.split([len(x) for x in instances])):
            x.pred_extra = e
        return instances


@ROI_HEADS_REGISTRY.register()
class UserROIHeads(StandardROIHeads):
    """A lab's own subclass: drops low-scoring detections after the stock box path."""

    def _forward_box(self, features, proposals):
        out = super()._forward_box(features, proposals)
        if self.training:
            return out
        return [x[x.scores > 0.15] for x in out]


@ROI_HEADS_REGISTRY.register()
class SelfSelectingROIHeads(StandardROIHeads):
    """Breaks the contract: builds its detections itself, so no kept index exists."""

    def _forward_box(self, features, proposals):
        if self.training:
            return super()._forward_box(features, proposals)
        pooled = self.box_pooler([features[f] for f in self.box_in_features], [p.proposal_boxes for p in proposals])
        scores, _ = self.box_predictor(self.box_head(pooled))
        out = []
        for p, s in zip(proposals, scores.split([len(p) for p in proposals])):
            x = Instances(p.image_size)
            x.pred_boxes = p.proposal_boxes[:5]
            x.scores, x.pred_classes = s[:5, :-1].max(dim=1)
            out.append(x)
        return out


# ---- configs and models --------------------------------------------------------------------


def narrow(cfg):
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
    return cfg


def narrow_fpn(head, **region_features):
    cfg = narrow(make_cfg("fpn" if head != "DeticLikeCascadeROIHeads" else "cascade", **region_features))
    cfg.MODEL.BACKBONE.NAME = "build_narrow_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 16
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    if head == "DeticLikeCascadeROIHeads":
        cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS = (0.5, 0.6)
        cfg.MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0))
    return cfg


def narrow_c4(**region_features):
    cfg = narrow(make_cfg("c4", **region_features))
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    return cfg


def head_cfg(head, feature=True, **region_features):
    cfg = narrow_c4(**region_features) if head == "CustomRes5LikeROIHeads" else narrow_fpn(head, **region_features)
    cfg.MODEL.ROI_HEADS.NAME = head
    return enable_region_features(cfg) if feature else cfg


STAND_INS = ["TridentLikeROIHeads", "DeticLikeCascadeROIHeads", "CustomRes5LikeROIHeads",
             "DensePoseLikeROIHeads", "UserROIHeads"]


@pytest.fixture(scope="session")
def pairs():
    """head name -> (plain model, region-feature model of the same weights)."""
    out = {}
    for head in STAND_INS:
        plain = build(head_cfg(head, feature=False), seed=0)
        feature = build(head_cfg(head, class_probs=True), seed=0, wild=True)
        feature.load_state_dict(plain.state_dict())
        out[head] = plain, feature
    return out


def build(cfg, seed=0, wild=False):
    """helpers.build; heads whose classifier is not a Linear get only their RPN tamed."""
    if cfg.MODEL.ROI_HEADS.NAME in ("DeticLikeCascadeROIHeads", "CustomRes5LikeROIHeads") or (
        cfg.MODEL.REGION_FEATURES.BASE_ROI_HEADS in ("DeticLikeCascadeROIHeads", "CustomRes5LikeROIHeads")
        and cfg.MODEL.ROI_HEADS.NAME == "FeatureROIHeads"
    ):
        model = build_model_of(cfg, seed)
        with torch.no_grad():
            model.proposal_generator.rpn_head.anchor_deltas.weight.mul_(1e-2)
            model.proposal_generator.rpn_head.anchor_deltas.bias.zero_()
        return model
    return build_tamed(cfg, seed, wild)


def run(model, batch, postprocess=True):
    with torch.no_grad():
        outs = model.inference(batch, do_postprocess=postprocess)
    return [o["instances"] for o in outs] if postprocess else outs


def _tensor(value):
    return value.tensor if isinstance(value, Boxes) else value


@pytest.mark.equality
@pytest.mark.parametrize("head", STAND_INS)
def test_detections_bit_equal_to_the_plain_head(pairs, head):
    plain, feature = pairs[head]
    assert type(feature.roi_heads).__name__ == "Feature" + head
    assert list(plain.state_dict()) == list(feature.state_dict())
    expected, got = run(plain, inputs(*BATCH)), run(feature, inputs(*BATCH))
    assert sum(len(x) for x in expected) > 0
    for e, g in zip(expected, got):
        assert set(g.get_fields()) == set(e.get_fields()) | {"box_features", "proposal_index", "class_probs"}
        for name, value in e.get_fields().items():
            assert torch.equal(_tensor(value), _tensor(g.get(name))), name


def _hand_features(model, batch):
    """Per image, (R, D) pool-then-box-head rows of the proposals of the final predictor call,
    per branch for the Trident-like head."""
    features, proposals = backbone_and_proposals(model, batch)
    heads = model.roi_heads
    if isinstance(heads, CascadeROIHeads):
        return [[ref["head"]] for ref in proposal_outputs(model, features, proposals)]
    branches = [proposals] + ([_tiled(proposals, 6.0)] if isinstance(heads, TridentLikeROIHeads) else [])
    out = [[] for _ in proposals]
    for props in branches:
        _, head = pooled_and_head(model, features, [p.proposal_boxes for p in props])
        for i, rows in enumerate(head.split([len(p) for p in props])):
            out[i].append(rows)
    return out


def _trident_branches(model, batch):
    """
    Per image, the branch of each merged detection of the Trident-like head: its merge
    restated (per-branch detections, cat in branch order, the same NMS and top-k), with the
    branch carried as a field.
    """
    heads = model.roi_heads
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features)
    n = len(proposals)
    tiled = {k: torch.cat([v] * heads.num_branch) for k, v in features.items()}
    instances, _ = StandardROIHeads.forward(heads, images, tiled, list(proposals) + _tiled(proposals, 6.0))
    out = []
    for i in range(n):
        per_branch = [instances[i + n * j] for j in range(heads.num_branch)]
        for j, x in enumerate(per_branch):
            x.branch = torch.full((len(x),), j)
        x = Instances.cat(per_branch)
        keep = batched_nms(x.pred_boxes.tensor, x.scores, x.pred_classes, 0.5)[:50]
        out.append(x[keep].branch)
    return out


@pytest.mark.equality
@pytest.mark.parametrize("head", STAND_INS)
def test_box_features_are_those_of_the_proposal_behind_each_detection(pairs, head):
    _, feature = pairs[head]
    batch = inputs(*BATCH)
    with torch.no_grad():
        hand = _hand_features(feature, batch)
        results = run(feature, batch, postprocess=False)
        branches = _trident_branches(feature, batch) if head == "TridentLikeROIHeads" else [
            torch.zeros(len(r), dtype=torch.long) for r in results
        ]
    assert sum(len(r) for r in results) > 0
    if head == "TridentLikeROIHeads":
        assert all(0 < int(b.sum()) < len(b) for b in branches), "both branches should keep detections"
    for per_branch, res, branch in zip(hand, results, branches):
        assert len(branch) == len(res)
        for row, index, j in zip(res.box_features, res.proposal_index, branch):
            # the row of the detection's own branch (for Trident), not any branch's
            assert torch.equal(row, per_branch[j][index])


@pytest.mark.equality
@pytest.mark.parametrize("head", STAND_INS)
def test_batch_of_two_equals_two_single_calls(pairs, head):
    """Exact in float64 (float32 batched convolutions round with the CPU's kernels)."""
    _, feature = pairs[head]
    # C4 pads to the batch's largest image: same sizes, so that padding does not change
    batch = inputs(*BATCH) if head != "CustomRes5LikeROIHeads" else inputs(*[(s, 200, 280) for s, _, _ in BATCH])
    with float64(feature):
        batched = run(feature, float64_inputs(batch))
        singles = [run(feature, float64_inputs([x]))[0] for x in batch]
    assert sum(len(x) for x in batched) > 0
    for single, from_batch in zip(singles, batched):
        assert len(single) == len(from_batch)
        assert torch.equal(single.proposal_index, from_batch.proposal_index)
        for name in ("box_features", "class_probs", "scores"):
            assert_float64_close(single.get(name), from_batch.get(name))


def test_contract_breaking_head_gets_one_line_error():
    model = build(head_cfg("SelfSelectingROIHeads"), wild=True)
    with pytest.raises(ContractError, match="FeatureSelfSelectingROIHeads: its detections never went"):
        run(model, inputs(BATCH[0]))


def test_source_module_on_fpn_is_the_module_output_for_kept_proposals():
    model = build(head_cfg("UserROIHeads", source_module="box_head.fc1"))
    batch = inputs(*BATCH)
    with torch.no_grad():
        features, proposals = backbone_and_proposals(model, batch)
        pooled, _ = pooled_and_head(model, features, [p.proposal_boxes for p in proposals])
        fc1 = model.roi_heads.box_head.fc1(pooled.flatten(1))  # before its ReLU
    results = run(model, batch, postprocess=False)
    assert sum(len(r) for r in results) > 0 and model.roi_heads.region_fields().feature_dim is None
    for rows, res in zip(fc1.split([len(p) for p in proposals]), results):
        assert torch.equal(res.box_features, rows[res.proposal_index])


def test_source_module_on_the_detic_like_head_is_its_embedding(pairs):
    model = build(head_cfg("DeticLikeCascadeROIHeads", source_module="box_predictor.1.cls_score.linear"))
    batch = inputs(*BATCH)
    with torch.no_grad():
        hand = [ref["head"] for ref in proposal_outputs(model, *backbone_and_proposals(model, batch))]
        results = run(model, batch, postprocess=False)
    assert sum(len(r) for r in results) > 0
    linear = model.roi_heads.box_predictor[1].cls_score.linear
    for rows, res in zip(hand, results):
        torch.testing.assert_close(res.box_features, linear(rows)[res.proposal_index], rtol=0, atol=1e-6)


def test_source_module_errors():
    with pytest.raises(ValueError, match="'box_head.fc9' is not a module of FeatureUserROIHeads"):
        build(head_cfg("UserROIHeads", source_module="box_head.fc9"))
    with pytest.raises(ValueError, match="SOURCE must be box_head and POOL_AT proposal"):
        build(head_cfg("UserROIHeads", source_module="box_head.fc1", pool_at="final"))
    # the first stage's module: the last stage's predictor call has no rows of its own
    model = build(head_cfg("DeticLikeCascadeROIHeads", source_module="box_predictor.0.cls_score.linear"))
    with pytest.raises(ValueError, match="must give one row per proposal"):
        run(model, inputs(BATCH[0]))


def test_settings_are_checked_at_construction():
    with pytest.raises(ValueError, match="SELECTION must be one of"):
        FeatureFastRCNNOutputLayers(
            ShapeSpec(channels=8), box2box_transform=Box2BoxTransform((1.0, 1.0, 1.0, 1.0)),
            num_classes=2, selection="butd_typo",
        )
    with pytest.raises(ValueError, match='"butd" .* needs MODEL.META_ARCHITECTURE "RegionFeatureRCNN"'):
        cfg = head_cfg("UserROIHeads", selection="butd")
        cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
        build(cfg, wild=True)

    class MinimalHeads(ROIHeads):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.box_predictor = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="need a known box pooler and box head"):
        region_feature_heads(MinimalHeads)(
            num_classes=2, batch_size_per_image=8, positive_fraction=0.25,
            proposal_matcher=Matcher([0.5], [0, 1]), pool_at="final",
        )


def test_enable_region_features_on_yacs():
    cfg = head_cfg("TridentLikeROIHeads", feature=False)
    cfg.MODEL.REGION_FEATURES.SELECTION = "butd"
    enabled = enable_region_features(cfg)
    assert cfg.MODEL.ROI_HEADS.NAME == "TridentLikeROIHeads"  # a copy
    assert enabled.MODEL.ROI_HEADS.NAME == "FeatureROIHeads"
    assert enabled.MODEL.REGION_FEATURES.BASE_ROI_HEADS == "TridentLikeROIHeads"
    assert enabled.MODEL.META_ARCHITECTURE == "RegionFeatureRCNN"
    assert enable_region_features(enabled) == enabled
    stock = enable_region_features(make_cfg("fpn", feature=False))
    assert stock.MODEL.REGION_FEATURES.BASE_ROI_HEADS == "StandardROIHeads"
    assert enable_region_features(make_cfg("cascade")).MODEL.ROI_HEADS.NAME == "FeatureCascadeROIHeads"


def _narrow_lazy(cfg):
    bottom_up = cfg.model.backbone.bottom_up
    bottom_up.stages.depth = 18
    del bottom_up.stages.stride_in_1x1
    cfg.model.backbone.in_features = ["res2", "res3", "res4", "res5"]
    for key in ("mask_in_features", "mask_pooler", "mask_head"):
        del cfg.model.roi_heads[key]
    cfg.model.roi_heads.num_classes = 3
    cfg.model.proposal_generator.post_nms_topk = (100, 100)
    return cfg


def test_enable_region_features_on_lazy_configs():
    ours = LazyConfig.load("configs/mask_rcnn_R_50_FPN_lazy.py")
    same = enable_region_features(ours)
    assert same.model.roi_heads._target_ is ours.model.roi_heads._target_
    assert same.model.roi_heads.box_predictor._target_ is FeatureFastRCNNOutputLayers

    zoo = LazyConfig.load(model_zoo.get_config_file("common/models/cascade_rcnn.py"))
    cascade = enable_region_features(zoo)
    assert zoo.model.roi_heads._target_ is CascadeROIHeads  # a copy
    assert cascade.model.roi_heads._target_.__name__ == "FeatureCascadeROIHeads"
    assert cascade.model.roi_heads.box_predictors[-1]._target_ is FeatureFastRCNNOutputLayers
    assert cascade.model.roi_heads.box_predictors[0]._target_ is FastRCNNOutputLayers


class LabRCNN(GeneralizedRCNN):
    """A lab's own meta-architecture (not a RegionFeatureRCNN)."""


class LabPredictor(FastRCNNOutputLayers):
    """A lab's own box predictor (kept by the heads as it is)."""


def test_one_meta_architecture_rule_for_yacs_and_lazy_configs():
    """
    "butd" selection needs RegionFeatureRCNN (issue 24 bug 10): enable_region_features switches
    a plain GeneralizedRCNN in a LazyConfig as in a yacs config, and a LazyConfig model that
    cannot give it fails when it is built (the tools' ModelConfig), not at its first image.
    """
    from d2_regionfeat.extraction.model_config import ConfigError, load_model_config
    from d2_regionfeat.modeling.meta_arch import RegionFeatureRCNN

    cfg = LazyConfig.load(model_zoo.get_config_file("common/models/mask_rcnn_fpn.py"))
    assert enable_region_features(cfg).model._target_ is GeneralizedRCNN  # detections: left alone
    butd = enable_region_features(cfg)
    butd.model.roi_heads.box_predictor.selection = "butd"
    assert enable_region_features(butd).model._target_ is RegionFeatureRCNN
    cfg.model.roi_heads.box_predictor._target_ = LabPredictor  # kept: the heads' region_selection rules
    cfg.model.roi_heads.region_selection = {"selection": "butd"}
    assert enable_region_features(cfg).model._target_ is RegionFeatureRCNN

    narrow = _narrow_lazy(LazyConfig.load(model_zoo.get_config_file("common/models/mask_rcnn_fpn.py")))
    narrow.model._target_ = LabRCNN
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "lab.yaml")
        LazyConfig.save(narrow, path)
        config = load_model_config(path, ["region_features.selection=butd"], device="cpu")
        with pytest.raises(ValueError, match='"butd" .* needs MODEL.META_ARCHITECTURE "RegionFeatureRCNN" .*got LabRCNN'):
            config.build_model()
        yacs = make_cfg("fpn")
        yacs.MODEL.REGION_FEATURES.SELECTION = "butd"
        yacs.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
        with pytest.raises(ValueError, match='"butd" .* needs MODEL.META_ARCHITECTURE "RegionFeatureRCNN" .*got GeneralizedRCNN'):
            build_tamed(yacs, wild=True)
    assert issubclass(ConfigError, ValueError)


def test_lazy_model_zoo_model_gives_region_features_with_plain_detections():
    cfg = _narrow_lazy(LazyConfig.load(model_zoo.get_config_file("common/models/mask_rcnn_fpn.py")))
    torch.manual_seed(0)
    plain = instantiate(cfg.model).eval()
    feature = instantiate(enable_region_features(cfg).model).eval()
    feature.load_state_dict(plain.state_dict())
    from helpers import tame

    tame(plain)
    feature.load_state_dict(plain.state_dict())
    batch = inputs(*BATCH)
    expected, got = run(plain, batch), run(feature, batch)
    assert sum(len(x) for x in expected) > 0
    with torch.no_grad():
        features, proposals = backbone_and_proposals(feature, batch)
        _, head = pooled_and_head(feature, features, [p.proposal_boxes for p in proposals])
    for e, g, rows in zip(expected, got, head.split([len(p) for p in proposals])):
        assert torch.equal(e.pred_boxes.tensor, g.pred_boxes.tensor)
        assert torch.equal(e.scores, g.scores)
        assert torch.equal(g.box_features, rows[g.proposal_index])


def test_heads_keeping_their_predictor_take_every_selection_setting():
    """
    One reading of the config's selection settings (config.region_selection_settings) for the
    Feature predictor and for heads whose own predictor is kept (issue 24 bug 11: the heads'
    copy lacked MODEL.VINVL's NMS, so "vinvl" selection ran torchvision's NMS at 0.3 there).
    """
    from d2_regionfeat.modeling.predictor import RegionSettings

    settings = dict(selection="vinvl", conf_thresh=0.1, min_boxes=3, max_boxes=7, min_regions=2)
    cfg = head_cfg("DeticLikeCascadeROIHeads", **settings)
    cfg.MODEL.VINVL.NMS_THRESH, cfg.MODEL.VINVL.NMS_IOU = 0.45, "legacy_ge"
    heads = build(cfg, wild=True).roi_heads
    kept = heads.region_selection
    assert isinstance(kept, RegionSettings)  # the heads' own predictor is kept
    assert kept.vinvl_nms == (0.45, "legacy_ge")
    assert (kept.selection, kept.conf_thresh, kept.min_boxes, kept.max_boxes, kept.min_regions) == (
        "vinvl", 0.1, 3, 7, 2)
    stock = build(head_cfg("UserROIHeads", **settings), wild=True).roi_heads.region_selection
    assert isinstance(stock, FeatureFastRCNNOutputLayers) and stock.vinvl_nms == (0.3, "torchvision")
