#!/usr/bin/env python
"""
Train (or evaluate) a detectron2 model with d2_regionfeat's heads, in detectron2's
``tools/train_net.py`` style: DefaultTrainer, COCOEvaluator on ``DATASETS.TEST``.

The synthetic shapes datasets (``synthetic_shapes_train`` / ``synthetic_shapes_val``) are
registered with their images under ``$D2_REGIONFEAT_DATASETS`` (default
``~/.cache/d2_regionfeat/datasets``), made there on first use. The shipped default model:

    python tools/train_net.py --config-file configs/synthetic/shapes_mask_rcnn.yaml
    python tools/train_net.py --config-file configs/synthetic/shapes_mask_rcnn.yaml \\
        --eval-only MODEL.WEIGHTS d2_regionfeat/pretrained/shapes_mask_rcnn.pth

With ``MODEL.ATTRIBUTE_ON``, training reads the annotations' ``attribute_ids``
(AttributeDatasetMapper) and evaluation also reports the attribute accuracy on the
ground-truth boxes (d2_regionfeat.evaluation.AttributeEvaluator).
"""
import os

import d2_regionfeat  # noqa: F401  (registers the heads, backbone and config node)
from d2_regionfeat.modeling.attributes import AttributeDatasetMapper
from d2_regionfeat.data import register_synthetic_shapes
from d2_regionfeat.evaluation import AttributeEvaluator

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, verify_results

DATASETS_ROOT = os.getenv("D2_REGIONFEAT_DATASETS", "~/.cache/d2_regionfeat/datasets")


class Trainer(DefaultTrainer):
    """
    DefaultTrainer evaluating with COCOEvaluator (boxes, and masks for mask models); with
    ``MODEL.ATTRIBUTE_ON``, training on the annotations' attributes too and evaluating the
    attribute accuracy beside COCO's metrics.
    """

    @classmethod
    def build_train_loader(cls, cfg):
        if not cfg.MODEL.ATTRIBUTE_ON:
            return super().build_train_loader(cfg)
        return build_detection_train_loader(cfg, mapper=AttributeDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        # pycocotools' own evaluation: the fast one needs detectron2's compiled extension.
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        # AttributeEvaluator runs the model itself (on the ground-truth boxes), so it is made
        # here, where the model is known, rather than in build_evaluator.
        if evaluators is None and cfg.MODEL.ATTRIBUTE_ON:
            evaluators = [
                DatasetEvaluators(
                    [cls.build_evaluator(cfg, name), AttributeEvaluator(name, model)]
                )
                for name in cfg.DATASETS.TEST
            ]
        return super().test(cfg, model, evaluators)


def setup(args):
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    register_synthetic_shapes(os.path.expanduser(DATASETS_ROOT))
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
