"""
The default detector shipped with d2_regionfeat: a small Mask R-CNN trained on the synthetic
shapes of :mod:`d2_regionfeat.data.synthetic`, with its weights and config in the package,
so that detections and region features need nothing downloaded.
"""
import os

import torch

from detectron2.config import get_cfg

MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
CONFIG_FILE = os.path.join(MODEL_DIR, "shapes_mask_rcnn.yaml")
WEIGHTS_FILE = os.path.join(MODEL_DIR, "shapes_mask_rcnn.pth")


def get_default_model_cfg(device: str = None):
    """
    The config of the shipped model, with ``MODEL.WEIGHTS`` set to its weights file.

    Args:
        device: "cpu", "cuda", ...; by default "cuda" when available, else "cpu".

    Returns:
        CfgNode: for DefaultPredictor or build_model (FeatureROIHeads, class probabilities on).
    """
    if not os.path.isfile(WEIGHTS_FILE):
        raise FileNotFoundError(
            f"The shipped weights {WEIGHTS_FILE} are missing: reinstall d2_regionfeat "
            "(they are package data), or train them with tools/train_net.py"
        )
    cfg = get_cfg()
    cfg.merge_from_file(CONFIG_FILE)
    cfg.MODEL.WEIGHTS = WEIGHTS_FILE
    cfg.MODEL.DEVICE = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return cfg
