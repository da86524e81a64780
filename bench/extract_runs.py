#!/usr/bin/env python
"""
One timed extraction in a process of its own, started by :func:`common.run_child` (first
argument: when the parent launched it, ``time.time()``); prints its figures as one JSON line.

* ``extract``: ``tools/extract_net.py`` itself (its ``main``), over a folder of images, or
  over tar shards (``--images 'shards/{00000..00007}.tar'``: a shard run, output shards).
* ``loop``: what a user writes without it: ``DefaultPredictor`` on each image read with
  detectron2's ``read_image``, then ``np.savez`` of its regions, one file per image.

Both report ``startup_s`` (launch to model built with its weights: imports, config, build,
checkpoint), ``run_s`` (the rest: images, writing, merging), ``model_s`` (seconds inside the
model's forward, from hooks on the model), ``busy`` (model_s / run_s), ``images``, peak
resident memory of the process (``rss_mb``) and of its finished children (DataLoader
workers, ``children_rss_mb``).
"""
import argparse
import os
import resource
import sys
import threading
import time

LAUNCHED = float(sys.argv.pop(1))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import json  # noqa: E402

import extract_net  # noqa: E402  (tools/extract_net.py: imports torch, detectron2, d2_regionfeat)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import d2_regionfeat.extraction.job  # noqa: E402
from d2_regionfeat.formats import LAYOUTS, ShardFolder  # noqa: E402
from d2_regionfeat.formats.feature_shards import FeatureShardWriter, holds_shards  # noqa: E402


class ModelClock:
    """Seconds spent inside ``model``'s forward (synchronized on CUDA), from forward hooks."""

    def __init__(self, model):
        self.seconds = 0.0
        self.cuda = next(model.parameters()).is_cuda
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._exit)

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _enter(self, module, args):
        self._sync()
        self._start = time.perf_counter()

    def _exit(self, module, args, output):
        self._sync()
        self.seconds += time.perf_counter() - self._start


class WriterClock:
    """
    Seconds spent in the writers of :data:`LAYOUTS` (``write``, ``close``, ``merge``) and in
    the output shards' :class:`FeatureShardWriter` (``add``, ``close``), counted once where one
    writer calls another's method.
    """

    def __init__(self):
        self.seconds = 0.0
        self.local = threading.local()
        # every original first: a writer class may inherit from another one
        originals = {cls: (cls.write, cls.close, cls.merge) for cls in LAYOUTS.values()}
        for cls, (write, close, merge) in originals.items():
            cls.write, cls.close = self._timed(write), self._timed(close)
            cls.merge = staticmethod(self._timed(merge))  # merge is bound to cls already
        FeatureShardWriter.add = self._timed(FeatureShardWriter.add)
        FeatureShardWriter.close = self._timed(FeatureShardWriter.close)

    def _timed(self, method):
        def timed(*args, **kwargs):
            depth = getattr(self.local, "depth", 0)
            self.local.depth = depth + 1
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.local.depth = depth
                if depth == 0:
                    self.seconds += time.perf_counter() - start

        return timed


def run_extract(args):
    state = {}
    writers = WriterClock()

    class TimedExtractor(d2_regionfeat.extraction.job.BatchExtractor):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            state["clock"] = ModelClock(self.model)
            state["built"] = time.time()

    d2_regionfeat.extraction.job.BatchExtractor = TimedExtractor
    argv = [
        "--config-file", args.config, "--input", args.images, "--output", args.output,
        "--format", args.formats, "--batch-size", str(args.batch_size),
        "--num-workers", str(args.num_workers), "--device", args.device,
    ] + (["--amp"] if args.amp else []) + (["--limit", str(args.limit)] if args.limit else [])
    status = extract_net.main(argv)
    end = time.time()
    if status != 0:
        raise SystemExit(f"extract_net exited with {status}")
    if holds_shards(args.output):
        images = len(ShardFolder(args.output))
    else:
        with open(os.path.join(args.output, "manifest.json")) as f:
            images = json.load(f)["counts"]["written"]
    return state["built"], end, state["clock"], images, writers.seconds


def run_loop(args):
    from detectron2.config import get_cfg
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor

    cfg = get_cfg()
    cfg.merge_from_file(args.config)
    cfg.MODEL.DEVICE = args.device
    predictor = DefaultPredictor(cfg)
    clock = ModelClock(predictor.model)
    built = time.time()
    names = sorted(os.listdir(args.images))
    names = names[: args.limit] if args.limit else names
    os.makedirs(args.output, exist_ok=True)
    for name in names:
        image = read_image(os.path.join(args.images, name), format=cfg.INPUT.FORMAT)
        instances = predictor(image)["instances"].to("cpu")
        np.savez(
            os.path.join(args.output, os.path.splitext(name)[0] + ".npz"),
            x=instances.box_features.numpy(), bbox=instances.pred_boxes.tensor.numpy(),
            num_bbox=len(instances), image_h=image.shape[0], image_w=image.shape[1],
            objects_id=instances.pred_classes.numpy(), objects_conf=instances.scores.numpy(),
        )
    return built, time.time(), clock, len(names), None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["extract", "loop"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--formats", default="npz")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args()
    built, end, clock, images, writer_s = (run_extract if args.mode == "extract" else run_loop)(args)
    run_s = end - built
    kb = 1 / 1024
    print(json.dumps({
        "mode": args.mode,
        "images": images,
        "startup_s": built - LAUNCHED,
        "run_s": run_s,
        "model_s": clock.seconds,
        "busy": clock.seconds / run_s,
        "images_per_s": images / run_s,
        "writer_s": writer_s,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kb,
        "children_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kb,
    }))


if __name__ == "__main__":
    main()
