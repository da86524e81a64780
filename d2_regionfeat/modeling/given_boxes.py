"""Region features and class probabilities for boxes the user supplies (no RPN)."""
from typing import List, Optional

import numpy as np
import torch

from detectron2.engine import DefaultPredictor
from detectron2.structures import Boxes, Instances

from ..data.transforms import build_test_transform


def regions_for_boxes(model, batched_inputs: List[dict], boxes: List) -> List[Instances]:
    """
    Describe given boxes with a model whose ROI heads are Feature heads.

    Args:
        model: a detectron2 ``GeneralizedRCNN`` with Feature ROI heads, in eval mode.
        batched_inputs: model inputs as for ``model(batched_inputs)``: "image" (C, H, W) after
            the test-time resize, and the original "height" and "width".
        boxes: per image, (Ni, 4) x1y1x2y2 boxes in *original* image pixels (array, tensor
            or :class:`Boxes`); Ni may be 0.

    Returns:
        list[Instances]: per image, in original image size, row i for box i (boxes left
        as given, only clipped to the image): ``pred_boxes``, ``box_features`` (Ni, D),
        ``class_probs`` (Ni, K+1), ``pred_classes`` and ``scores`` (most probable foreground
        class), ``proposal_index`` (= i), and the masks/keypoints the model predicts.
    """
    if len(boxes) != len(batched_inputs):
        raise ValueError(f"got boxes for {len(boxes)} images but {len(batched_inputs)} images")
    given = []
    for inputs, image_boxes in zip(batched_inputs, boxes):
        image_boxes = image_boxes.tensor if isinstance(image_boxes, Boxes) else image_boxes
        image_boxes = torch.as_tensor(np.asarray(image_boxes), dtype=torch.float32).reshape(-1, 4)
        height, width = inputs["image"].shape[-2:]
        out_h, out_w = inputs.get("height", height), inputs.get("width", width)
        # Inverse of the scaling that detector_postprocess applies to the outputs.
        scale = torch.tensor([width / out_w, height / out_h] * 2)
        instances = Instances((height, width))
        instances.pred_boxes = Boxes(image_boxes * scale)
        instances.pred_boxes.clip((height, width))
        given.append(instances)
    with torch.no_grad():
        outputs = model.inference(batched_inputs, detected_instances=given)
    return [out["instances"] for out in outputs]


class RegionPredictor(DefaultPredictor):
    """
    :class:`DefaultPredictor` that also takes boxes: ``predictor(image)`` is detectron2's,
    ``predictor(image, boxes)`` describes the given (N, 4) boxes (original image pixels)
    as :func:`regions_for_boxes` does, without running the RPN. Both resize as the config says
    (:func:`d2_regionfeat.data.build_test_transform`: VinVL's truncating resize where
    ``INPUT.RESIZE_LONG_SIDE`` is "truncate").
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.aug = build_test_transform(cfg)

    @classmethod
    def of_model(cls, model, input_format: str, aug) -> "RegionPredictor":
        """
        The predictor of a model already built (a LazyConfig's; eval mode, weights loaded),
        its images in ``input_format`` ("BGR" or "RGB"), resized by the augmentation ``aug``.
        """
        predictor = cls.__new__(cls)
        predictor.model, predictor.input_format, predictor.aug = model, input_format, aug
        return predictor

    def __call__(self, original_image: np.ndarray, boxes: Optional[np.ndarray] = None):
        """
        Args:
            original_image: (H, W, C) image in ``cfg.INPUT.FORMAT``.
            boxes: optional (N, 4) x1y1x2y2 boxes in ``original_image`` pixels.

        Returns:
            dict: {"instances": Instances} as :class:`DefaultPredictor` returns (without
            boxes: the model's whole output dict, as DefaultPredictor's; its call is not used,
            since upstream detectron2's reads ``self.cfg``, which :meth:`of_model` has not).
        """
        inputs = self.model_inputs(original_image)
        if boxes is None:
            with torch.no_grad():
                return self.model([inputs])[0]
        return {"instances": regions_for_boxes(self.model, [inputs], [boxes])[0]}

    def model_inputs(self, original_image: np.ndarray) -> dict:
        """The model input dict :class:`DefaultPredictor` makes of ``original_image``."""
        if self.input_format == "RGB":
            original_image = original_image[:, :, ::-1]
        height, width = original_image.shape[:2]
        image = self.aug.get_transform(original_image).apply_image(original_image)
        image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        return {"image": image, "height": height, "width": width}
