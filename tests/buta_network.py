"""
A plain-PyTorch restatement of MILVLG/bottom-up-attention.pytorch's caffe-mode detector and
its extraction (``get_image_blob``, ``GeneralizedBUARCNN`` at test, ``save_roi_features``),
written from ../shared/BUTA_PT.md, reading a state dict in BUTA.pt's key layout; and a
builder of such a state dict (random weights, as its v0.2.1 saved them: with
``cell_anchors.0`` and ``num_batches_tracked``).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_pool

BLOCKS = (3, 4, 6)  # res2..res4 at reduced depth; res5 (the ROI head) has 3
SIZES, RATIOS = (4, 8, 16, 32), (0.5, 1.0, 2.0)


def cell_anchors():
    """detectron2's DefaultAnchorGenerator cells, size-major, centred on 0 (offset 0)."""
    cells = []
    for size in SIZES:
        for ratio in RATIOS:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            cells.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(cells)


def buta_state_dict(version, widths, num_classes, num_attributes, embed, hidden, rpn_dim, seed=0):
    """
    Random weights under BUTA.pt's names: ``widths`` = (stem, res2 out, res2 bottleneck);
    ``num_classes`` / ``num_attributes`` count background / "no attribute" (row 0).
    ``version`` 1 (R101 layout) or 2 (R152's pre-activation layout).
    """
    g = torch.Generator().manual_seed(seed)
    stem, res2, bottleneck2 = widths
    sd = {}

    def conv(name, cout, cin, k, scale=1.0):
        sd[name + ".weight"] = torch.randn(cout, cin, k, k, generator=g) * scale * math.sqrt(2.0 / (cin * k * k))

    def bn(name, c, tracked):
        sd[name + ".weight"] = torch.rand(c, generator=g) * 0.5 + 0.75
        sd[name + ".bias"] = torch.randn(c, generator=g) * 0.1
        sd[name + ".running_mean"] = torch.randn(c, generator=g) * 0.1
        sd[name + ".running_var"] = torch.rand(c, generator=g) * 1.5 + 0.5
        if tracked:  # plain BatchNorm of a stage not frozen at FREEZE_AT 3
            sd[name + ".num_batches_tracked"] = torch.tensor(1000)

    def stage(prefix, index, count, cin, tracked):
        mid, out = bottleneck2 * 2 ** (index - 2), res2 * 2 ** (index - 2)
        for b in range(count):
            c = cin if b == 0 else out
            name = f"{prefix}.{b}"
            conv(name + ".conv1", mid, c, 1)
            conv(name + ".conv2", mid, mid, 3)
            conv(name + ".conv3", out, mid, 1, scale=0.3)
            if version == 1:
                bn(name + ".conv1.norm", mid, tracked)
                bn(name + ".conv2.norm", mid, tracked)
                bn(name + ".conv3.norm", out, tracked)
            else:
                bn(name + ".norm", c, tracked)
                bn(name + ".conv2.norm", mid, tracked)
                bn(name + ".conv3.norm", mid, tracked)
        conv(prefix + ".0.shortcut", out, cin, 1)
        if version == 1:
            bn(prefix + ".0.shortcut.norm", out, tracked)
        return out

    conv("backbone.stem.conv1", stem, 3, 7)
    bn("backbone.stem.conv1.norm", stem, False)
    if version == 2:
        bn("backbone.stem.norm", 3, False)
    cin = stem
    for index, count in enumerate(BLOCKS, start=2):
        cin = stage(f"backbone.res{index}", index, count, cin, tracked=index == 4)
    num_anchors = len(SIZES) * len(RATIOS)
    p = "proposal_generator."
    conv(p + "rpn_head.conv", rpn_dim, cin, 3)
    sd[p + "rpn_head.conv.bias"] = torch.randn(rpn_dim, generator=g) * 0.1
    conv(p + "rpn_head.objectness_logits", 2 * num_anchors, rpn_dim, 1)
    sd[p + "rpn_head.objectness_logits.bias"] = torch.zeros(2 * num_anchors)
    sd[p + "rpn_head.anchor_deltas.weight"] = torch.randn(4 * num_anchors, rpn_dim, 1, 1, generator=g) * 1e-3
    sd[p + "rpn_head.anchor_deltas.bias"] = torch.zeros(4 * num_anchors)
    sd[p + "anchor_generator.cell_anchors.0"] = cell_anchors()
    out = stage("roi_heads.res5", 5, 3, cin, tracked=True)
    if version == 2:
        bn("roi_heads.res5_bn", out, True)
    q = "roi_heads.box_predictor."
    for name, rows, cols in (("cls_score", num_classes, out), ("bbox_pred", 4 * num_classes, out),
                             ("attr_linear1", hidden, out + embed),
                             ("attr_linear2", num_attributes, hidden)):
        sd[q + name + ".weight"] = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
        sd[q + name + ".bias"] = torch.randn(rows, generator=g) * 0.1
    sd[q + "cls_embed.weight"] = torch.randn(num_classes, embed, generator=g)
    return sd


def image_scale(h, w, short, max_size):
    scale = short / min(h, w)
    if np.round(scale * max(h, w)) > max_size:
        scale = max_size / max(h, w)
    return scale


def cv2_linear_resize(image, scale):
    """cv2.resize(fx=fy=scale, INTER_LINEAR) of a float (C, H, W) image, written out: source
    (dst + 0.5) / scale - 0.5, clamped at both ends, bilinear."""
    _, h, w = image.shape
    out_h, out_w = int(round(h * scale)), int(round(w * scale))

    def taps(n_out, n_in):
        src = (torch.arange(n_out, dtype=torch.float64) + 0.5) / scale - 0.5
        lo = src.floor()
        frac = src - lo
        frac[src < 0] = 0.0
        lo = lo.clamp(min=0).long()
        hi = (lo + 1).clamp(max=n_in - 1)
        frac[lo >= n_in - 1] = 0.0
        lo = lo.clamp(max=n_in - 1)
        return lo, hi, frac.to(image.dtype)

    y0, y1, fy = taps(out_h, h)
    x0, x1, fx = taps(out_w, w)
    rows = image[:, y0] * (1 - fy)[:, None] + image[:, y1] * fy[:, None]
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def bn(x, sd, name, eps):
    return F.batch_norm(x, sd[name + ".running_mean"], sd[name + ".running_var"],
                        sd[name + ".weight"], sd[name + ".bias"], False, 0.0, eps)


def block_v1(x, sd, name, stride, dilation, stride_in_1x1=True):
    s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
    out = F.relu(bn(F.conv2d(x, sd[name + ".conv1.weight"], stride=s1), sd, name + ".conv1.norm", 1e-5))
    out = F.conv2d(out, sd[name + ".conv2.weight"], stride=s3, padding=dilation, dilation=dilation)
    out = F.relu(bn(out, sd, name + ".conv2.norm", 1e-5))
    out = bn(F.conv2d(out, sd[name + ".conv3.weight"]), sd, name + ".conv3.norm", 1e-5)
    if name + ".shortcut.weight" in sd:
        x = bn(F.conv2d(x, sd[name + ".shortcut.weight"], stride=stride), sd, name + ".shortcut.norm", 1e-5)
    return F.relu(out + x)


def block_v2(x, sd, name, stride, pre_activate=True, eps=2e-5):
    """BottleneckBlockv2 (stride in the 3x3); ``pre_activate`` False: res5's first block."""
    pre = F.relu(bn(x, sd, name + ".norm", eps)) if pre_activate else x
    out = F.conv2d(pre, sd[name + ".conv1.weight"])
    out = F.conv2d(F.relu(bn(out, sd, name + ".conv2.norm", eps)), sd[name + ".conv2.weight"],
                   stride=stride, padding=1)
    out = F.conv2d(F.relu(bn(out, sd, name + ".conv3.norm", eps)), sd[name + ".conv3.weight"])
    shortcut = F.conv2d(pre, sd[name + ".shortcut.weight"], stride=stride) if name + ".shortcut.weight" in sd else x
    return out + shortcut


def backbone(x, sd, version):
    if version == 2:
        x = bn(x, sd, "backbone.stem.norm", 2e-5)
    eps = 1e-5 if version == 1 else 2e-5
    x = F.relu(bn(F.conv2d(x, sd["backbone.stem.conv1.weight"], stride=2, padding=3), sd,
                  "backbone.stem.conv1.norm", eps))
    x = F.max_pool2d(x, 3, 2, 0, ceil_mode=True)
    for index, count in enumerate(BLOCKS, start=2):
        for b in range(count):
            stride = 2 if b == 0 and index > 2 else 1
            name = f"backbone.res{index}.{b}"
            x = block_v1(x, sd, name, stride, 1) if version == 1 else block_v2(x, sd, name, stride)
    return x


def res5(x, sd, version):
    if version == 1:  # RES5_DILATION 2: stride 1, dilation 2
        for b in range(3):
            x = block_v1(x, sd, f"roi_heads.res5.{b}", 1, 2)
        return x
    x = block_v2(x, sd, "roi_heads.res5.0", 2, pre_activate=False)
    for b in (1, 2):
        x = block_v2(x, sd, f"roi_heads.res5.{b}", 1)
    return F.relu(bn(x, sd, "roi_heads.res5_bn", 2e-5))


def decode(deltas, boxes, clamp=math.log(1000.0 / 16)):
    """BUABox2BoxTransform.apply_deltas, weights (1, 1, 1, 1)."""
    widths = boxes[:, 2] - boxes[:, 0] + 1
    heights = boxes[:, 3] - boxes[:, 1] + 1
    cx, cy = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    pcx, pcy = deltas[:, 0] * widths + cx, deltas[:, 1] * heights + cy
    pw = torch.exp(deltas[:, 2].clamp(max=clamp)) * widths
    ph = torch.exp(deltas[:, 3].clamp(max=clamp)) * heights
    return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=1)


def nms_ge(boxes, scores, thresh):
    """maskrcnn-benchmark's CPU kernel: +1 areas and intersections, suppressed when
    IoU >= thresh, in descending score (ties: lower index first); keep in index order."""
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    b = boxes.tolist()
    suppressed = [False] * len(b)
    for i_pos, i in enumerate(order):
        if suppressed[i]:
            continue
        ix1, iy1, ix2, iy2 = b[i]
        iarea = (ix2 - ix1 + 1) * (iy2 - iy1 + 1)
        for j in order[i_pos + 1:]:
            if suppressed[j]:
                continue
            x1, y1, x2, y2 = b[j]
            w = max(0.0, min(ix2, x2) - max(ix1, x1) + 1)
            h = max(0.0, min(iy2, y2) - max(iy1, y1) + 1)
            inter = w * h
            if inter / (iarea + (x2 - x1 + 1) * (y2 - y1 + 1) - inter) >= thresh:
                suppressed[j] = True
    return torch.tensor([i for i in range(len(b)) if not suppressed[i]], dtype=torch.int64)


def run(sd, image, version, mean, short, max_size, min_size=16, pre_nms=6000, post_nms=300,
        conf_thresh=0.2, min_boxes=10, max_boxes=100):
    """
    ``image``: (H, W, 3) BGR uint8 numpy. Returns the npz's rows: ``x`` (N, D), ``bbox``
    (N, 4), ``objects_id/conf``, ``attrs_id/conf``, and ``proposals`` / ``scale``.
    """
    im = torch.from_numpy(image.astype(np.float32)) - torch.tensor(mean, dtype=torch.float32)
    h, w = image.shape[:2]
    scale = image_scale(h, w, short, max_size)
    x = cv2_linear_resize(im.permute(2, 0, 1), scale)[None]
    H, W = x.shape[-2:]
    res4 = backbone(x, sd, version)

    p = "proposal_generator.rpn_head."
    t = F.relu(F.conv2d(res4, sd[p + "conv.weight"], sd[p + "conv.bias"], padding=1))
    logits = F.conv2d(t, sd[p + "objectness_logits.weight"], sd[p + "objectness_logits.bias"])[0]
    deltas = F.conv2d(t, sd[p + "anchor_deltas.weight"], sd[p + "anchor_deltas.bias"])[0]
    A = logits.shape[0] // 2
    fg = F.softmax(logits.view(2, A, *logits.shape[1:]), dim=0)[1]  # (A, Hf, Wf)
    scores = fg.permute(1, 2, 0).reshape(-1)
    deltas = deltas.view(A, 4, *deltas.shape[1:]).permute(2, 3, 0, 1).reshape(-1, 4)
    hf, wf = res4.shape[-2:]
    sy, sx = torch.meshgrid(torch.arange(hf) * 16.0, torch.arange(wf) * 16.0, indexing="ij")
    shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
    anchors = (shifts + sd["proposal_generator.anchor_generator.cell_anchors.0"][None]).reshape(-1, 4)
    boxes = decode(deltas, anchors)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H - 1)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    keep &= (boxes[:, 2] - boxes[:, 0] + 1 > min_size * scale) & (boxes[:, 3] - boxes[:, 1] + 1 > min_size * scale)
    boxes, scores = boxes[keep], scores[keep]
    order = torch.sort(scores, descending=True, stable=True).indices[:pre_nms]
    boxes, scores = boxes[order], scores[order]
    proposals = boxes[nms_ge(boxes, scores, 0.7)[:post_nms]]

    pooled = roi_pool(res4, [proposals], (14, 14), 1.0 / 16)
    feats = res5(pooled, sd, version).mean(dim=[2, 3])
    q = "roi_heads.box_predictor."
    cls_logits = F.linear(feats, sd[q + "cls_score.weight"], sd[q + "cls_score.bias"])
    cls_prob = F.softmax(cls_logits, dim=1)
    embedded = sd[q + "cls_embed.weight"][cls_logits.argmax(dim=1)]
    hidden = F.relu(F.linear(torch.cat([feats, embedded], dim=1), sd[q + "attr_linear1.weight"], sd[q + "attr_linear1.bias"]))
    attr_prob = F.softmax(F.linear(hidden, sd[q + "attr_linear2.weight"], sd[q + "attr_linear2.bias"]), dim=1)

    dets = proposals / scale
    max_conf = torch.zeros(len(dets))
    for c in range(1, cls_prob.shape[1]):
        keep = nms_ge(dets, cls_prob[:, c], 0.3)
        max_conf[keep] = torch.maximum(max_conf[keep], cls_prob[keep, c])
    kept = (max_conf >= conf_thresh).nonzero()[:, 0]
    if not min_boxes <= len(kept) <= max_boxes:
        count = min_boxes if len(kept) < min_boxes else max_boxes
        kept = torch.sort(max_conf, descending=True, stable=True).indices[:count]
    objects_conf, objects_id = cls_prob[kept, 1:].max(dim=1)
    attrs_conf, attrs_id = attr_prob[kept, 1:].max(dim=1)
    return {"x": feats[kept], "bbox": dets[kept], "objects_id": objects_id, "objects_conf": objects_conf,
            "attrs_id": attrs_id, "attrs_conf": attrs_conf, "proposals": proposals, "scale": scale,
            "input_size": (H, W), "max_conf": max_conf, "kept": kept, "feats": feats}
