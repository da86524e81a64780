"""
Why fewer boxes? A stage-by-stage account of detectron2's box post-processing for one
image, computed from the model's own per-proposal outputs and its own final detections.
"""
import contextlib
from typing import List

import torch

from detectron2.layers import batched_nms
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances, pairwise_iou

from .selection import clipped_class_boxes, finite_rows


@contextlib.contextmanager
def _recorded_selection(settings, score_thresh):
    """
    Within the block, ``settings`` (the heads' :class:`RegionSelection`) selects in
    "detections" mode at ``score_thresh`` and records, per image selected, its boxes,
    probabilities, network-input size, NMS threshold and top-k in the yielded list.
    """
    calls = []
    saved = settings.selection

    def recording_select_image(index, boxes, probs, proposal_boxes, image_size, thresh, nms_thresh,
                               topk):
        calls.append((boxes, probs, image_size, nms_thresh, topk))
        return type(settings).select_image(
            settings, index, boxes, probs, proposal_boxes, image_size, score_thresh, nms_thresh, topk
        )

    settings.selection = "detections"
    settings.select_image = recording_select_image
    try:
        yield calls
    finally:
        del settings.select_image
        settings.selection = saved


def _suppressors(boxes, scores, classes, keep, nms_thresh):
    """
    For each pair removed by NMS, the kept pair that removed it: the highest-scoring kept
    pair of its class overlapping it by more than ``nms_thresh``.

    Returns:
        list[(removed position, suppressor position, IoU)], positions into ``boxes``.
    """
    removed = torch.ones(len(boxes), dtype=torch.bool)
    removed[keep] = False
    removed = removed.nonzero()[:, 0]
    if len(removed) == 0:
        return []
    iou = pairwise_iou(Boxes(boxes[removed]), Boxes(boxes[keep]))
    eligible = (classes[removed][:, None] == classes[keep][None]) & (iou > nms_thresh)
    # keep is sorted by decreasing score, so the first eligible kept pair suppressed it.
    first = eligible.float().argmax(dim=1)
    return [
        (int(r), int(keep[f]), float(iou[i, f]))
        for i, (r, f) in enumerate(zip(removed, first))
        if eligible[i, f]
    ]


def _account(boxes, probs, image_size, output_size, score_thresh, nms_thresh, topk, final):
    """The stage table of one image; see :func:`explain_detections`."""
    valid = finite_rows(boxes, probs)
    rows = valid.nonzero()[:, 0]
    fg = probs[valid][:, :-1]
    class_boxes = clipped_class_boxes(boxes[valid], image_size)
    above = fg > score_thresh
    pairs = above.nonzero()
    pair_boxes = class_boxes[pairs[:, 0], pairs[:, 1] if class_boxes.shape[1] > 1 else 0]
    pair_scores = fg[above]
    keep = batched_nms(pair_boxes, pair_scores, pairs[:, 1], nms_thresh)
    after_topk = keep[:topk] if topk >= 0 else keep
    survivors = Instances(image_size, pred_boxes=Boxes(pair_boxes[after_topk]))
    after_postprocess = len(detector_postprocess(survivors, *output_size))

    suppressed = [
        {
            "proposal": int(rows[pairs[r, 0]]),
            "class": int(pairs[r, 1]),
            "score": float(pair_scores[r]),
            "by_proposal": int(rows[pairs[s, 0]]),
            "by_score": float(pair_scores[s]),
            "iou": iou,
        }
        for r, s, iou in _suppressors(pair_boxes, pair_scores, pairs[:, 1], keep, nms_thresh)
    ]
    stages = [
        ("proposals", len(probs)),
        ("proposals with finite boxes and scores", int(valid.sum())),
        (f"proposals with some class score > {score_thresh:g}", int(above.any(dim=1).sum())),
        ("candidate (proposal, class) pairs, boxes regressed and clipped", len(pairs)),
        (f"after per-class NMS (IoU > {nms_thresh:g} removed)", len(keep)),
        (f"after the top-{topk} limit" if topk >= 0 else "no top-k limit", len(after_topk)),
        ("after postprocessing (empty boxes at output size removed)", after_postprocess),
    ]
    return {
        "image_size": list(image_size),
        "output_size": list(output_size),
        "score_thresh": score_thresh,
        "nms_thresh": nms_thresh,
        "topk_per_image": topk,
        "stages": [{"stage": name, "count": count} for name, count in stages],
        "removed_by_nms": suppressed,
        "removed_by_topk": len(keep) - len(after_topk),
        "removed_by_postprocessing": len(after_topk) - after_postprocess,
        "final": after_postprocess,
        "model_final": len(final),
    }


def explain_detections(model, batched_inputs: List[dict], score_thresh=None) -> List[dict]:
    """
    Run ``model`` (Feature ROI heads, eval mode) on ``batched_inputs`` and account for every
    box from proposal to final detection.

    Args:
        model: a ``GeneralizedRCNN`` whose ROI heads give region features.
        batched_inputs: model inputs as for ``model(batched_inputs)``.
        score_thresh: the threshold to explain; the model's SCORE_THRESH_TEST if None.

    Returns:
        list[dict], per image: "stages" (name and count, in pipeline order: proposals;
        finite ones; proposals with some class score > thresh; candidate (proposal, class)
        pairs after box regression and clipping; after NMS; after top-k; after
        postprocessing), "removed_by_nms" (each removed pair with the kept proposal that
        removed it and their IoU), "removed_by_topk", "removed_by_postprocessing", "final"
        (the count these stages give) and "model_final" (the model's own number of
        instances, equal to "final").
    """
    heads = model.roi_heads
    thresh = heads.feature_predictor.test_score_thresh if score_thresh is None else score_thresh
    with torch.no_grad(), _recorded_selection(heads.region_selection, thresh) as calls:
        outputs = model(batched_inputs)
    if len(calls) != len(outputs):
        raise ValueError(
            f"{type(heads).__name__} selected {len(calls)} images for {len(outputs)} inputs; "
            "explain_detections needs one selection per image"
        )
    reports = []
    for out, (boxes, probs, image_size, nms_thresh, topk) in zip(outputs, calls):
        final = out["instances"]
        reports.append(
            _account(boxes, probs, image_size, final.image_size, thresh, nms_thresh, topk, final)
        )
    return reports


def format_report(report: dict, name: str = "", class_names=None) -> str:
    """A readable table of one image's report; classes by name when ``class_names`` given."""
    lines = [f"{name}  (score threshold {report['score_thresh']:g})".strip()]
    width = max(len(s["stage"]) for s in report["stages"])
    for stage in report["stages"]:
        lines.append(f"  {stage['stage']:<{width}}  {stage['count']:>6}")
    for item in report["removed_by_nms"][:10]:
        lines.append(
            f"    NMS removed proposal {item['proposal']} class "
            f"{class_names[item['class']] if class_names else item['class']} "
            f"(score {item['score']:.3f}): IoU {item['iou']:.2f} with proposal "
            f"{item['by_proposal']} (score {item['by_score']:.3f})"
        )
    if len(report["removed_by_nms"]) > 10:
        lines.append(f"    ... and {len(report['removed_by_nms']) - 10} more removed by NMS")
    lines.append(f"  final detections: {report['final']}")
    return "\n".join(lines)
