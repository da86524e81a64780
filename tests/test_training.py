"""
detectron2's own training entry point runs in this environment, on CPU.

Run as a script, this file is a training script in the style of detectron2's
``tools/train_net.py`` (``default_argument_parser``, ``launch``, ``default_setup``,
``DefaultTrainer`` with a COCOEvaluator at the end), on tiny synthetic-shapes datasets. The
test runs it in a fresh process for 2 iterations of the shipped model's architecture, with
FeatureROIHeads, and checks what it leaves in its output folder.
"""
import json
import math
import os
import subprocess
import sys

import torch

import d2_regionfeat  # noqa: F401  (registers the heads, backbone and config node)
from d2_regionfeat.data import CLASSES, load_synthetic_shapes
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic", "shapes_mask_rcnn.yaml")
# split -> number of images of the tiny datasets
TINY_SPLITS = {"train": 2, "val": 1}


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # pycocotools' evaluation: the fast one is a compiled op.
        folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=folder, use_fast_impl=False)


def register_tiny_shapes(root):
    for split, num_images in TINY_SPLITS.items():
        name = f"tiny_shapes_{split}"
        DatasetCatalog.register(
            name, lambda split=split, n=num_images: load_synthetic_shapes(root, split, num_images=n)
        )
        MetadataCatalog.get(name).set(thing_classes=list(CLASSES), evaluator_type="coco")


def main(args):
    register_tiny_shapes(args.shapes_root)
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def test_default_trainer_trains_and_evaluates_for_two_iterations(tmp_path):
    output = tmp_path / "output"
    opts = {
        "DATASETS.TRAIN": "('tiny_shapes_train',)",
        "DATASETS.TEST": "('tiny_shapes_val',)",
        "SOLVER.IMS_PER_BATCH": "2",
        "SOLVER.MAX_ITER": "2",
        "SOLVER.STEPS": "()",
        "SOLVER.CHECKPOINT_PERIOD": "100",
        "INPUT.MIN_SIZE_TRAIN": "(160,)",
        "INPUT.MAX_SIZE_TRAIN": "224",
        "INPUT.MIN_SIZE_TEST": "160",
        "INPUT.MAX_SIZE_TEST": "224",
        "DATALOADER.NUM_WORKERS": "0",
        "OUTPUT_DIR": str(output),
    }
    command = [sys.executable, __file__, "--num-gpus", "1", "--config-file", CONFIG]
    command += ["--shapes-root", str(tmp_path / "shapes")]
    command += [token for item in opts.items() for token in item]
    # The same packages as this process (PYTHONPATH first, as here), one thread.
    path = [p for p in (os.environ.get("PYTHONPATH"), REPO) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1")
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]

    # default_setup: the environment and the full config are in the output folder.
    with open(output / "log.txt") as f:
        assert "Environment info:" in f.read()
    cfg = get_cfg()
    cfg.merge_from_file(str(output / "config.yaml"))
    assert cfg.MODEL.ROI_HEADS.NAME == "FeatureROIHeads" and cfg.SOLVER.MAX_ITER == 2

    # DefaultTrainer: losses of the last iteration, the final checkpoint, the evaluation.
    with open(output / "metrics.json") as f:
        metrics = [json.loads(line) for line in f]
    last = [m for m in metrics if "total_loss" in m][-1]
    assert last["iteration"] == 1 and math.isfinite(last["total_loss"])
    assert (output / "inference" / "instances_predictions.pth").is_file()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    checkpoint = DetectionCheckpointer(model).load(str(output / "model_final.pth"))
    assert checkpoint["iteration"] == 1
    saved = torch.load(output / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument("--shapes-root", required=True, help="folder of the tiny datasets")
    args = parser.parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
