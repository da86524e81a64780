#!/usr/bin/env python
"""
Explain, stage by stage, how a detectron2 model goes from proposals to its final
detections on an image: how many proposals score above the threshold, how many
(proposal, class) candidates that gives, what NMS removes (and by which kept box), what the
top-k limit and postprocessing remove.

    python tools/explain_detections.py --config-file CFG --input IMG [IMG ...] \\
        [--thresh 0.5] [--json] [--weights model.pth] [OVERRIDES ...]

``CFG`` is a yacs YAML (overrides ``MODEL.WEIGHTS model.pth ...``) or a LazyConfig ``.py``
(overrides ``train.init_checkpoint=model.pth ...``), as in tools/extract_net.py.

Classes are named by the model's names (MODEL.REGION_FEATURES.CLASS_NAMES_FILE, else the
thing_classes of its test dataset; ``class_<index>`` without names): ``class_name`` beside
each ``class`` in the JSON.

A config with plain ROI heads (StandardROIHeads, Res5ROIHeads, CascadeROIHeads, ...) is
switched to their region-feature versions, which give the same detections.
"""
import argparse
import json
import sys

from detectron2.data.detection_utils import read_image

from d2_regionfeat.extraction.model_config import (
    add_config_arguments,
    model_config_from_args,
    split_overrides,
)
from d2_regionfeat.modeling.explain import explain_detections, format_report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--input", required=True, nargs="+", metavar="IMAGE")
    parser.add_argument("--thresh", type=float, default=None,
                        help="score threshold to explain (default: the config's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--opts", dest="more_opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides, as the positional ones")
    args = add_config_arguments(parser).parse_args(argv)
    args.input, overrides = split_overrides(args.input)
    args.opts = overrides + args.opts
    return args


def main(argv=None):
    args = parse_args(argv)
    config = model_config_from_args(args, args.more_opts)
    names = config.vocabularies()
    predictor = config.predictor()
    reports = {}
    for path in args.input:
        inputs = predictor.model_inputs(read_image(path, format=config.input_format))
        (reports[path],) = explain_detections(predictor.model, [inputs], args.thresh)
    if args.json:
        for report in reports.values():
            for item in report["removed_by_nms"]:
                item["class_name"] = names.class_name(item["class"])
        print(json.dumps(reports, indent=1))
    else:
        print("\n\n".join(
            format_report(report, path, names.class_names) for path, report in reports.items()
        ))


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"explain_detections: error: {e}")
