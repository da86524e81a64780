"""
Per-image selection of regions from box-predictor outputs.

Both functions take, for one image with R proposals and K classes:

* ``boxes``: (R, K*4) class-specific or (R, 4) class-agnostic regressed boxes;
* ``probs``: (R, K+1) class probabilities, background last;

and return ``(instances, kept)`` where ``kept`` (M,) holds, for each output row, the row
among the image's proposals that produced it.
"""
import torch
from torchvision.ops import nms as torchvision_nms

from detectron2.layers import batched_nms
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image
from detectron2.structures import Boxes, Instances


def finite_rows(boxes, probs):
    """(R,) bool: proposals whose boxes and probabilities are all finite."""
    return torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)


def select_detections(boxes, probs, image_shape, score_thresh, nms_thresh, topk_per_image):
    """
    detectron2's own post-processing (score threshold, per-class NMS, top-k), unchanged.

    ``fast_rcnn_inference_single_image`` drops non-finite proposals first and returns rows of
    what is left; they are mapped back here to rows among all of the image's proposals.
    """
    instances, kept = fast_rcnn_inference_single_image(
        boxes, probs, image_shape, score_thresh, nms_thresh, topk_per_image
    )
    valid = finite_rows(boxes, probs)
    if not valid.all():
        kept = valid.nonzero()[:, 0][kept]
    return instances, kept


def clipped_class_boxes(boxes, image_shape):
    """(R, K*4) or (R, 4) boxes -> (R, C, 4) boxes clipped to ``image_shape``, C in {1, K}."""
    num_reg_classes = boxes.shape[1] // 4
    clipped = Boxes(boxes.reshape(-1, 4))
    clipped.clip(image_shape)
    return clipped.tensor.view(-1, num_reg_classes, 4)


def surviving_scores(class_boxes, fg_probs, valid, nms_thresh):
    """
    Per-class NMS over every (proposal, class) pair of the valid proposals.

    Args:
        class_boxes: (R, C, 4) clipped boxes, C in {1, K}.
        fg_probs: (R, K) foreground class probabilities.
        valid: (R,) bool, proposals that take part.
        nms_thresh: IoU above which the lower-scoring box of a class is suppressed.

    Returns:
        (R, K) tensor: a pair's probability where it survives NMS, 0 where it does not,
        where its box is empty, or where its proposal is not valid.
    """
    num_classes = fg_probs.shape[1]
    rows = valid.nonzero()[:, 0].repeat_interleave(num_classes)
    classes = torch.arange(num_classes, device=fg_probs.device).repeat(int(valid.sum()))
    pair_boxes = class_boxes[rows, classes if class_boxes.shape[1] > 1 else 0]
    nonempty = Boxes(pair_boxes).nonempty()
    rows, classes, pair_boxes = rows[nonempty], classes[nonempty], pair_boxes[nonempty]
    pair_scores = fg_probs[rows, classes]
    keep = batched_nms(pair_boxes, pair_scores, classes, nms_thresh)
    survived = torch.zeros_like(fg_probs)
    survived[rows[keep], classes[keep]] = pair_scores[keep]
    return survived


def select_regions(
    boxes, probs, proposal_boxes, image_shape, nms_thresh, conf_thresh, min_boxes, max_boxes,
    box_mode="proposal",
):
    """
    Bottom-up-attention selection: each proposal at most once.

    Per-class NMS gives each proposal its best surviving class and score (0 and its most
    probable class when no class survives); regions scoring >= ``conf_thresh`` are kept,
    but never fewer than ``min_boxes`` nor more than ``max_boxes`` (highest scores first,
    both clamped to the number of finite proposals).

    Args:
        proposal_boxes (Boxes): the R proposals, in the same coordinates as ``boxes``.
        box_mode: "proposal" reports the proposal's box, "regressed" the box regressed for
            the region's class (the proposal's box where no class survived).

    Returns:
        Instances with ``pred_boxes``, ``scores``, ``pred_classes``; and kept (M,).
    """
    valid = finite_rows(boxes, probs)
    fg_probs = probs[:, :-1]
    class_boxes = clipped_class_boxes(boxes, image_shape)
    survived = surviving_scores(class_boxes, fg_probs, valid, nms_thresh)
    scores, classes = survived.max(dim=1)
    none_survived = scores == 0
    classes[none_survived] = fg_probs[none_survived].argmax(dim=1)
    scores[~valid] = -1.0  # sorts after every finite proposal

    order = torch.sort(scores, descending=True, stable=True).indices
    num_valid = int(valid.sum())
    num_confident = int((scores >= conf_thresh).sum())
    count = max(min(min_boxes, num_valid), min(num_confident, max_boxes, num_valid))
    kept = order[:count]

    if box_mode == "proposal":
        out_boxes = proposal_boxes.tensor[kept]
    else:
        reg_class = classes[kept] if class_boxes.shape[1] > 1 else torch.zeros_like(kept)
        out_boxes = class_boxes[kept, reg_class]
        fallback = none_survived[kept]
        out_boxes[fallback] = proposal_boxes.tensor[kept[fallback]]
    result = Instances(image_shape)
    result.pred_boxes = Boxes(out_boxes)
    result.scores = scores[kept]
    result.pred_classes = classes[kept]
    return result, kept


def legacy_iou(boxes):
    """
    (R, R) IoU of x1y1x2y2 ``boxes`` as py-faster-rcnn's NMS computes it: widths, heights
    and intersections count pixels (``x2 - x1 + 1``), ``inter / (area_i + area_j - inter)``.
    """
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    widths = (torch.min(x2[:, None], x2[None]) - torch.max(x1[:, None], x1[None]) + 1).clamp(min=0)
    heights = (torch.min(y2[:, None], y2[None]) - torch.max(y1[:, None], y1[None]) + 1).clamp(min=0)
    inter = widths * heights
    return inter / (areas[:, None] + areas[None] - inter)


def per_class_nms_max_conf(boxes, fg_probs, nms_thresh):
    """
    For every box, the highest probability of a class for which it survives NMS: per class,
    greedy NMS over all ``boxes`` in descending order of that class's probability (ties:
    lower row first), a box suppressed when its :func:`legacy_iou` with a kept box is
    >= ``nms_thresh``. All classes advance together, one rank per step.

    Args:
        boxes: (R, 4) boxes, the same for every class.
        fg_probs: (R, C) class probabilities.

    Returns:
        (R,) tensor: max over the classes that keep the box of its probability, 0 if none.
    """
    num_boxes, num_classes = fg_probs.shape
    if num_boxes == 0:
        return fg_probs.new_zeros(0)
    # float32 IoU against the threshold in double precision, as the C code compares them.
    overlaps = legacy_iou(boxes).double() >= nms_thresh  # (R, R), diagonal True
    order = torch.sort(fg_probs.t(), dim=1, descending=True, stable=True).indices  # (C, R)
    kept = torch.zeros(num_classes, num_boxes, dtype=torch.bool, device=boxes.device)
    class_index = torch.arange(num_classes, device=boxes.device)
    for rank in range(num_boxes):
        candidates = order[:, rank]
        suppressed = (overlaps[candidates] & kept).any(dim=1)
        kept[class_index, candidates] = ~suppressed
    return (fg_probs.t() * kept).max(dim=0).values.clamp(min=0)


def select_butd(probs, proposal_boxes, image_shape, output_shape, conf_thresh, min_boxes,
                max_boxes, nms_thresh):
    """
    The selection of bottom-up-attention's ``tools/generate_tsv.py``, to the row:

    1. ``max_conf``: :func:`per_class_nms_max_conf` over the proposal boxes in original
       image pixels (as :func:`detector_postprocess` reports them), every foreground class;
    2. rows with ``max_conf >= conf_thresh``, in proposal order; if fewer than ``min_boxes``,
       the ``min_boxes`` highest instead, if more than ``max_boxes`` the ``max_boxes``
       highest, in descending ``max_conf`` (ties: later row first, as numpy's
       ``argsort(max_conf)[::-1]`` with a stable sort); rows with non-finite
       probabilities take no part;
    3. per kept row: the proposal box, the most probable foreground class and its
       probability (the LXMERT variant's ``objects_id`` / ``objects_conf``).

    Args:
        probs: (R, K+1) class probabilities, background last.
        proposal_boxes (Boxes): the R proposals in network-input coordinates.
        image_shape: (h, w) of the network input; output_shape: (h, w) of the original.

    Returns:
        Instances with ``pred_boxes`` (input coordinates), ``scores``, ``pred_classes``;
        and kept (M,).
    """
    valid = torch.isfinite(probs).all(dim=1)
    rows = valid.nonzero()[:, 0]
    scale_x = output_shape[1] / image_shape[1]
    scale_y = output_shape[0] / image_shape[0]
    original = Boxes(proposal_boxes.tensor[rows].clone())
    original.scale(scale_x, scale_y)
    original.clip(output_shape)
    max_conf = per_class_nms_max_conf(original.tensor, probs[rows, :-1], nms_thresh)

    confident = (max_conf.double() >= conf_thresh).nonzero()[:, 0]
    if not min_boxes <= len(confident) <= max_boxes:
        count = min_boxes if len(confident) < min_boxes else max_boxes
        ascending = torch.sort(max_conf, stable=True).indices
        confident = ascending.flip(0)[:count]
    kept = rows[confident]

    result = Instances(image_shape)
    result.pred_boxes = Boxes(proposal_boxes.tensor[kept])
    result.scores, result.pred_classes = probs[kept, :-1].max(dim=1)
    return result, kept


def pixel_iou(boxes, others):
    """
    (..., N, M) IoU of x1y1x2y2 boxes (..., N, 4) and (..., M, 4) with the +1 pixel convention
    of maskrcnn-benchmark's compiled NMS (widths ``x2 - x1 + 1``), in the boxes' dtype.
    """
    a, b = boxes[..., :, None, :], others[..., None, :, :]
    widths = (torch.min(a[..., 2], b[..., 2]) - torch.max(a[..., 0], b[..., 0]) + 1).clamp(min=0)
    heights = (torch.min(a[..., 3], b[..., 3]) - torch.max(a[..., 1], b[..., 1]) + 1).clamp(min=0)
    inter = widths * heights
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    return inter / (area_a + area_b - inter)


# NMS_IOU values of select_vinvl: which NMS scene_graph_benchmark had installed.
VINVL_NMS = ("torchvision", "legacy_ge", "legacy_gt")


def vinvl_nms_mask(class_boxes, scores, nms_thresh, nms_iou="torchvision", chunk=64):
    """
    Per-class NMS over all rows, as ``filter_results_peter``'s step 1.

    Args:
        class_boxes: (R, K, 4) each row's box for each foreground class.
        scores: (R, K) each row's probability of each foreground class.
        nms_iou: "torchvision" (IoU without +1, suppressed when IoU > ``nms_thresh``:
            scene_graph_benchmark HEAD), "legacy_ge" / "legacy_gt" (the compiled ``_C.nms``
            of its first release: +1 IoU, suppressed when >= (CPU kernel) / > (CUDA kernel)).
        chunk: classes processed together by the legacy NMS (memory: chunk * R * R).

    Returns:
        (R, K) bool: row i survives class j's NMS.
    """
    num_rows, num_classes = scores.shape
    survived = torch.zeros(num_rows, num_classes, dtype=torch.bool, device=scores.device)
    if num_rows == 0:
        return survived
    if nms_iou == "torchvision":
        # one NMS of R boxes per class: far cheaper than one batched NMS of R * K boxes
        for j in range(num_classes):
            survived[torchvision_nms(class_boxes[:, j], scores[:, j], nms_thresh), j] = True
        return survived
    # greedy NMS of every class of a chunk at once, one rank per step (ties: lower row first)
    for start in range(0, num_classes, chunk):
        boxes = class_boxes[:, start:start + chunk].transpose(0, 1)  # (C, R, 4)
        iou = pixel_iou(boxes, boxes)  # (C, R, R)
        overlaps = iou >= nms_thresh if nms_iou == "legacy_ge" else iou > nms_thresh
        order = torch.sort(scores[:, start:start + chunk].t(), dim=1, descending=True,
                           stable=True).indices  # (C, R)
        kept = torch.zeros_like(order, dtype=torch.bool)
        index = torch.arange(len(order), device=scores.device)
        for rank in range(num_rows):
            candidates = order[:, rank]
            suppressed = (overlaps[index, candidates] & kept).any(dim=1)
            kept[index, candidates] = ~suppressed
        survived[:, start:start + chunk] = kept.t()
    return survived


def select_vinvl(
    boxes, probs, proposal_boxes, image_shape, conf_thresh, min_boxes, max_boxes, nms_thresh,
    nms_iou="torchvision", box_mode="proposal",
):
    """
    scene_graph_benchmark's ``PostProcessor.filter_results_peter`` (``NMS_FILTER 1``, the
    VinVL feature extraction), step by step, in network-input pixels:

    1. every row's per-class boxes (the proposal for each class with ``box_mode``
       "proposal", as ``TEST.IGNORE_BOX_REGRESSION True``; else the class-regressed boxes),
       clipped to [0, W - 1] x [0, H - 1]; per foreground class, NMS at ``nms_thresh`` over
       all rows scored by that class's probability (:func:`vinvl_nms_mask`);
    2. each row scored by the highest probability among the classes it survived, labelled
       with that class; a row that survives no class (score 0) is out;
    3. the remaining rows sorted by score, descending (ties: lower row first); n = those
       scoring >= ``conf_thresh``; kept: the first ``min_boxes`` if n < ``min_boxes``, the
       first ``max_boxes`` if n > ``max_boxes``, else the n;
    4. reported box: that class's box of step 1 (proposal or regressed, clipped).

    Args:
        boxes: (R, K*4) class-specific or (R, 4) class-agnostic regressed boxes.
        probs: (R, K+1) class probabilities, background last.
        proposal_boxes (Boxes): the R proposals, network-input coordinates.
        image_shape: (h, w) of the network input.
        nms_iou: see :func:`vinvl_nms_mask`.
        box_mode: "proposal" or "regressed".

    Returns:
        Instances with ``pred_boxes``, ``scores``, ``pred_classes``, in descending score;
        and kept (M,).
    """
    valid = finite_rows(boxes, probs)
    rows = valid.nonzero()[:, 0]
    fg_probs = probs[rows, :-1]
    num_classes = fg_probs.shape[1]
    source = proposal_boxes.tensor if box_mode == "proposal" else boxes
    class_boxes = source[rows].reshape(len(rows), -1, 4).expand(-1, num_classes, -1).clone()
    height, width = image_shape
    class_boxes[..., 0::2] = class_boxes[..., 0::2].clamp(min=0, max=width - 1)
    class_boxes[..., 1::2] = class_boxes[..., 1::2].clamp(min=0, max=height - 1)

    survived = vinvl_nms_mask(class_boxes, fg_probs, nms_thresh, nms_iou)
    scores, classes = (fg_probs * survived).max(dim=1)
    candidates = (scores != 0).nonzero()[:, 0]
    order = candidates[torch.sort(scores[candidates], descending=True, stable=True).indices]
    num_confident = int((scores[order] >= conf_thresh).sum())
    if num_confident < min_boxes:
        order = order[:min_boxes]
    elif num_confident > max_boxes:
        order = order[:max_boxes]
    else:
        order = order[:num_confident]

    result = Instances(image_shape)
    result.pred_boxes = Boxes(class_boxes[order, classes[order]])
    result.scores = scores[order]
    result.pred_classes = classes[order]
    return result, rows[order]
