"""
Independent re-computation of what the Feature heads should return, built from the plain
detectron2 modules of a model (pooler, box head, linear layers), never from d2_regionfeat.
"""
import torch
import torch.nn.functional as F

from detectron2.structures import Boxes


def backbone_and_proposals(model, batched_inputs):
    """(features dict, proposals list) exactly as GeneralizedRCNN.inference computes them."""
    images = model.preprocess_image(batched_inputs)
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    return features, proposals


def pooled_and_head(model, features, boxes):
    """(pooled (R, C, S, S), box-head output (R, D)) of ``boxes`` (list[Boxes])."""
    heads = model.roi_heads
    if hasattr(heads, "res5"):
        pooled = heads.pooler([features[f] for f in heads.in_features], boxes)
        return pooled, heads.res5(pooled).mean(dim=[2, 3])
    pooled = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
    box_head = heads.box_head[-1] if isinstance(heads.box_head, torch.nn.ModuleList) else heads.box_head
    return pooled, box_head(pooled).flatten(1)


def _linear_outputs(predictor, head_out, boxes):
    probs = F.softmax(predictor.cls_score(head_out), dim=-1)
    deltas = predictor.bbox_pred(head_out)
    return probs, predictor.box2box_transform.apply_deltas(deltas, boxes.tensor)


def proposal_outputs(model, features, proposals):
    """
    Per image, for every proposal of the stage that feeds the final predictor:
    dict(boxes=Boxes, pooled=(R, C), head=(R, D), probs=(R, K+1), regressed=(R, K*4 or 4)).
    Cascade models run every stage and average the probabilities, as CascadeROIHeads does.
    """
    heads = model.roi_heads
    predictors = heads.box_predictor
    stages = len(predictors) if isinstance(predictors, torch.nn.ModuleList) else 1
    boxes = [p.proposal_boxes for p in proposals]
    probs_sum = None
    for stage in range(stages):
        predictor = predictors[stage] if stages > 1 else predictors
        if stages > 1:
            pooled = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
            head = heads.box_head[stage](pooled).flatten(1)
        else:
            pooled, head = pooled_and_head(model, features, boxes)
        cat_boxes = Boxes.cat(boxes)
        probs, regressed = _linear_outputs(predictor, head, cat_boxes)
        probs_sum = probs if probs_sum is None else probs_sum + probs
        if stage < stages - 1:
            boxes = []
            for b, p in zip(regressed.split([len(x) for x in proposals]), proposals):
                b = Boxes(b.detach())
                b.clip(p.image_size)
                boxes.append(b)
    sizes = [len(b) for b in boxes]
    if stages > 1:
        probs = probs_sum / stages
    return [
        dict(boxes=b, pooled=pl, head=h, probs=pr, regressed=r)
        for b, pl, h, pr, r in zip(
            boxes,
            pooled.mean(dim=[2, 3]).split(sizes),
            head.split(sizes),
            probs.split(sizes),
            regressed.split(sizes),
        )
    ]


def clipped_box(regressed_row, cls, image_size):
    """The clipped (4,) box of class ``cls`` in one row of regressed boxes."""
    per_class = regressed_row.view(-1, 4)
    box = Boxes(per_class[cls if len(per_class) > 1 else 0][None].clone())
    box.clip(image_size)
    return box.tensor[0]
