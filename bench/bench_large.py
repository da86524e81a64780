#!/usr/bin/env python
"""
Large model: a Faster R-CNN C4 ResNet-101 (FeatureRes5ROIHeads, 1600 classes, 300
proposals, bottom-up-attention "regions" selection of 10-100 regions, random weights; the
model most users run for region features, with the settings of their released features) at
--sizes px (shorter side; longer side at most 5/3 of it) on 480 x 640 images.

1. Throughput: ``tools/extract_net.py`` against the user loop, as ``bench_extract.py``
   measures it (images/s, ratio, start-up, busy fraction).
2. Where the time goes: one pass of the extractor over --profile-images images (and the npz
   writer) under the torch profiler, with a labelled range per stage: backbone, RPN, ROI
   pooling, ROI head (res5), box predictor, selection (the predictor's ``select``), writers;
   "other" is the rest (pre/post-processing, records).

    python bench/bench_large.py [--sizes 600,1000] [--images 200] [--profile-images 4] [--device cuda]
"""
import os
import shutil
import tempfile
import time

import torch
from torch.autograd.profiler import record_function

from bench_extract import COLUMNS, compare
from bench_amp import load_inputs, model_cfg
from common import parser, report, save_model, synchronize, write_images
from d2_regionfeat.extraction.model_call import BatchExtractor
from d2_regionfeat.formats import LAYOUTS
from detectron2 import model_zoo
from detectron2.config import get_cfg

# stage label -> module path in the model (those the model has)
STAGES = {
    "backbone": "backbone",
    "rpn": "proposal_generator",
    "roi pooling": "roi_heads.pooler",
    "roi head (res5)": "roi_heads.res5",
    "box predictor": "roi_heads.box_predictor",
}


def c4_resnet(size, depth=101, classes=1600, proposals=300):
    """Faster R-CNN C4 with Feature heads and BUTD-style regions at shorter side ``size``."""
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_101_C4_3x.yaml"))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.ROI_HEADS.NAME = "FeatureRes5ROIHeads"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = classes
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = proposals
    cfg.MODEL.REGION_FEATURES.SELECTION = "regions"
    cfg.MODEL.REGION_FEATURES.MIN_BOXES, cfg.MODEL.REGION_FEATURES.MAX_BOXES = 10, 100
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = size, size * 5 // 3
    return cfg


class StageRanges:
    """A profiler range per stage: forward hooks on its module (synchronized on CUDA)."""

    def __init__(self, model, device):
        self.device = device
        self.open = {}
        self.handles = []
        modules = dict(model.named_modules())
        for label, path in STAGES.items():
            if path in modules:
                self.handles.append(modules[path].register_forward_pre_hook(self._enter(label)))
                self.handles.append(modules[path].register_forward_hook(self._exit(label)))
        predictor = model.roi_heads.box_predictor
        select = predictor.select

        def timed_select(*args, **kwargs):
            with self.range("selection"):
                return select(*args, **kwargs)

        predictor.select = timed_select

    def range(self, label):
        synchronize(self.device)
        return record_function(label)

    def _enter(self, label):
        def hook(module, args):
            self.open[label] = self.range(label)
            self.open[label].__enter__()

        return hook

    def _exit(self, label):
        def hook(module, args, output):
            synchronize(self.device)
            self.open.pop(label).__exit__(None, None, None)

        return hook


def breakdown(cfg, photos, args, work):
    """Seconds per image of each stage, from one profiled pass; rows."""
    extractor = BatchExtractor(cfg)
    inputs = load_inputs(cfg, photos)[: args.profile_images]
    StageRanges(extractor.model, args.device)
    writer = LAYOUTS["npz"](os.path.join(work, "profiled"), 0, 1)
    if args.device.startswith("cuda"):
        extractor(inputs[:1])  # warm-up: CUDA context, cuDNN autotuning
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        for i in range(0, len(inputs), args.batch_size):
            records = extractor(inputs[i : i + args.batch_size])
            with record_function("writers"):
                writer.write(records)
        synchronize(args.device)
        total = time.perf_counter() - start
    seconds = {e.key: e.cpu_time_total / 1e6 for e in profiler.key_averages()}
    labels = list(STAGES) + ["selection", "writers"]
    rows = [{"stage": label, "s_per_img": seconds.get(label, 0.0) / len(inputs)} for label in labels]
    rows.append({"stage": "other", "s_per_img": total / len(inputs) - sum(r["s_per_img"] for r in rows)})
    for row in rows:
        row["fraction"] = row["s_per_img"] * len(inputs) / total
    return rows


def main():
    p = parser(__doc__)
    p.add_argument("--sizes", default="600,1000", help="shorter sides (px)")
    p.add_argument("--images", type=int, default=1, help="images for the throughput runs (0: skip them)")
    p.add_argument("--profile-images", type=int, default=1, help="images of the profiled pass")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--formats", default="npz", help="extract_net --format")
    p.add_argument("--depth", type=int, default=101, choices=[50, 101, 152], help="ResNet depth")
    p.add_argument("--classes", type=int, default=1600)
    p.add_argument("--proposals", type=int, default=300, help="RPN proposals kept per image")
    p.add_argument("--work", help="folder for images, models and outputs (default: a temporary one)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    throughput, stages = [], []
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        photos = write_images(os.path.join(work, "photo"), max(args.images, args.profile_images), "photo")
        weights = None
        for size in map(int, args.sizes.split(",")):
            cfg = c4_resnet(size, args.depth, args.classes, args.proposals)
            if weights is None:  # the same weights at every size
                weights = model_cfg(save_model(cfg, work, "c4"), "cpu").MODEL.WEIGHTS
            cfg.MODEL.WEIGHTS = weights
            config = os.path.join(work, f"c4_{size}.yaml")
            with open(config, "w") as f:
                f.write(cfg.dump())
            name = f"R{args.depth}-C4 {size}px"
            if args.images:
                throughput.append(compare(name, config, photos, args.images, args, work))
            cfg.MODEL.DEVICE = args.device
            for row in breakdown(cfg, photos, args, work):
                stages.append({"model": name, **row})
            shutil.rmtree(os.path.join(work, "profiled"), ignore_errors=True)
    print(f"C4 ResNet-{args.depth}, {args.classes} classes, {args.proposals} proposals, {args.device}, "
          f"{args.threads} thread(s)")
    report(
        "large", throughput,
        COLUMNS,
        {"stages": stages, "device": args.device, "threads": args.threads, "repeats": args.repeats,
         "depth": args.depth, "classes": args.classes, "proposals": args.proposals,
         "profile_images": args.profile_images},
        args.results,
    )
    print("where the time goes (torch profiler ranges, per image)")
    report("large_stages", stages, ["model", "stage", "s_per_img", "fraction"], {"device": args.device},
           args.results)


if __name__ == "__main__":
    main()
