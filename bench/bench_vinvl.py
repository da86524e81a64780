"""
VinVL's X152-C4 config (configs/VinVL) against the BUTD R101-C4 config (configs/VG): time per
image at each test size, random weights, side by side; and the selection's share of it.

Random-init models get their batch-norm statistics from a sample image and their predictors
rescaled (common.calibrate_norms, helpers.tame): their regions are arbitrary, their cost is
real. Each image is given at its network-input size: short side S, long side 5/3 S (capped
by --max-size if given): 600 -> 600 x 1000, the configs' own test size (600 / 1000);
1000 -> 1000 x 1666, as bench_large.py.

    python bench/bench_vinvl.py [--sizes 600,1000] [--repeats 3] [--device cuda]
    python bench/bench_vinvl.py --sizes 64 --max-size 96 --depth 50 --narrow --classes 8 --proposals 20
"""
import json
import os
import time

import torch

from common import REPO, calibrate_norms, interleaved_medians, machine, parser, synchronize

CONFIGS = {
    "vinvl_x152c4": os.path.join(REPO, "configs", "VinVL", "vinvl_vg_x152c4.yaml"),
    "butd_r101c4": os.path.join(REPO, "configs", "VG", "faster_rcnn_R_101_C4_attr_butd.yaml"),
}


def build(path, args):
    from detectron2.config import get_cfg
    from helpers import build as build_model, tame

    cfg = get_cfg()
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = args.device
    if args.depth:
        cfg.MODEL.RESNETS.DEPTH = args.depth
    if args.narrow:
        from helpers import narrow

        narrow(cfg)
        cfg.MODEL.RESNETS.NUM_GROUPS = min(cfg.MODEL.RESNETS.NUM_GROUPS, 4)
    if args.classes:
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = args.classes
    if args.proposals:
        cfg.MODEL.RPN.POST_NMS_TOPK_TEST = args.proposals
    return tame(calibrate_norms(build_model(cfg, wild=True)))


class SelectionTimer:
    """Seconds spent in the box predictor's ``select`` (the region selection)."""

    def __init__(self, model, device):
        self.seconds, predictor, select = 0.0, model.roi_heads.box_predictor, model.roi_heads.box_predictor.select

        def timed(*a, **k):
            synchronize(device)
            start = time.perf_counter()
            out = select(*a, **k)
            synchronize(device)
            self.seconds += time.perf_counter() - start
            return out

        predictor.select = timed


def main():
    p = parser(__doc__)
    p.add_argument("--sizes", default="600,1000", help="shorter sides (px)")
    p.add_argument("--max-size", type=int, default=0, help="cap of the long side (0: none)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--depth", type=int, default=0, help="both models' ResNet depth (0: the configs' 152 / 101)")
    p.add_argument("--narrow", action="store_true", help="narrow widths (tests/helpers.py narrow, at most 4 groups)")
    p.add_argument("--classes", type=int, default=0, help="classes of both (0: the configs' 1594 / 1600)")
    p.add_argument("--proposals", type=int, default=0, help="proposals kept by the RPN (0: the configs' 300)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from helpers import image

    models = {name: build(path, args) for name, path in CONFIGS.items()}
    timers = {name: SelectionTimer(m, args.device) for name, m in models.items()}
    rows = []
    for short in [int(s) for s in args.sizes.split(",")]:
        long = min(args.max_size or short * 5 // 3, short * 5 // 3)
        h, w = (short, long)
        inputs = [{"image": image(7, h, w).to(args.device)}]

        def run(name):
            def forward():
                with torch.no_grad():
                    models[name](inputs)
                synchronize(args.device)
            return forward

        for t in timers.values():
            t.seconds = 0.0
        medians = interleaved_medians({n: run(n) for n in models}, args.repeats)
        calls = args.repeats + 1  # with the warm-up
        for name, seconds in medians.items():
            share = timers[name].seconds / calls / seconds
            rows.append({"model": name, "size": f"{h}x{w}", "s_per_image": seconds, "selection_share": share})
        rows.append({"model": "ratio vinvl/butd", "size": f"{h}x{w}",
                     "s_per_image": medians["vinvl_x152c4"] / medians["butd_r101c4"]})
    for r in rows:
        print(f"{r['model']:>18} {r['size']:>9} {r['s_per_image']:9.3f}"
              + (f"  selection {100 * r['selection_share']:.1f} %" if "selection_share" in r else ""))
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "vinvl.json"), "w") as f:
        json.dump({"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
