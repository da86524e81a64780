"""
Attribute accuracy of a model with the attribute head, on the ground-truth objects of a
dataset: every annotated box is given to the model (as :func:`regions_for_boxes` does, no
RPN), so the accuracy measures the attribute head alone, not the detector's recall.
"""
import itertools
import logging
from collections import OrderedDict
from typing import Dict, List

import numpy as np
import torch

import detectron2.utils.comm as comm
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode

from .modeling.given_boxes import regions_for_boxes


class AttributeEvaluator(DatasetEvaluator):
    """
    For every ground-truth object that has attributes (``attribute_ids`` of its annotation),
    the model's ``attr_probs`` for its box (M, A+1, "no attribute" last) give:

    * ``top1``: % of objects whose most probable real attribute (``attrs_id``) is one of theirs;
    * ``<group>`` for each group of the dataset's metadata ``attribute_groups`` (a dict: group
      name -> attribute names, e.g. {"colour": [...], "size": ["small", "large"]}): % of the
      objects with an attribute of that group whose most probable attribute *within the group*
      is theirs (e.g. the colour accuracy among coloured objects).

    Also reports ``num_objects``, and ``num_<group>`` the objects counted for each group.
    """

    def __init__(self, dataset_name: str, model):
        """
        Args:
            dataset_name: a registered dataset whose dicts carry ``attribute_ids`` and whose
                metadata has ``attribute_classes`` (and optionally ``attribute_groups``).
            model: the ``GeneralizedRCNN`` evaluated, with Feature ROI heads and the attribute
                head; it is run on the ground-truth boxes of each image :meth:`process` sees.
        """
        metadata = MetadataCatalog.get(dataset_name)
        if not hasattr(metadata, "attribute_classes"):
            raise ValueError(f"Dataset {dataset_name!r} has no attribute_classes in its metadata")
        names = list(metadata.attribute_classes)
        groups = getattr(metadata, "attribute_groups", {})
        unknown = [n for group in groups.values() for n in group if n not in names]
        if unknown:
            raise ValueError(
                f"attribute_groups of {dataset_name!r} name unknown attributes {unknown}"
            )
        self._groups = {g: [names.index(n) for n in group] for g, group in groups.items()}
        self._model = model
        self._gt = {d["image_id"]: d["annotations"] for d in DatasetCatalog.get(dataset_name)}
        self._logger = logging.getLogger(__name__)

    def reset(self):
        self._hits: List[Dict[str, int]] = []  # per object: metric -> 1 hit / 0 miss

    def process(self, inputs, outputs):
        for inputs_i in inputs:
            annotations = [a for a in self._gt[inputs_i["image_id"]] if a.get("attribute_ids")]
            if not annotations:
                continue
            boxes = np.array(
                [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
            )
            instances = regions_for_boxes(self._model, [inputs_i], [boxes])[0]
            if not instances.has("attr_probs"):
                raise ValueError("The model has no attribute head (MODEL.ATTRIBUTE_ON is False)")
            probs = instances.attr_probs[:, :-1].to("cpu")
            for annotation, p in zip(annotations, probs):
                self._hits.append(self._object_hits(set(annotation["attribute_ids"]), p))

    def _object_hits(self, truth: set, probs: torch.Tensor) -> Dict[str, int]:
        """Hits of one object with attributes ``truth`` and probabilities ``probs`` (A,)."""
        hits = {"top1": int(int(probs.argmax()) in truth)}
        for group, ids in self._groups.items():
            group_truth = truth.intersection(ids)
            if group_truth:
                hits[group] = int(ids[int(probs[ids].argmax())] in group_truth)
        return hits

    def evaluate(self):
        hits = list(itertools.chain(*comm.gather(self._hits, dst=0)))
        if not comm.is_main_process():
            return {}
        if not hits:
            self._logger.warning("AttributeEvaluator saw no object with attributes")
            return {}
        result = OrderedDict(num_objects=len(hits))
        for metric in ["top1", *self._groups]:
            counted = [h[metric] for h in hits if metric in h]
            if metric != "top1":
                result[f"num_{metric}"] = len(counted)
            if counted:
                result[metric] = 100.0 * sum(counted) / len(counted)
        self._logger.info(f"Attribute accuracy: {dict(result)}")
        return {"attributes": result}
