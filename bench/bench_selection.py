#!/usr/bin/env python
"""
Cost of ``SELECTION: butd`` (generate_tsv.py's per-class NMS over 1600 classes, vectorised)
against the whole image's inference, on the BUTD VG config (ResNet-101 C4, 1600 classes,
400 attributes, 300 proposals, 600 x 800 image), random weights. Target: < 5 % on CPU.

    python bench/bench_selection.py [--repeats 20] [--device cpu|cuda] [--threads N]
"""
import argparse
import os
import statistics
import time

import torch

from common import REPO, report
from helpers import image

from detectron2.config import get_cfg
from detectron2.modeling import build_model

import d2_regionfeat  # noqa: F401
from d2_regionfeat.modeling.selection import select_butd

VG = os.path.join(REPO, "configs", "VG", "faster_rcnn_R_101_C4_attr_butd.yaml")


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeats", type=int, default=20, help="selection runs (median)")
    parser.add_argument("--inference-repeats", type=int, default=2, help="model runs (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = get_cfg()
    cfg.merge_from_file(VG)
    cfg.MODEL.DEVICE = args.device
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    height, width = 600, 800
    inputs = [{"image": image(1, height, width).to(args.device), "height": height, "width": width}]
    with torch.no_grad():
        # Random weights give res4 maps of huge scale: bring the RPN's input to unit scale
        # and its deltas near zero, so that it proposes its 300 boxes.
        images = model.preprocess_image(inputs)
        rms = model.backbone(images.tensor)["res4"].pow(2).mean().sqrt()
        model.proposal_generator.rpn_head.conv.weight.div_(rms)
        model.proposal_generator.rpn_head.anchor_deltas.weight.mul_(1e-2)
    captured = {}

    def capture(module, args_, output):
        captured["probs"] = torch.softmax(output[0], dim=1)

    hook = model.roi_heads.box_predictor.register_forward_hook(capture)
    with torch.no_grad():
        inference = timed(lambda: model(inputs), args.inference_repeats)
        (proposals,), _ = model.proposal_generator(images, model.backbone(images.tensor))
    hook.remove()
    probs = captured["probs"]
    boxes = proposals.proposal_boxes
    node = cfg.MODEL.REGION_FEATURES
    selection = timed(
        lambda: select_butd(
            probs, boxes, proposals.image_size, (height, width), node.CONF_THRESH,
            node.MIN_BOXES, node.MAX_BOXES, cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
        ),
        args.repeats,
    )
    row = {
        "device": args.device,
        "threads": args.threads,
        "proposals": len(boxes),
        "classes": probs.shape[1] - 1,
        "inference_s": inference,
        "selection_s": selection,
        "selection_pct": 100.0 * selection / inference,
    }
    report("selection", [row], list(row), extra={"target_pct": 5.0})


if __name__ == "__main__":
    main()
