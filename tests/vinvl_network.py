"""
A plain-PyTorch restatement of scene_graph_benchmark's AttrRCNN at test (VINVL.md §1-§3),
written from that description, reading a state dict in maskrcnn-benchmark's key layout;
and a builder of such a state dict from the module tree as VINVL.md §4 derives it.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import nms, roi_align

from vinvl_reference import filter_results_peter

BLOCKS = (3, 4, 6)  # layer1..3 (reduced depth); layer4 (the ROI head) has 3


def mb_state_dict(widths, num_classes, num_attributes, embed, hidden, num_anchors=15, seed=0):
    """
    Random weights under maskrcnn-benchmark's names (§4 table): ``widths`` = (stem, res2 out,
    groups, width per group); ``num_classes`` / ``num_attributes`` count background / "no
    attribute" (VinVL's 1595 / 525).
    """
    g = torch.Generator().manual_seed(seed)
    stem, res2, groups, per_group = widths
    sd = {}

    def conv(name, cout, cin, k, scale=1.0):
        sd[name + ".weight"] = torch.randn(cout, cin, k, k, generator=g) * scale * math.sqrt(2.0 / (cin * k * k))

    def bn(name, c):
        sd[name + ".weight"] = torch.rand(c, generator=g) * 0.5 + 0.75
        sd[name + ".bias"] = torch.randn(c, generator=g) * 0.1
        sd[name + ".running_mean"] = torch.randn(c, generator=g) * 0.1
        sd[name + ".running_var"] = torch.rand(c, generator=g) * 1.5 + 0.5

    def stage(prefix, index, count, cin):
        bottleneck, out = groups * per_group * 2 ** (index - 1), res2 * 2 ** (index - 1)
        for b in range(count):
            conv(f"{prefix}.{b}.conv1", bottleneck, cin if b == 0 else out, 1)
            conv(f"{prefix}.{b}.conv2", bottleneck, bottleneck // groups, 3)
            conv(f"{prefix}.{b}.conv3", out, bottleneck, 1, scale=0.3)
            for i in (1, 2, 3):
                bn(f"{prefix}.{b}.bn{i}", out if i == 3 else bottleneck)
        conv(f"{prefix}.0.downsample.0", out, cin, 1)
        bn(f"{prefix}.0.downsample.1", out)
        return out

    conv("backbone.body.stem.conv1", stem, 3, 7)
    bn("backbone.body.stem.bn1", stem)
    cin = stem
    for s, count in enumerate(BLOCKS, start=1):
        cin = stage(f"backbone.body.layer{s}", s, count, cin)
    conv("rpn.head.conv", cin, cin, 3)
    sd["rpn.head.conv.bias"] = torch.randn(cin, generator=g) * 0.1
    conv("rpn.head.cls_logits", num_anchors, cin, 1)
    sd["rpn.head.cls_logits.bias"] = torch.zeros(num_anchors)
    sd["rpn.head.bbox_pred.weight"] = torch.randn(4 * num_anchors, cin, 1, 1, generator=g) * 1e-3
    sd["rpn.head.bbox_pred.bias"] = torch.zeros(4 * num_anchors)
    out = stage("roi_heads.box.feature_extractor.head.layer4", 4, 3, cin)
    for key in [k for k in sd if k.startswith("roi_heads.box.feature_extractor.")]:
        sd["attribute." + key[len("roi_heads.box."):]] = sd[key]  # the shared extractor, twice
    sd["roi_heads.box.predictor.cls_score.weight"] = torch.randn(num_classes, out, generator=g)
    sd["roi_heads.box.predictor.cls_score.bias"] = torch.randn(num_classes, generator=g) * 0.1
    sd["roi_heads.box.predictor.bbox_pred.weight"] = torch.randn(4 * num_classes, out, generator=g)
    sd["roi_heads.box.predictor.bbox_pred.bias"] = torch.zeros(4 * num_classes)
    sd["attribute.predictor.cls_embedding.weight"] = torch.randn(num_classes, embed, generator=g)
    sd["attribute.predictor.fc_attr.weight"] = torch.randn(hidden, out + embed, generator=g) * 0.1
    sd["attribute.predictor.fc_attr.bias"] = torch.zeros(hidden)
    sd["attribute.predictor.attr_score.weight"] = torch.randn(num_attributes, hidden, generator=g)
    sd["attribute.predictor.attr_score.bias"] = torch.zeros(num_attributes)
    sd["rpn.anchor_generator.cell_anchors.0"] = generate_anchors()
    return sd


def generate_anchors(stride=16, sizes=(32, 64, 128, 256, 512), ratios=(0.5, 1.0, 2.0)):
    """py-faster-rcnn's generate_anchors (ratio enum, then scale enum), as (15, 4) float32."""
    base = np.array([0, 0, stride - 1, stride - 1], dtype=np.float64)
    w, h = base[2] - base[0] + 1, base[3] - base[1] + 1
    cx, cy = base[0] + 0.5 * (w - 1), base[1] + 0.5 * (h - 1)
    out = []
    for r in ratios:
        ws = np.round(np.sqrt(w * h / r))
        hs = np.round(ws * r)
        for s in sizes:
            sw, sh = ws * s / stride, hs * s / stride
            out.append([cx - 0.5 * (sw - 1), cy - 0.5 * (sh - 1), cx + 0.5 * (sw - 1), cy + 0.5 * (sh - 1)])
    return torch.tensor(out, dtype=torch.float32)


def frozen_bn(x, sd, name):
    scale = sd[name + ".weight"] * sd[name + ".running_var"].rsqrt()
    bias = sd[name + ".bias"] - sd[name + ".running_mean"] * scale
    return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def layer(x, sd, prefix, count, first_stride, groups):
    for b in range(count):
        p = f"{prefix}.{b}"
        stride = first_stride if b == 0 else 1
        y = F.relu(frozen_bn(F.conv2d(x, sd[p + ".conv1.weight"]), sd, p + ".bn1"))
        y = F.relu(frozen_bn(F.conv2d(y, sd[p + ".conv2.weight"], stride=stride, padding=1, groups=groups), sd, p + ".bn2"))
        y = frozen_bn(F.conv2d(y, sd[p + ".conv3.weight"]), sd, p + ".bn3")
        if b == 0:
            x = frozen_bn(F.conv2d(x, sd[p + ".downsample.0.weight"], stride=stride), sd, p + ".downsample.1")
        x = F.relu(y + x)
    return x


def decode(codes, boxes, weights, clamp=math.log(1000.0 / 16)):
    """BoxCoder.decode: (N, 4k) codes on (N, 4) boxes, +1 widths, x2 = cx + w/2 - 1."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dx, dy = codes[:, 0::4] / weights[0], codes[:, 1::4] / weights[1]
    dw = torch.clamp(codes[:, 2::4] / weights[2], max=clamp)
    dh = torch.clamp(codes[:, 3::4] / weights[3], max=clamp)
    pcx, pcy = dx * w[:, None] + cx[:, None], dy * h[:, None] + cy[:, None]
    pw, ph = torch.exp(dw) * w[:, None], torch.exp(dh) * h[:, None]
    out = torch.zeros_like(codes)
    out[:, 0::4], out[:, 1::4] = pcx - 0.5 * pw, pcy - 0.5 * ph
    out[:, 2::4], out[:, 3::4] = pcx + 0.5 * pw - 1, pcy + 0.5 * ph - 1
    return out


def clip(boxes, h, w):
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
    return boxes


@torch.no_grad()
def run(sd, image, groups, out_size, ignore_box_regression=True, pre_nms=300, post_nms=50):
    """
    Args:
        image: (3, H, W) normalised network input. out_size: original (h, w).

    Returns:
        dict: res4, proposals (R, 4), features (R, D), scores (R, C) background first,
        boxes (R, C, 4), and the selected rows / labels / conf / rect / attr_labels / attr_scores.
    """
    x = image[None]
    x = F.relu(frozen_bn(F.conv2d(x, sd["backbone.body.stem.conv1.weight"], stride=2, padding=3), sd, "backbone.body.stem.bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for s, count in enumerate(BLOCKS, start=1):
        x = layer(x, sd, f"backbone.body.layer{s}", count, 1 if s == 1 else 2, groups)
    res4 = x
    # RPN
    t = F.relu(F.conv2d(res4, sd["rpn.head.conv.weight"], sd["rpn.head.conv.bias"], padding=1))
    logits = F.conv2d(t, sd["rpn.head.cls_logits.weight"], sd["rpn.head.cls_logits.bias"])
    codes = F.conv2d(t, sd["rpn.head.bbox_pred.weight"], sd["rpn.head.bbox_pred.bias"])
    _, a, fh, fw = logits.shape
    logits = logits.permute(0, 2, 3, 1).reshape(-1)
    codes = codes.view(1, a, 4, fh, fw).permute(0, 3, 4, 1, 2).reshape(-1, 4)
    sy, sx = torch.meshgrid(torch.arange(fh) * 16.0, torch.arange(fw) * 16.0, indexing="ij")
    shifts = torch.stack([sx.reshape(-1), sy.reshape(-1)] * 2, dim=1)
    anchors = (shifts[:, None] + sd["rpn.anchor_generator.cell_anchors.0"][None]).reshape(-1, 4)
    prob = logits.sigmoid()
    prob, top = prob.topk(min(pre_nms, len(prob)), sorted=True)
    height, width = image.shape[1:]
    props = clip(decode(codes[top], anchors[top], (1.0, 1.0, 1.0, 1.0)), height, width)
    ok = (props[:, 2] - props[:, 0] + 1 >= 0) & (props[:, 3] - props[:, 1] + 1 >= 0)
    props, prob = props[ok], prob[ok]
    props = props[nms(props, prob, 0.7)[:post_nms]]

    def head(boxes):
        pooled = roi_align(res4, [boxes], (14, 14), 1 / 16.0, 0, aligned=False)
        y = layer(pooled, sd, "roi_heads.box.feature_extractor.head.layer4", 3, 2, groups)
        return F.adaptive_avg_pool2d(y, 1).flatten(1)

    feats = head(props)
    scores = F.softmax(F.linear(feats, sd["roi_heads.box.predictor.cls_score.weight"], sd["roi_heads.box.predictor.cls_score.bias"]), -1)
    num_classes = scores.shape[1]
    if ignore_box_regression:
        boxes = props[:, None].expand(-1, num_classes, -1)
    else:
        reg = F.linear(feats, sd["roi_heads.box.predictor.bbox_pred.weight"], sd["roi_heads.box.predictor.bbox_pred.bias"])
        boxes = decode(reg, props, (10.0, 10.0, 5.0, 5.0)).view(-1, num_classes, 4)
    boxes = clip(boxes.reshape(-1, 4), height, width).view(-1, num_classes, 4)
    rows, labels, conf, rect = filter_results_peter(boxes.numpy(), scores.numpy())
    rect = torch.from_numpy(rect)
    # attributes at the output boxes, class = the selected label
    a_feats = head(rect)
    emb = sd["attribute.predictor.cls_embedding.weight"][torch.from_numpy(labels)]
    hid = F.relu(F.linear(torch.cat([a_feats, emb], 1), sd["attribute.predictor.fc_attr.weight"], sd["attribute.predictor.fc_attr.bias"]))
    p = F.softmax(F.linear(hid, sd["attribute.predictor.attr_score.weight"], sd["attribute.predictor.attr_score.bias"]), -1)
    p[:, 0] = 0
    p[p <= 0.05] = 0
    attr_scores, attr_labels = p.topk(min(16, p.shape[1]), dim=1)
    out_h, out_w = out_size
    scaled = rect.clone()
    scaled[:, 0::2] *= out_w / width
    scaled[:, 1::2] *= out_h / height
    return dict(res4=res4, logits=logits, codes=codes, proposals=props, features=feats, scores=scores, boxes=boxes,
                rows=rows, labels=labels, conf=conf, rect=scaled, attr_labels=attr_labels,
                attr_scores=attr_scores)
