"""Box predictors that keep, for every output region, the feature of the proposal behind it."""
import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Instances
from detectron2.utils.registry import Registry

from .attributes import attribute_fields, attribute_logits, attribute_loss, gt_attribute_rows
from .config import attribute_head_node, check_region_settings, region_features_node, region_selection_settings
from .selection import select_butd, select_detections, select_regions, select_vinvl

ROI_BOX_PREDICTOR_REGISTRY = Registry("ROI_BOX_PREDICTOR")
ROI_BOX_PREDICTOR_REGISTRY.__doc__ = """
Registry for the box predictors of d2_regionfeat's ROI heads, chosen by
``cfg.MODEL.REGION_FEATURES.PREDICTOR``. A registered class is called with
``(cfg, input_shape, **overrides)`` and must offer the interface of
:class:`FeatureFastRCNNOutputLayers` (``forward`` returning :class:`RegionPredictions`,
and ``select``), with the parameters of :class:`FastRCNNOutputLayers`.
"""


def build_box_predictor(cfg, input_shape, **overrides):
    """Build the predictor named by ``cfg.MODEL.REGION_FEATURES.PREDICTOR``."""
    name = region_features_node(cfg).PREDICTOR
    return ROI_BOX_PREDICTOR_REGISTRY.get(name)(cfg, input_shape, **overrides)


def feature_predictor_like(cfg, stock):
    """
    The registered predictor standing in for ``stock`` (a :class:`FastRCNNOutputLayers`):
    same input size, box transform and weights, built without drawing from the CPU random
    generator, so a model built from one seed has the weights of the plain model from it
    (the attribute head, when on, is drawn from the generator's current state).
    """
    with torch.random.fork_rng(devices=[]):
        predictor = build_box_predictor(
            cfg,
            ShapeSpec(channels=stock.cls_score.in_features),
            box2box_transform=stock.box2box_transform,
        )
    with_attributes = getattr(predictor, "attribute_on", False)
    predictor.load_state_dict(stock.state_dict(), strict=not with_attributes)
    return predictor


class RegionSelection:
    """
    The settings that choose the output regions of an image, and the choice itself
    (:meth:`select_image`): held by :class:`FeatureFastRCNNOutputLayers`, and by the
    region-feature heads whose own predictor is kept (:class:`RegionSettings`).
    """

    def _init_selection(
        self, selection="detections", class_probs=False, conf_thresh=0.2, min_boxes=10,
        max_boxes=100, region_box="proposal", min_regions=0, vinvl_nms=(0.3, "torchvision"),
    ):
        """Set and check the settings (see :class:`FeatureFastRCNNOutputLayers`)."""
        check_region_settings(
            selection=selection, conf_thresh=conf_thresh, min_boxes=min_boxes,
            max_boxes=max_boxes, region_box=region_box, min_regions=min_regions,
        )
        self.selection = selection
        self.class_probs = class_probs or selection != "detections"
        self.conf_thresh = conf_thresh
        self.min_boxes = min_boxes
        self.max_boxes = max_boxes
        self.region_box = region_box
        self.min_regions = min_regions
        self.vinvl_nms = vinvl_nms
        self._output_shapes = None

    @contextlib.contextmanager
    def output_shapes(self, shapes: Sequence[Tuple[int, int]]):
        """
        Within this context, the images' original (height, width), in order, which "butd"
        selection needs (its NMS runs in original image pixels); set by
        :class:`d2_regionfeat.modeling.meta_arch.RegionFeatureRCNN`.
        """
        self._output_shapes = list(shapes)
        try:
            yield
        finally:
            self._output_shapes = None

    @property
    def needs_proposal_boxes(self) -> bool:
        """Whether :meth:`select_image` needs the proposals' boxes."""
        return self.selection != "detections" or self.min_regions > 0

    def select_image(self, index, boxes, probs, proposal_boxes, image_size, score_thresh,
                     nms_thresh, topk_per_image):
        """
        The output regions of image ``index`` of the batch.

        Args:
            boxes: (R, K*4) or (R, 4) regressed boxes; probs: (R, K+1) class probabilities.
            proposal_boxes (Boxes or None): the R proposals (None: "detections" mode only).
            score_thresh, nms_thresh, topk_per_image: "detections" mode settings.

        Returns:
            Instances (``pred_boxes``, ``scores``, ``pred_classes``), kept (M,): rows among
            the R proposals.
        """
        if self.selection == "butd":
            if self._output_shapes is None:
                from .meta_arch import needs_region_rcnn_message, region_rcnn_setting  # it imports this module

                raise RuntimeError(needs_region_rcnn_message(region_rcnn_setting("butd"), "a model that did not say"))
            return select_butd(
                probs, proposal_boxes, image_size, self._output_shapes[index], self.conf_thresh,
                max(self.min_boxes, self.min_regions), max(self.max_boxes, self.min_regions),
                nms_thresh,
            )
        if self.selection == "vinvl":
            return select_vinvl(
                boxes, probs, proposal_boxes, image_size, self.conf_thresh,
                max(self.min_boxes, self.min_regions), max(self.max_boxes, self.min_regions),
                *self.vinvl_nms, self.region_box,
            )
        # MIN_REGIONS raises the bounds of the region-per-proposal modes
        if self.selection == "regions":
            return select_regions(
                boxes, probs, proposal_boxes, image_size, nms_thresh, self.conf_thresh,
                max(self.min_boxes, self.min_regions), max(self.max_boxes, self.min_regions),
                self.region_box,
            )
        result, kept = select_detections(
            boxes, probs, image_size, score_thresh, nms_thresh, topk_per_image
        )
        if len(result) < self.min_regions:  # bottom-up-attention's fallback: top-N by score
            result, kept = select_regions(
                boxes, probs, proposal_boxes, image_size, nms_thresh, float("inf"),
                self.min_regions, self.min_regions, "regressed",
            )
        return result, kept

    def attach_region_fields(self, result, kept, features, probs, attr_probs=None):
        """
        Give ``result`` the region fields of its rows ``kept`` (M,), from the image's
        (R, D) ``features``, (R, K+1) ``probs`` and (R, A+1) ``attr_probs`` (or None).
        """
        result.box_features = features[kept]
        result.proposal_index = kept
        if self.class_probs:
            result.class_probs = probs[kept]
        if attr_probs is not None:
            for name, value in attribute_fields(attr_probs[kept]).items():
                result.set(name, value)
        return result


class RegionSettings(RegionSelection):
    """The selection settings of a region-feature head whose own box predictor is kept."""

    def __init__(self, **settings):
        self._init_selection(**settings)


class RegionPredictions(tuple):
    """
    ``(scores, proposal_deltas)`` exactly as :meth:`FastRCNNOutputLayers.forward` returns
    them (so every consumer that unpacks two values works unchanged), plus ``features``:
    the (R, D) predictor input, one row per proposal of the batch, and ``attr_logits``:
    (R, A+1) attribute logits at inference with the attribute head on, else None.
    """

    def __new__(cls, scores, proposal_deltas, features, attr_logits=None):
        self = super().__new__(cls, (scores, proposal_deltas))
        self.features = features
        self.attr_logits = attr_logits
        return self


@ROI_BOX_PREDICTOR_REGISTRY.register()
class FeatureFastRCNNOutputLayers(RegionSelection, FastRCNNOutputLayers):
    """
    :class:`FastRCNNOutputLayers` whose inference also returns, for every output region,
    ``box_features`` (its proposal's predictor input, (D,)), ``proposal_index`` (that
    proposal's row among the image's proposals) and optionally ``class_probs`` ((K+1,)).

    Parameters and losses are those of :class:`FastRCNNOutputLayers`; with the attribute
    head on (``MODEL.ATTRIBUTE_ON``) it also has ``cls_embedding`` (Embedding(K+1, E)),
    ``fc_attr`` (Linear(D+E, H)) and ``attr_score`` (Linear(H, A+1)), gives every output
    region ``attr_probs`` (A+1,), ``attrs_id`` and ``attrs_conf`` (see
    :mod:`d2_regionfeat.modeling.attributes`), and trains them with ``loss_attr``.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        selection: str = "detections",
        class_probs: bool = False,
        conf_thresh: float = 0.2,
        min_boxes: int = 10,
        max_boxes: int = 100,
        region_box: str = "proposal",
        min_regions: int = 0,
        num_attributes: int = 0,
        attr_embed_dim: int = 256,
        attr_hidden_dim: int = 512,
        attr_loss_weight: float = 1.0,
        max_attributes: int = 16,
        vinvl_nms: Tuple[float, str] = (0.3, "torchvision"),
        **kwargs,
    ):
        """
        Args:
            selection: "detections" (detectron2's post-processing), "regions" (one region
                per proposal, bottom-up-attention style; see :func:`select_regions`) or
                "butd" (generate_tsv.py's selection; see :func:`select_butd`).
            class_probs: add ``class_probs`` in "detections" mode (the others always do).
            conf_thresh, min_boxes, max_boxes: "regions" and "butd" mode settings.
            region_box: "regions" mode setting.
            min_regions: at least this many regions per image (see MIN_REGIONS).
            num_attributes: A, the number of real attributes; 0: no attribute head.
            attr_embed_dim, attr_hidden_dim: sizes E and H of the attribute head.
            attr_loss_weight: weight of ``loss_attr``.
            max_attributes: columns of ``gt_attributes`` (for images without annotations).
            vinvl_nms: "vinvl" mode's NMS threshold and IoU (see :func:`select_vinvl`).
            kwargs: arguments of :class:`FastRCNNOutputLayers`.
        """
        super().__init__(input_shape, **kwargs)
        self._init_selection(
            selection, class_probs, conf_thresh, min_boxes, max_boxes, region_box, min_regions,
            vinvl_nms,
        )
        self.attribute_on = num_attributes > 0
        if self.attribute_on:
            feature_dim = self.cls_score.in_features
            self.cls_embedding = nn.Embedding(self.num_classes + 1, attr_embed_dim)
            self.fc_attr = nn.Linear(feature_dim + attr_embed_dim, attr_hidden_dim)
            self.attr_score = nn.Linear(attr_hidden_dim, num_attributes + 1)
            nn.init.normal_(self.attr_score.weight, std=0.01)
            nn.init.constant_(self.attr_score.bias, 0)
            self.attr_loss_weight = attr_loss_weight
            self.max_attributes = max_attributes

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(region_selection_settings(cfg))
        attributes = attribute_head_node(cfg)
        if attributes is not None:
            ret.update(
                num_attributes=attributes.NUM_ATTRIBUTES,
                attr_embed_dim=attributes.EMBED_DIM,
                attr_hidden_dim=attributes.HIDDEN_DIM,
                attr_loss_weight=attributes.LOSS_WEIGHT,
                max_attributes=attributes.MAX_ATTRIBUTES_PER_INSTANCE,
            )
        return ret

    def forward(self, x):
        """
        Args:
            x: (R, D) or (R, C, H, W) per-proposal features.

        Returns:
            RegionPredictions: (scores (R, K+1), proposal_deltas (R, K*4 or 4)) with
            ``features`` (R, D'), ``x`` flattened, and ``attr_logits`` (R, A+1) at inference
            with the attribute head on (classes: argmax of ``scores``).
        """
        scores, proposal_deltas = super().forward(x)
        features = torch.flatten(x, start_dim=1)
        attr_logits = None
        if self.attribute_on and not self.training:
            attr_logits = attribute_logits(self, features, scores.argmax(dim=1))
        return RegionPredictions(scores, proposal_deltas, features, attr_logits)

    def losses(self, predictions: RegionPredictions, proposals: List[Instances]):
        """
        :meth:`FastRCNNOutputLayers.losses`, plus ``loss_attr`` with the attribute head on:
        :func:`attribute_loss` over the foreground proposals that have ground-truth
        attributes, their class embedding taken at their ground-truth class.
        """
        losses = super().losses(predictions, proposals)
        if self.attribute_on:
            gt_classes = torch.cat([p.gt_classes for p in proposals], dim=0)
            gt_attributes = gt_attribute_rows(proposals, self.max_attributes)
            rows = (gt_classes < self.num_classes) & (gt_classes >= 0)
            rows &= (gt_attributes >= 0).any(dim=1)
            logits = attribute_logits(self, predictions.features[rows], gt_classes[rows])
            losses["loss_attr"] = self.attr_loss_weight * attribute_loss(
                logits, gt_attributes[rows]
            )
        return losses

    def predict_attr_probs(self, predictions: RegionPredictions) -> Optional[torch.Tensor]:
        """(R, A+1) attribute probabilities ("no attribute" last), or None without the head."""
        if predictions.attr_logits is None:
            return None
        return F.softmax(predictions.attr_logits, dim=-1)

    def inference(self, predictions: RegionPredictions, proposals: List[Instances]):
        """
        Like :meth:`FastRCNNOutputLayers.inference`: returns ``(instances, kept)``, where
        ``kept[i]`` (Mi,) are rows among image i's proposals; ``instances`` carry the extra
        fields listed in the class docstring.
        """
        boxes = self.predict_boxes(predictions, proposals)
        probs = self.predict_probs(predictions, proposals)
        return self.select(
            boxes, probs, predictions.features, proposals, self.predict_attr_probs(predictions)
        )

    def select(self, boxes, probs, features, proposals, attr_probs=None):
        """
        Select the output regions of every image and attach their features.

        Args:
            boxes (list[Tensor]): per image (Ri, K*4) or (Ri, 4) regressed boxes.
            probs (list[Tensor]): per image (Ri, K+1) class probabilities.
            features (Tensor): (sum Ri, D) one feature per proposal, images in order.
            proposals (list[Instances]): per image, with ``proposal_boxes``.
            attr_probs (Tensor or None): (sum Ri, A+1) attribute probabilities.

        Returns:
            list[Instances], list[Tensor]: as :meth:`inference`.
        """
        sizes = [len(p) for p in proposals]
        features = features.split(sizes)
        attr_probs = attr_probs.split(sizes) if attr_probs is not None else [None] * len(sizes)
        results, kept_per_image = [], []
        for i, (boxes_i, probs_i, features_i, proposals_i, attr_probs_i) in enumerate(
            zip(boxes, probs, features, proposals, attr_probs)
        ):
            result, kept = self.select_image(
                i, boxes_i, probs_i, proposals_i.proposal_boxes, proposals_i.image_size,
                self.test_score_thresh, self.test_nms_thresh, self.test_topk_per_image,
            )
            results.append(self.attach_region_fields(result, kept, features_i, probs_i, attr_probs_i))
            kept_per_image.append(kept)
        return results, kept_per_image
