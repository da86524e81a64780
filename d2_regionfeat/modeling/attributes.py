"""
Attributes of regions ("red", "striped", ...): the bottom-up-attention attribute head's
formula, its training loss, and the dataset mapper that gives ground-truth attributes.

The head (its parameters live on the box predictor, see
:class:`d2_regionfeat.modeling.predictor.FeatureFastRCNNOutputLayers`) scores A real attributes plus
"no attribute", which comes LAST (detectron2's convention, as background among classes):

    embedding = cls_embedding[class]                      (R, EMBED_DIM)
    hidden = relu(fc_attr([feature, embedding]))          (R, HIDDEN_DIM)
    attr_logits = attr_score(hidden)                      (R, A + 1)

At inference ``class`` is the argmax of the class logits over all K + 1 entries, background
included (as Caffe's ArgMax layer in bottom-up-attention's test net); in training it is the
proposal's ground-truth class.
"""
from typing import List

import numpy as np
import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.structures import Instances

from .config import attribute_head_node


def attribute_logits(predictor, features, classes):
    """
    Args:
        predictor: a module with ``cls_embedding``, ``fc_attr`` and ``attr_score``.
        features: (R, D) region features (the box predictor's input).
        classes: (R,) int64 class indices in [0, K] (K = background).

    Returns:
        Tensor: (R, A + 1) attribute logits, "no attribute" last.
    """
    hidden = torch.cat([features, predictor.cls_embedding(classes)], dim=1)
    return predictor.attr_score(F.relu(predictor.fc_attr(hidden)))


def attribute_fields(attr_probs):
    """
    The per-region attribute fields of the outputs, from (M, A + 1) probabilities.

    Returns:
        dict: ``attr_probs`` (M, A + 1) as given; ``attrs_id`` (M,) int64, the argmax over
        the A real attributes; ``attrs_conf`` (M,), their max, not renormalised (as the
        released bottom-up-attention features).
    """
    attrs_conf, attrs_id = attr_probs[:, :-1].max(dim=1)
    return {"attr_probs": attr_probs, "attrs_id": attrs_id, "attrs_conf": attrs_conf}


def vinvl_attribute_fields(predictor, features, classes, score_thresh=0.05, max_per_region=16):
    """
    The second kind of attribute output (``ROI_ATTRIBUTE_HEAD.KIND: "vinvl"``): VinVL's
    ``AttributePostProcessor`` on the output regions, multi-label:

    1. :func:`attribute_logits` at the region's selected class (not an argmax);
    2. softmax over all A + 1, "no attribute" set to 0 (not renormalised);
    3. probabilities ``<= score_thresh`` set to 0; the ``max_per_region`` highest kept.
       (VinVL's per-image cap of 100 never takes effect: its threshold is a k-th smallest
       over a matrix mostly of zeros, so it is not restated.)

    Args:
        predictor: a module with ``cls_embedding``, ``fc_attr`` and ``attr_score``.
        features: (M, D) the regions' features (VinVL: pooled at the output boxes).
        classes: (M,) int64 foreground classes in [0, K).

    Returns:
        dict: ``attr_labels`` (M, max_per_region) int64, attribute ids in [0, A) in
        descending probability, padded with -1; ``attr_scores`` (M, max_per_region) float,
        their probabilities, padded with 0.
    """
    probs = F.softmax(attribute_logits(predictor, features, classes), dim=-1)[:, :-1]
    probs = torch.where(probs > score_thresh, probs, torch.zeros_like(probs))
    scores, labels = probs.topk(min(max_per_region, probs.shape[1]), dim=1)
    pad = max_per_region - scores.shape[1]
    scores = F.pad(scores, (0, pad))
    labels = F.pad(labels, (0, pad), value=-1)
    labels[scores == 0] = -1
    return {"attr_labels": labels, "attr_scores": scores}


def attribute_loss(attr_logits, gt_attributes):
    """
    Softmax cross-entropy against each region's attribute set: a region with n attributes
    has the target 1/n on each of them (the mean of its n cross-entropies), and the loss is
    the mean over regions.

    Args:
        attr_logits: (N, A + 1) logits of N foreground regions that have attributes.
        gt_attributes: (N, M) int64 attribute ids in [0, A), padded with -1.

    Returns:
        scalar Tensor (0 connected to the graph when N is 0).
    """
    if len(attr_logits) == 0:
        return attr_logits.sum() * 0.0
    log_probs = F.log_softmax(attr_logits, dim=1)
    valid = gt_attributes >= 0
    picked = log_probs.gather(1, gt_attributes.clamp(min=0)) * valid
    per_region = -picked.sum(dim=1) / valid.sum(dim=1)
    return per_region.mean()


def gt_attribute_rows(proposals: List[Instances], max_attributes: int):
    """
    (sum Ri, M) ground-truth attributes of the sampled proposals of a batch; images whose
    proposals carry no ``gt_attributes`` (no annotations) contribute rows of -1.
    """
    rows = []
    for p in proposals:
        if p.has("gt_attributes"):
            rows.append(p.gt_attributes)
        else:
            rows.append(torch.full((len(p), max_attributes), -1, dtype=torch.int64,
                                   device=p.gt_classes.device))
    return torch.cat(rows, dim=0)


class AttributeDatasetMapper(DatasetMapper):
    """
    detectron2's :class:`DatasetMapper` whose training instances also carry
    ``gt_attributes``: (N, MAX_ATTRIBUTES_PER_INSTANCE) int64, one row per instance, the
    annotation's ``attribute_ids`` (list of 0-based ids over NUM_ATTRIBUTES) padded with -1.
    detectron2's ROI heads copy it onto the sampled proposals (the Feature Cascade head onto
    its last stage's), and the box predictor's ``loss_attr`` uses it.
    """

    @configurable
    def __init__(self, is_train: bool, *, num_attributes: int, max_attributes: int, **kwargs):
        """
        Args:
            num_attributes: A; ids must lie in [0, A).
            max_attributes: columns of ``gt_attributes``.
            kwargs: arguments of :class:`DatasetMapper`.
        """
        super().__init__(is_train, **kwargs)
        self.num_attributes = num_attributes
        self.max_attributes = max_attributes

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        node = attribute_head_node(cfg)
        if node is None:
            raise ValueError("AttributeDatasetMapper needs MODEL.ATTRIBUTE_ON: True")
        ret.update(
            num_attributes=node.NUM_ATTRIBUTES, max_attributes=node.MAX_ATTRIBUTES_PER_INSTANCE
        )
        return ret

    def _attribute_row(self, anno):
        ids = sorted(set(int(i) for i in anno.get("attribute_ids", [])))
        if len(ids) > self.max_attributes:
            raise ValueError(
                f"an annotation has {len(ids)} attribute_ids, more than "
                f"MODEL.ROI_ATTRIBUTE_HEAD.MAX_ATTRIBUTES_PER_INSTANCE ({self.max_attributes})"
            )
        if ids and not 0 <= ids[0] <= ids[-1] < self.num_attributes:
            raise ValueError(
                f"attribute_ids {ids} out of range [0, {self.num_attributes}) "
                f"(MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES)"
            )
        return ids + [-1] * (self.max_attributes - len(ids))

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        """
        detectron2's transformation, which drops crowd annotations and instances left empty;
        to know which rows survive, each annotation's ``category_id`` goes through it as the
        annotation's index and is put back afterwards.
        """
        annos = dataset_dict["annotations"]
        classes = torch.tensor([int(a["category_id"]) for a in annos], dtype=torch.int64)
        attributes = torch.tensor(
            np.array([self._attribute_row(a) for a in annos], dtype=np.int64).reshape(
                len(annos), self.max_attributes
            )
        )
        for index, anno in enumerate(annos):
            anno["category_id"] = index
        super()._transform_annotations(dataset_dict, transforms, image_shape)
        instances = dataset_dict["instances"]
        kept = instances.gt_classes
        instances.gt_classes = classes[kept]
        instances.gt_attributes = attributes[kept]
