#!/usr/bin/env python
"""
Extraction throughput: ``tools/extract_net.py`` against the loop a user writes
(``DefaultPredictor`` per image + ``np.savez`` per image), each in a fresh process, run
alternately --repeats times; medians. Per model: images/s of both (start-up excluded), their
ratio, start-up seconds (imports, build, weights), the model's busy fraction (seconds in the
model's forward / wall time after start-up) and the writers' seconds.
Targets on CPU: busy >= 0.95, ratio >= 1.0; on a GPU, ratio >= 2.

Models: the shipped default model on synthetic-shapes images (--images, 200 in the full
setting) and a random-init Mask R-CNN R50-FPN (80 classes) at detectron2's default 800 px on
480 x 640 images (--fpn-images; 200 in the full setting).

    python bench/bench_extract.py [--images 200] [--fpn-images 200] [--repeats 3] [--device cuda]
"""
import os
import shutil
import statistics
import tempfile

from common import alternating_runs, parser, report, save_model, shipped_model, write_images
from helpers import make_cfg

# The columns of a row of :func:`compare`.
COLUMNS = [
    "model", "images", "loop_img_s", "extract_img_s", "ratio", "loop_startup_s",
    "extract_startup_s", "loop_busy", "extract_busy", "writers_frac",
]


def fpn_800(size=800):
    """detectron2's R50-FPN Mask R-CNN at its default test size, random weights, 80 classes."""
    cfg = make_cfg("fpn")
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    # random weights spread their scores over 80 classes: COCO's 0.05 would keep few boxes
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.01
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = size, size * 5 // 3
    return cfg


def compare(name, config, images, count, args, work):
    """Run the loop and extract_net alternately; returns the row of ``name``."""
    def run(mode):
        def arguments():
            out = os.path.join(work, f"{name}-{mode}")
            shutil.rmtree(out, ignore_errors=True)
            return ["extract_runs.py", mode, "--config", config, "--images", images, "--output", out,
                    "--device", args.device, "--limit", count, "--batch-size", args.batch_size,
                    "--num-workers", args.num_workers, "--formats", args.formats]
        return arguments

    runs = alternating_runs({"loop": run("loop"), "extract": run("extract")}, args.repeats, args.threads)

    def median(mode, key):
        return statistics.median(run[key] for run in runs[mode])

    return {
        "model": name,
        "images": count,
        "loop_img_s": median("loop", "images_per_s"),
        "extract_img_s": median("extract", "images_per_s"),
        "ratio": statistics.median(
            e["images_per_s"] / lp["images_per_s"] for e, lp in zip(runs["extract"], runs["loop"])
        ),
        "loop_startup_s": median("loop", "startup_s"),
        "extract_startup_s": median("extract", "startup_s"),
        "loop_busy": median("loop", "busy"),
        "extract_busy": median("extract", "busy"),
        "writers_frac": median("extract", "writer_s") / median("extract", "run_s"),
        "runs": runs,
    }


def main():
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=200, help="images for the shipped model")
    p.add_argument("--fpn-images", type=int, default=4, help="images for R50-FPN at 800 px (0: skip)")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--formats", default="npz", help="extract_net --format (the loop writes npz)")
    p.add_argument("--work", help="folder for images, models and outputs (default: a temporary one)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        rows = [compare(
            "shipped", shipped_model(work), write_images(os.path.join(work, "shapes"), args.images),
            args.images, args, work,
        )]
        if args.fpn_images:
            rows.append(compare(
                "R50-FPN 800px", save_model(fpn_800(), work, "r50_fpn_800"),
                write_images(os.path.join(work, "photo"), args.fpn_images, "photo"),
                args.fpn_images, args, work,
            ))
    print(f"extraction throughput, {args.device}, {args.threads} thread(s) per process, "
          f"batch {args.batch_size}, {args.num_workers} workers, median of {args.repeats}")
    report(
        "extract", rows,
        COLUMNS,
        {"device": args.device, "threads": args.threads, "repeats": args.repeats,
         "batch_size": args.batch_size, "num_workers": args.num_workers, "formats": args.formats},
        args.results,
    )


if __name__ == "__main__":
    main()
