"""Per-image selection functions, on hand-made predictor outputs."""
import torch

from d2_regionfeat.modeling.selection import select_detections


def test_detections_map_indices_past_non_finite_proposals():
    # detectron2 drops non-finite proposals first and returns rows of what is left.
    boxes = torch.tensor(
        [[0, 0, 10, 10], [float("inf"), 0, 5, 5], [20, 20, 40, 40], [50, 50, 70, 90]],
        dtype=torch.float32,
    )
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.7, 0.3]])
    result, kept = select_detections(boxes, probs, (100, 100), 0.5, 0.5, 100)
    assert sorted(kept.tolist()) == [0, 3]
    for row, box in zip(kept, result.pred_boxes.tensor):
        assert torch.equal(box, boxes[row])
    torch.testing.assert_close(result.scores, probs[kept, 0])
