"""
The py-faster-rcnn pixel conventions (a box ``x1..x2`` covers ``x2 - x1 + 1`` pixels) that
the legacy detectors share: maskrcnn-benchmark's (VinVL, :mod:`.vinvl`) and the caffe ports
of MILVLG/bottom-up-attention.pytorch (BUTA.pt, :mod:`.buta`).
"""
import torch

from detectron2.modeling.box_regression import _DEFAULT_SCALE_CLAMP, Box2BoxTransform
from detectron2.structures import Boxes, Instances

from .selection import vinvl_nms_mask


class LegacyBox2BoxTransform(Box2BoxTransform):
    """
    :class:`Box2BoxTransform` with the +1 convention: widths ``x2 - x1 + 1``, centre
    ``x1 + w / 2``, decoded corners ``cx -+ w / 2`` with ``x2_offset`` taken off the right and
    bottom ones: 1 for maskrcnn-benchmark's ``BoxCoder`` (VinVL), 0 for BUTA.pt's
    ``BUABox2BoxTransform``.
    """

    def __init__(self, weights, scale_clamp=_DEFAULT_SCALE_CLAMP, x2_offset=1.0):
        super().__init__(weights, scale_clamp)
        self.x2_offset = x2_offset

    def get_deltas(self, src_boxes, target_boxes):
        """(N, 4), (N, 4) -> (N, 4) deltas (dx, dy, dw, dh), widths ``x2 - x1 + 1``."""
        def centres(boxes):
            widths = boxes[:, 2] - boxes[:, 0] + 1
            heights = boxes[:, 3] - boxes[:, 1] + 1
            return boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights, widths, heights

        sx, sy, sw, sh = centres(src_boxes)
        tx, ty, tw, th = centres(target_boxes)
        wx, wy, ww, wh = self.weights
        return torch.stack([wx * (tx - sx) / sw, wy * (ty - sy) / sh,
                            ww * torch.log(tw / sw), wh * torch.log(th / sh)], dim=1)

    def apply_deltas(self, deltas, boxes):
        """(N, k*4) deltas on (N, 4) boxes -> (N, k*4), ``x2 = cx + w / 2 - x2_offset``."""
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        widths = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        heights = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        ctr_x = boxes[:, 0, None] + 0.5 * widths
        ctr_y = boxes[:, 1, None] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)
        cx, cy = dx * widths + ctr_x, dy * heights + ctr_y
        w, h = torch.exp(dw) * widths, torch.exp(dh) * heights
        end = self.x2_offset
        out = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - end, cy + 0.5 * h - end],
                          dim=2)
        return out.reshape(deltas.shape)


def clip_legacy(boxes, image_size):
    """(N, 4) boxes clamped to [0, W - 1] x [0, H - 1] (``BoxList.clip_to_image``,
    ``BUABoxes.clip``)."""
    height, width = image_size
    x = boxes[:, 0::2].clamp(min=0, max=width - 1)
    y = boxes[:, 1::2].clamp(min=0, max=height - 1)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def nms_proposals(boxes, scores, logits, image_size, nms_thresh, nms_iou, topk):
    """
    The legacy RPNs' last step on one image's filtered proposals, already in descending
    ``scores``: NMS at ``nms_thresh`` (``nms_iou`` as :func:`vinvl_nms_mask`), the first ``topk``
    survivors.

    Args:
        boxes (Tensor): (R, 4) proposals, descending score.
        scores (Tensor): (R,) what the NMS ranks by.
        logits (Tensor): (R,) what the result reports as ``objectness_logits``.
        image_size (tuple): (H, W).

    Returns:
        Instances: ``proposal_boxes`` and ``objectness_logits`` of the kept rows, in order.
    """
    survived = vinvl_nms_mask(boxes[:, None], scores[:, None], nms_thresh, nms_iou)[:, 0]
    keep = survived.nonzero()[:, 0][:topk]
    result = Instances(image_size)
    result.proposal_boxes = Boxes(boxes[keep])
    result.objectness_logits = logits[keep]
    return result


def check_cell_anchors(anchor_generator, saved, fix):
    """
    Compare a checkpoint's saved cell anchors (``cell_anchors.0``, a persistent buffer in
    older detectron2 and in maskrcnn-benchmark) with ``anchor_generator``'s.

    Returns:
        None if equal, else a one-line message ending with ``fix`` (what config to use).
    """
    ours = next(iter(anchor_generator.cell_anchors.buffers()))
    if saved.shape != ours.shape or not torch.equal(saved.float().cpu(), ours.cpu()):
        return f"its cell_anchors.0 {tuple(saved.shape)} differ from the model's: {fix}"
    return None
