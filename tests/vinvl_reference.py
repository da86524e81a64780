"""
numpy restatement of scene_graph_benchmark's ``PostProcessor.filter_results_peter``
(``NMS_FILTER 1``), written from its description (VINVL.md §2), for one image:
background in column 0, per-class boxes (R, C, 4) already clipped to W - 1 / H - 1.
"""
import numpy as np


def nms(boxes, scores, thresh, iou_kind):
    """Kept indices of greedy NMS, descending score (ties: lower index first)."""
    order = np.argsort(-scores, kind="stable")
    plus = 0.0 if iou_kind == "torchvision" else 1.0
    area = (boxes[:, 2] - boxes[:, 0] + plus) * (boxes[:, 3] - boxes[:, 1] + plus)
    keep = []
    suppressed = np.zeros(len(boxes), dtype=bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        w = np.clip(np.minimum(boxes[i, 2], boxes[:, 2]) - np.maximum(boxes[i, 0], boxes[:, 0]) + plus, 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[:, 3]) - np.maximum(boxes[i, 1], boxes[:, 1]) + plus, 0, None)
        inter = (w * h).astype(np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = (inter / (area[i] + area - inter)).astype(np.float32)
        thresh32 = np.float32(thresh)
        hit = iou >= thresh32 if iou_kind == "legacy_ge" else iou > thresh32
        suppressed |= hit
    return np.array(keep, dtype=np.int64)


def filter_results_peter(boxes, scores, score_thresh=0.2, nms_thresh=0.3, min_det=10,
                         max_det=100, iou_kind="torchvision"):
    """
    Args:
        boxes: (R, C, 4) float32 per-class boxes (background column 0 included).
        scores: (R, C) float32 softmax probabilities, background column 0.

    Returns:
        rows (M,), labels (M,) in 1..C-1, scores (M,), boxes (M, 4): the output order.
    """
    num_rows, num_classes = scores.shape
    mask = np.zeros_like(scores)
    for j in range(1, num_classes):
        keep = nms(boxes[:, j], scores[:, j], nms_thresh, iou_kind)
        mask[keep, j] = 1
    dets = mask * scores
    best = dets.max(axis=1)
    label = dets.argmax(axis=1)
    rows = np.nonzero(best != 0)[0]
    order = rows[np.argsort(-best[rows], kind="stable")]
    n = int((best[order] >= np.float32(score_thresh)).sum())
    if n < min_det:
        order = order[:min_det]
    elif n > max_det:
        order = order[:max_det]
    else:
        order = order[:n]
    return order, label[order], best[order], boxes[order, label[order]]
