"""
The bottom-up-attention (BUTD) detector and its feature selection, re-stated for the tests
from the facts of shared/BUTD.md in plain PyTorch / numpy, independently of d2_regionfeat and
of detectron2's modules: weights are read from a state dict by their (detectron2) names.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import nms, roi_pool

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def frozen_bn(x, sd, prefix, eps=1e-5):
    scale = sd[prefix + "weight"] / torch.sqrt(sd[prefix + "running_var"] + eps)
    shift = sd[prefix + "bias"] - sd[prefix + "running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def conv_bn(x, sd, prefix, stride=1, padding=0, dilation=1):
    x = F.conv2d(x, sd[prefix + "weight"], stride=stride, padding=padding, dilation=dilation)
    return frozen_bn(x, sd, prefix + "norm.")


def bottleneck(x, sd, prefix, stride, dilation):
    """STRIDE_IN_1X1: the stride is in conv1; the 3x3 conv2 has padding = dilation."""
    out = F.relu(conv_bn(x, sd, prefix + "conv1.", stride=stride))
    out = F.relu(conv_bn(out, sd, prefix + "conv2.", padding=dilation, dilation=dilation))
    out = conv_bn(out, sd, prefix + "conv3.")
    shortcut = conv_bn(x, sd, prefix + "shortcut.", stride=stride) if prefix + "shortcut.weight" in sd else x
    return F.relu(out + shortcut)


def res4(image, sd, depth):
    """Caffe stem (7x7/2 conv, ReLU, 3x3/2 max pool, no padding, ceil) and res2-res4."""
    x = F.relu(conv_bn(image[None], sd, "backbone.stem.conv1.", stride=2, padding=3))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
    for stage, num_blocks in zip(("res2", "res3", "res4"), BLOCKS[depth][:3]):
        for block in range(num_blocks):
            stride = 2 if block == 0 and stage != "res2" else 1
            x = bottleneck(x, sd, f"backbone.{stage}.{block}.", stride, 1)
    return x


def decode(deltas, boxes, weights, clamp=math.log(1000.0 / 16)):
    """Faster R-CNN box decoding of (N, 4) deltas on (N, 4) boxes."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    dx, dy, dw, dh = (deltas[:, i] / w for i, w in enumerate(weights))
    dw, dh = dw.clamp(max=clamp), dh.clamp(max=clamp)
    cx, cy = dx * widths + ctr_x, dy * heights + ctr_y
    w, h = torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)


def proposals(feature, sd, image_hw, pre_topk, post_topk, nms_thresh, sizes=(64, 128, 256, 512),
              ratios=(0.5, 1.0, 2.0), stride=16):
    """RPN on res4: 3x3 conv + ReLU, objectness and deltas, anchors of offset 0."""
    prefix = "proposal_generator.rpn_head."
    t = F.relu(F.conv2d(feature, sd[prefix + "conv.weight"], sd[prefix + "conv.bias"], padding=1))
    logits = F.conv2d(t, sd[prefix + "objectness_logits.weight"], sd[prefix + "objectness_logits.bias"])
    deltas = F.conv2d(t, sd[prefix + "anchor_deltas.weight"], sd[prefix + "anchor_deltas.bias"])
    num_anchors, height, width = logits.shape[1:]
    cell = []
    for size in sizes:
        for ratio in ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            cell.append([-w / 2, -h / 2, w / 2, h / 2])
    cell = torch.tensor(cell)
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32) * stride,
        torch.arange(width, dtype=torch.float32) * stride,
        indexing="ij",
    )
    shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4)
    anchors = (shifts + cell[None]).reshape(-1, 4)  # location-major, anchor-minor
    logits = logits[0].permute(1, 2, 0).reshape(-1)
    deltas = deltas[0].reshape(num_anchors, 4, height, width).permute(2, 3, 0, 1).reshape(-1, 4)
    top = logits.argsort(descending=True)[:pre_topk]
    boxes = decode(deltas[top], anchors[top], (1.0, 1.0, 1.0, 1.0))
    scores = logits[top]
    h, w = image_hw
    boxes = torch.stack(
        [boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)],
        dim=1,
    )
    nonempty = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    boxes, scores = boxes[nonempty], scores[nonempty]
    keep = nms(boxes, scores, nms_thresh)[:post_topk]
    return boxes[keep]


def head(feature, boxes, sd, depth, resolution=14, stride=16, box_weights=(10.0, 10.0, 5.0, 5.0)):
    """
    ROIPool, dilated res5 (stride 1, dilation 2), mean over cells, box predictor and the
    attribute head. Returns dict of per-proposal tensors.
    """
    pooled = roi_pool(feature, [boxes], output_size=resolution, spatial_scale=1.0 / stride)
    x = pooled
    for block in range(BLOCKS[depth][3]):
        x = bottleneck(x, sd, f"roi_heads.res5.{block}.", 1, 2)
    assert x.shape[-2:] == (resolution, resolution)
    pool5 = x.mean(dim=[2, 3])
    prefix = "roi_heads.box_predictor."
    logits = F.linear(pool5, sd[prefix + "cls_score.weight"], sd[prefix + "cls_score.bias"])
    deltas = F.linear(pool5, sd[prefix + "bbox_pred.weight"], sd[prefix + "bbox_pred.bias"])
    num_classes = deltas.shape[1] // 4
    regressed = decode(
        deltas.reshape(-1, 4), boxes.repeat_interleave(num_classes, dim=0), box_weights
    ).reshape(-1, num_classes * 4)
    # Attribute head: embedding of the argmax over all K+1 logits (background included).
    embedding = sd[prefix + "cls_embedding.weight"][logits.argmax(dim=1)]
    hidden = F.relu(
        F.linear(torch.cat([pool5, embedding], 1), sd[prefix + "fc_attr.weight"], sd[prefix + "fc_attr.bias"])
    )
    attr_logits = F.linear(hidden, sd[prefix + "attr_score.weight"], sd[prefix + "attr_score.bias"])
    return dict(
        pool5=pool5,
        class_probs=F.softmax(logits, dim=1),
        regressed=regressed,
        attr_probs=F.softmax(attr_logits, dim=1),
    )


def cpu_nms(boxes, scores, thresh):
    """py-faster-rcnn's cpu_nms: float32 arithmetic, +1 areas, suppress when IoU >= thresh
    (the float32 IoU compared in double precision); order by descending score, ties by row."""
    boxes = boxes.astype(np.float32)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + np.float32(1)) * (y2 - y1 + np.float32(1))
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for position, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        # The inner loop of cpu_nms over the later boxes, element by element in float32.
        j = order[position + 1 :]
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[j]) - np.maximum(x1[i], x1[j]) + np.float32(1))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[j]) - np.maximum(y1[i], y1[j]) + np.float32(1))
        inter = w * h
        ovr = inter / (areas[i] + areas[j] - inter)
        suppressed[j[ovr.astype(np.float64) >= thresh]] = True
    return np.array(keep, dtype=np.int64)


def generate_tsv_rows(boxes, cls_prob, conf_thresh=0.2, min_boxes=10, max_boxes=100, nms_thresh=0.3):
    """
    The rows tools/generate_tsv.py keeps, in its order. ``cls_prob`` (R, 1+K) has the
    background FIRST, as in Caffe; ``boxes`` (R, 4) are the proposals in original pixels.
    """
    max_conf = np.zeros(len(boxes))
    for cls_ind in range(1, cls_prob.shape[1]):
        scores = cls_prob[:, cls_ind]
        keep = cpu_nms(boxes, scores, nms_thresh)
        max_conf[keep] = np.where(scores[keep] > max_conf[keep], scores[keep], max_conf[keep])
    keep_boxes = np.where(max_conf >= conf_thresh)[0]
    if len(keep_boxes) < min_boxes:
        keep_boxes = np.argsort(max_conf, kind="stable")[::-1][:min_boxes]
    elif len(keep_boxes) > max_boxes:
        keep_boxes = np.argsort(max_conf, kind="stable")[::-1][:max_boxes]
    return keep_boxes
