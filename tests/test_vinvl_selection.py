"""SELECTION "vinvl": select_vinvl against a numpy restatement of filter_results_peter."""
import numpy as np
import pytest
import torch

import vinvl_reference as ref
from d2_regionfeat.modeling.selection import select_vinvl
from detectron2.structures import Boxes


def random_case(seed, num_rows, num_classes, logit_scale, box_size, height=120, width=170):
    """Random proposals, class-regressed boxes and probabilities (background last)."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.rand(num_rows, generator=g) * (width - 10) - 5
    y1 = torch.rand(num_rows, generator=g) * (height - 10) - 5
    wh = torch.rand(num_rows, 2, generator=g) * box_size + 1
    proposals = torch.stack([x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]], dim=1)
    boxes = proposals.repeat(1, num_classes) + torch.randn(num_rows, num_classes * 4, generator=g) * 4
    probs = (torch.randn(num_rows, num_classes + 1, generator=g) * logit_scale).softmax(dim=1)
    return boxes, probs, Boxes(proposals), (height, width)


def reference(boxes, probs, proposals, image_shape, box_mode, iou_kind, **bounds):
    """filter_results_peter on the same inputs, in its layout (background first)."""
    height, width = image_shape
    num_rows, num_fg = probs.shape[0], probs.shape[1] - 1
    source = proposals.tensor.repeat(1, num_fg + 1) if box_mode == "proposal" else torch.cat(
        [proposals.tensor, boxes], dim=1)  # background's box: any, it never wins
    per_class = source.reshape(num_rows, num_fg + 1, 4).numpy().copy()
    per_class[..., 0::2] = per_class[..., 0::2].clip(0, width - 1)
    per_class[..., 1::2] = per_class[..., 1::2].clip(0, height - 1)
    scores = torch.cat([probs[:, -1:], probs[:, :-1]], dim=1).numpy()
    return ref.filter_results_peter(per_class, scores, iou_kind=iou_kind, **bounds)


CASES = {
    # (seed, rows, classes, logit scale, box size): which branch of the bounds decides
    "below_min": (1, 60, 40, 0.3, 60),  # every score far below 0.2: the 10 highest
    "within": (2, 80, 4, 2.0, 40),
    "above_max": (3, 300, 2, 4.0, 12),  # small spread boxes, confident: the first 100
    "few_rows": (4, 6, 3, 1.0, 80),  # fewer than 10 candidates
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("box_mode", ["proposal", "regressed"])
@pytest.mark.parametrize("iou_kind", ["torchvision", "legacy_ge", "legacy_gt"])
def test_rows_and_order_equal_filter_results_peter(case, box_mode, iou_kind):
    boxes, probs, proposals, shape = random_case(*CASES[case])
    result, kept = select_vinvl(boxes, probs, proposals, shape, 0.2, 10, 100, 0.3, iou_kind, box_mode)
    rows, labels, scores, out_boxes = reference(boxes, probs, proposals, shape, box_mode, iou_kind)
    assert kept.tolist() == rows.tolist()
    assert (result.pred_classes + 1).tolist() == labels.tolist()
    np.testing.assert_array_equal(result.scores.numpy(), scores)
    np.testing.assert_array_equal(result.pred_boxes.tensor.numpy(), out_boxes)
    # the case takes the branch its name says
    unbounded = select_vinvl(boxes, probs, proposals, shape, 0.2, 0, 10 ** 6, 0.3, iou_kind, box_mode)[0]
    confident = int((unbounded.scores >= 0.2).sum())
    if case == "below_min":
        assert confident < 10 and len(kept) == 10
    elif case == "above_max":
        assert confident > 100 and len(kept) == 100
    elif case == "within":
        assert 10 <= confident == len(kept) <= 100
    else:
        assert len(kept) == len(unbounded) < 10


def test_row_surviving_no_class_is_never_selected():
    # row 1 is row 0's box with a lower probability of every class: suppressed everywhere,
    # so not even the minimum of 10 takes it
    proposals = torch.tensor([[10, 10, 50, 50], [10, 10, 50, 50], [60, 60, 90, 90]], dtype=torch.float32)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.2, 0.4], [0.1, 0.1, 0.8]])
    boxes = proposals.repeat(1, 2)
    result, kept = select_vinvl(boxes, probs, Boxes(proposals), (100, 100), 0.2, 10, 100, 0.3)
    assert kept.tolist() == [0, 2]
    assert result.pred_classes.tolist() == [0, 0]
    torch.testing.assert_close(result.scores, torch.tensor([0.5, 0.1]))
    rows, *_ = reference(boxes, probs, Boxes(proposals), (100, 100), "proposal", "torchvision")
    assert rows.tolist() == [0, 2]


def test_iou_variant_decides_at_the_threshold():
    # boxes (0, 0, 9, 9) and (0, 0, 9, 4): IoU 36/81 = 0.444 without +1, exactly 50/100 with it
    proposals = torch.tensor([[0, 0, 9, 9], [0, 0, 9, 4]], dtype=torch.float32)
    probs = torch.tensor([[0.6, 0.4], [0.5, 0.5]])

    def kept(thresh, iou):
        return select_vinvl(proposals, probs, Boxes(proposals), (50, 50), 0.2, 0, 100, thresh, iou)[1].tolist()

    assert kept(0.45, "torchvision") == [0, 1] and kept(0.44, "torchvision") == [0]
    assert kept(0.5, "legacy_gt") == [0, 1] and kept(0.5, "legacy_ge") == [0]
    assert kept(0.49, "legacy_gt") == [0]
