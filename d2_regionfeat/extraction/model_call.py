"""
The model call of an extraction: :class:`BatchExtractor` runs a region-feature model over
decoded images and turns its output ``Instances`` into per-image records
(:mod:`d2_regionfeat.formats.records`); :func:`record_keys` says which keys they hold.
"""
from collections import defaultdict
from typing import Dict, List

import numpy as np
import torch

from ..formats.grid import GRID_KEYS, grid_record
from ..modeling.outputs import RegionOutputs
from .model_config import as_model_config


def record_keys(emits: RegionOutputs) -> List[str]:
    """The keys of the records of a model that emits ``emits``."""
    grid = list(GRID_KEYS) if emits.grid is not None else []
    if emits.grid is not None and emits.grid.only:
        return grid
    keys = ["image_id", "image_h", "image_w", "num_bbox", "x", "bbox", "objects_id", "objects_conf"]
    keys += [k for k in grid if k not in keys]
    if emits.class_probs:
        keys.append("cls_prob")
    if emits.attributes:
        vinvl = emits.attribute_kind == "vinvl"
        keys += ["attr_labels", "attr_scores"] if vinvl else ["attrs_id", "attrs_conf", "attr_prob"]
    return keys


class BatchExtractor:
    """
    Runs a region-feature model over decoded images as :class:`DefaultPredictor` does one at
    a time: on CUDA the images of a batch are grouped by their padded size, so that each
    one's detections are those it gets alone (a batch padded to a larger size would add
    anchors); on CPU each image is run alone.

    With ``amp``, the model's forward runs under ``torch.autocast`` (bfloat16 on CPU, float16
    on CUDA), except its box path, which the Feature heads keep in float32; the records are
    float32 (float16 features with ``fp16``) either way.
    """

    def __init__(self, cfg, fp16=False, amp=False):
        """``cfg``: a :class:`model_config.ModelConfig`, or a yacs ``CfgNode``."""
        model_config = as_model_config(cfg)
        self.model = model_config.build_model()
        model_config.load_weights(self.model)
        self.divisibility = max(1, self.model.backbone.size_divisibility)
        self.fp16 = fp16
        device = self.model.device.type
        self.autocast = torch.autocast(
            device, dtype=torch.bfloat16 if device == "cpu" else torch.float16, enabled=amp
        )

    def _padded_size(self, image):
        d = self.divisibility
        return tuple(-(-s // d) * d for s in image.shape[-2:])

    @torch.no_grad()
    def __call__(self, inputs: List[Dict]) -> List[Dict]:
        """
        Args:
            inputs: :class:`inputs.ImageDataset` items ("item", "image", "height", "width").

        Returns:
            the records (see :mod:`d2_regionfeat.io`) of ``inputs``, in order.
        """
        if self.model.device.type == "cpu":
            # a batched forward saves nothing on CPU, and its larger activations cost
            # 10-30 % at 800 px (bench/README.md): one image a call
            groups = [[index] for index in range(len(inputs))]
        else:
            by_size = defaultdict(list)
            for index, x in enumerate(inputs):
                by_size[self._padded_size(x["image"])].append(index)
            groups = list(by_size.values())
        records = [None] * len(inputs)
        for indices in groups:
            batch = [{k: inputs[i][k] for k in ("image", "height", "width")} for i in indices]
            with self.autocast:
                outputs = self.model(batch)
            for i, output in zip(indices, outputs):
                # its grid, if any, and its regions (none in grid-only mode)
                records[i] = self._grid_record(inputs[i], output.get("grid"))
                if "instances" in output:
                    records[i].update(self._record(inputs[i], output["instances"].to("cpu")))
        return records

    def _grid_record(self, x, grid):
        if grid is None:
            return {}
        return grid_record(x["item"].image_id, x["height"], x["width"], grid, self.fp16)

    def _record(self, x, instances):
        record = {
            "image_id": x["item"].image_id,
            "image_h": x["height"],
            "image_w": x["width"],
            "num_bbox": len(instances),
            "x": _numpy(instances.box_features, np.float16 if self.fp16 else np.float32),
            "bbox": _numpy(instances.pred_boxes.tensor, np.float32),
            "objects_id": _numpy(instances.pred_classes, np.int64),
            "objects_conf": _numpy(instances.scores, np.float32),
        }
        if instances.has("class_probs"):
            record["cls_prob"] = _numpy(instances.class_probs, np.float32)
        if instances.has("attr_probs"):
            record["attrs_id"] = _numpy(instances.attrs_id, np.int64)
            record["attrs_conf"] = _numpy(instances.attrs_conf, np.float32)
            record["attr_prob"] = _numpy(instances.attr_probs, np.float32)
        if instances.has("attr_labels"):  # VinVL's attribute head
            record["attr_labels"] = _numpy(instances.attr_labels, np.int64)
            record["attr_scores"] = _numpy(instances.attr_scores, np.float32)
        return record


def _numpy(tensor, dtype):
    """A CPU tensor as an ndarray of ``dtype`` (bfloat16, which numpy lacks, via float32)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy().astype(dtype)
