#!/usr/bin/env python
"""
Mixed precision: the extractor's model forward in float32 and under ``--amp`` (autocast:
bfloat16 on CPU, float16 on CUDA; the box path stays float32, see
:mod:`d2_regionfeat.modeling.heads`), the same weights and images, interleaved; median of
--repeats passes over the images. Reports the speed ratio (float32 time / amp time) and the
effect on results: the fraction of float32 detections that amp also finds (same class,
IoU >= 0.9), the cosine similarity of the matched features (target >= 0.999), and that of
the backbone's feature maps on the first image (how much the model amplifies rounding).

Models: the shipped default model on synthetic-shapes images (features pooled at the
proposals, its config, and at the final boxes, ``POOL_AT: final``), and a random-init R50-FPN
Mask R-CNN (80 classes) at --fpn-size px on 480 x 640 images (--fpn-images 0 to skip): its
speed is a real model's, its accuracy is not (random weights amplify rounding).

    python bench/bench_amp.py [--images 50] [--fpn-images 8] [--fpn-size 800] [--repeats 5] [--device cuda]
"""
import os
import tempfile

import numpy as np
import torch

from bench_extract import fpn_800
from common import interleaved_medians, parser, report, save_model, shipped_model, synchronize, write_images
from d2_regionfeat.data import build_test_transform
from d2_regionfeat.extraction.inputs import ImageDataset, list_inputs
from d2_regionfeat.extraction.model_call import BatchExtractor
from detectron2.config import get_cfg

IOU = 0.9


def load_inputs(cfg, folder):
    """The model inputs of the images in ``folder`` (decoded and resized as extract_net does)."""
    dataset = ImageDataset(
        list_inputs(folder), cfg.INPUT.FORMAT, build_test_transform(cfg)
    )
    return [dataset[i] for i in range(len(dataset))]


def iou_matrix(a, b):
    """(N, 4), (M, 4) x1y1x2y2 -> (N, M) IoU."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def match(reference, other):
    """
    Greedy matching of ``reference``'s detections (by score) to ``other``'s of the same
    class with IoU >= :data:`IOU`. Returns (matched count, cosines of matched features).
    """
    if reference["num_bbox"] == 0 or other["num_bbox"] == 0:
        return 0, []
    iou = iou_matrix(reference["bbox"], other["bbox"])
    iou[reference["objects_id"][:, None] != other["objects_id"][None, :]] = 0
    taken, cosines = set(), []
    for i in np.argsort(-reference["objects_conf"], kind="stable"):
        candidates = [j for j in np.argsort(-iou[i], kind="stable") if iou[i, j] >= IOU and j not in taken]
        if candidates:
            j = candidates[0]
            taken.add(j)
            a, b = reference["x"][i].astype(np.float64), other["x"][j].astype(np.float64)
            cosines.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)))
    return len(taken), cosines


def backbone_cosine(extractors, x):
    """The smallest cosine, over the backbone's output maps, of float32 to amp on input ``x``."""
    cosines = []
    with torch.no_grad():
        outputs = {}
        for key, extractor in extractors.items():
            model = extractor.model
            images = model.preprocess_image([{"image": x["image"]}])
            with extractor.autocast:
                outputs[key] = model.backbone(images.tensor)
        for name, reference in outputs["float32"].items():
            a, b = reference.double().flatten(), outputs["amp"][name].double().flatten()
            cosines.append(float(a @ b / max(float(a.norm() * b.norm()), 1e-12)))
    return min(cosines)


def compare(name, cfg, inputs, args):
    """Time float32 against amp on ``inputs`` and compare their records; returns a row."""
    extractors = {"float32": BatchExtractor(cfg), "amp": BatchExtractor(cfg, amp=True)}
    batches = [inputs[i : i + args.batch_size] for i in range(0, len(inputs), args.batch_size)]
    records = {}

    def runner(key):
        def run():
            records[key] = [r for batch in batches for r in extractors[key](batch)]
            synchronize(args.device)

        return run

    medians = interleaved_medians({key: runner(key) for key in extractors}, args.repeats)
    matched, cosines = 0, []
    for reference, other in zip(records["float32"], records["amp"]):
        m, c = match(reference, other)
        matched += m
        cosines += c
    detections = sum(r["num_bbox"] for r in records["float32"])
    return {
        "model": name,
        "images": len(inputs),
        "fp32_s_img": medians["float32"] / len(inputs),
        "amp_s_img": medians["amp"] / len(inputs),
        "speedup": medians["float32"] / medians["amp"],
        "dets_fp32": detections,
        "dets_amp": sum(r["num_bbox"] for r in records["amp"]),
        "matched": matched / max(detections, 1),
        "cos_mean": float(np.mean(cosines)) if cosines else float("nan"),
        "cos_median": float(np.median(cosines)) if cosines else float("nan"),
        "cos_min": float(np.min(cosines)) if cosines else float("nan"),
        "cos_ge_0.999": float(np.mean(np.array(cosines) >= 0.999)) if cosines else float("nan"),
        "backbone_cos": backbone_cosine(extractors, inputs[0]),
    }


def model_cfg(yaml_file, device):
    cfg = get_cfg()
    cfg.merge_from_file(yaml_file)
    cfg.MODEL.DEVICE = device
    return cfg


def main():
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=24, help="synthetic-shapes images for the shipped model")
    p.add_argument("--fpn-images", type=int, default=1, help="images for R50-FPN (0: skip)")
    p.add_argument("--fpn-size", type=int, default=800, help="R50-FPN shorter side (px)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--work", help="folder for images and models (default: a temporary one)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        cfg = model_cfg(shipped_model(work), args.device)
        shapes = write_images(os.path.join(work, "shapes"), args.images)
        shapes = load_inputs(cfg, shapes)
        rows = [compare("shipped", cfg, shapes, args)]
        cfg.MODEL.REGION_FEATURES.POOL_AT = "final"
        rows.append(compare("shipped, POOL_AT final", cfg, shapes, args))
        if args.fpn_images:
            cfg = model_cfg(save_model(fpn_800(args.fpn_size), work, "r50_fpn"), args.device)
            photos = write_images(os.path.join(work, "photo"), args.fpn_images, "photo")
            rows.append(compare(f"R50-FPN {args.fpn_size}px", cfg, load_inputs(cfg, photos), args))
    print(f"--amp vs float32, {args.device}, median of {args.repeats} interleaved passes; "
          f"matched: same class, IoU >= {IOU}")
    report(
        "amp", rows,
        ["model", "images", "fp32_s_img", "amp_s_img", "speedup", "dets_fp32", "dets_amp", "matched",
         "cos_mean", "cos_median", "cos_min", "cos_ge_0.999", "backbone_cos"],
        {"device": args.device, "repeats": args.repeats, "iou": IOU}, args.results,
    )


if __name__ == "__main__":
    main()
