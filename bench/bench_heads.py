#!/usr/bin/env python
"""
Head overhead: the same weights and images through the plain model, the Feature heads in
each SOURCE / SELECTION / POOL_AT mode, the StackOverflow recipe (stages run by hand,
``box_features[pred_inds]``) and the two-pass way (predict, then re-pool the final boxes),
interleaved; median of --repeats runs, as a ratio to the plain model. Target: <= 1.02x.

    python bench/bench_heads.py [--repeats 10] [--size 512] [--depth 50] [--proposals 1000] \\
        [--detections 100] [--device cuda]
"""
import torch

from common import interleaved_medians, parser, report
from helpers import build, image, make_cfg

MODES = {
    "feature (box_head)": {},
    "feature (pooled)": {"source": "pooled"},
    "feature (class_probs)": {"class_probs": True},
    "feature (regions, 36)": {"selection": "regions", "min_boxes": 36, "max_boxes": 36},
    "feature (pool_at final)": {"pool_at": "final"},
}


def stackoverflow_recipe(model, batch):
    """The hand-run stages people copy: FPN only, one image only."""
    heads = model.roi_heads
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    feats = [features[f] for f in heads.box_in_features]
    box_features = heads.box_head(heads.box_pooler(feats, [p.proposal_boxes for p in proposals]))
    predictions = heads.box_predictor(box_features)
    instances, kept = heads.box_predictor.inference(predictions, proposals)
    instances = heads.forward_with_given_boxes(features, instances)
    results = model._postprocess(instances, batch, images.image_sizes)
    return results, box_features[kept[0]]


def two_pass(model, batch):
    """Predict, then run the backbone again and pool + box-head the final boxes."""
    heads = model.roi_heads
    raw = model.inference(batch, do_postprocess=False)
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    feats = [features[f] for f in heads.box_in_features]
    return heads.box_head(heads.box_pooler(feats, [r.pred_boxes for r in raw]))


def main():
    p = parser(__doc__)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--size", type=int, default=512, help="shorter image side")
    p.add_argument("--depth", type=int, default=50, choices=[18, 34, 50, 101], help="ResNet depth")
    p.add_argument("--proposals", type=int, default=1000, help="RPN proposals kept per image")
    p.add_argument("--detections", type=int, default=100, help="TEST.DETECTIONS_PER_IMAGE")
    args = p.parse_args()

    def model_for(feature=True, **keys):
        cfg = make_cfg("fpn", feature=feature, **keys)
        cfg.MODEL.RPN.POST_NMS_TOPK_TEST = args.proposals
        cfg.TEST.DETECTIONS_PER_IMAGE = args.detections
        cfg.MODEL.RESNETS.DEPTH = args.depth
        if args.depth < 50:
            cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        cfg.MODEL.DEVICE = args.device
        return build(cfg, seed=0).to(args.device)

    plain = model_for(feature=False)
    models = {"plain": plain}
    for name, keys in MODES.items():
        models[name] = model_for(**keys)
        models[name].load_state_dict(plain.state_dict())
    height, width = args.size, args.size * 4 // 3
    batch = [{"image": image(1, height, width).to(args.device), "height": height, "width": width}]

    def runner(fn):
        def run():
            with torch.no_grad():
                fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
        return run

    variants = {name: runner(lambda m=m: m(batch)) for name, m in models.items()}
    variants["stackoverflow recipe"] = runner(lambda: stackoverflow_recipe(plain, batch))
    variants["two-pass (re-pool final)"] = runner(lambda: two_pass(plain, batch))
    medians = interleaved_medians(variants, args.repeats)
    base = medians["plain"]
    rows = [
        {"variant": name, "median_s": t, "ratio_to_plain": t / base} for name, t in medians.items()
    ]
    print(f"head overhead, R{args.depth}-FPN Mask R-CNN, {args.proposals} proposals, {height}x{width}, "
          f"{args.device}, median of {args.repeats} interleaved runs")
    report("heads", rows, ["variant", "median_s", "ratio_to_plain"],
           {"image_size": [height, width], "repeats": args.repeats, "device": args.device,
            "depth": args.depth, "proposals": args.proposals, "detections": args.detections}, args.results)


if __name__ == "__main__":
    main()
