"""
facebookresearch/grid-feats-vqa's checkpoints (``configs/grid/``), and
MILVLG/bottom-up-attention.pytorch's detectron2-mode ones (``bua-d2-frcn-*.pth``,
``configs/BUTA/d2-*.yaml``, whose ``AttributeRes5ROIHeads`` is grid-feats-vqa's head on
``Res5ROIHeads``): detectron2 models whose only module of their own is ``AttributePredictor``
at ``roi_heads.attribute_predictor``:

    obj_embed   Embedding(K + 1, E)      -> box_predictor.cls_embedding
    fc.0        Linear(D + E, H), ReLU   -> box_predictor.fc_attr
    attr_score  Linear(H, A)             -> box_predictor.attr_score, Linear(H, A + 1)

Its A attribute scores are all real attributes (its loss ignores -1 and has no "no
attribute" class); ours end with a "no attribute" row, which the conversion appends with
zero weights and a bias of -inf, so our softmax over A + 1 equals its softmax over A, with
``attr_probs[:, A]`` 0.
"""
import torch

from ..checkpoint import CHECKPOINT_CONVERSION_REGISTRY

RENAMES = {
    "attribute_predictor.obj_embed.": "box_predictor.cls_embedding.",
    "attribute_predictor.fc.0.": "box_predictor.fc_attr.",
    "attribute_predictor.attr_score.": "box_predictor.attr_score.",
}


@CHECKPOINT_CONVERSION_REGISTRY.register()
def grid_feats_attribute_predictor(module, state_dict, prefix):
    """
    Rename grid-feats-vqa's attribute head under ``prefix`` (the ROI heads) onto our box
    predictor's, adding the "no attribute" row. Nothing for other checkpoints.

    Raises:
        ValueError: its A differs from our ``NUM_ATTRIBUTES`` (one line).
    """
    if prefix + "attribute_predictor.obj_embed.weight" not in state_dict:
        return
    attr_score = getattr(getattr(module, "box_predictor", None), "attr_score", None)
    if attr_score is None:
        return  # no attribute head to receive it: the keys stay unexpected
    for key in [k for k in state_dict if k.startswith(prefix + "attribute_predictor.")]:
        rest = key[len(prefix):]
        for old, new in RENAMES.items():
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
    weight = state_dict[prefix + "box_predictor.attr_score.weight"]
    bias = state_dict[prefix + "box_predictor.attr_score.bias"]
    if weight.shape[0] + 1 != attr_score.out_features:
        raise ValueError(
            f"the grid-feats-vqa-style checkpoint scores {weight.shape[0]} attributes; "
            f"MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES is {attr_score.out_features - 1}"
        )
    no_attribute_weight = weight.new_zeros(1, weight.shape[1])
    no_attribute_bias = bias.new_full((1,), float("-inf"))
    state_dict[prefix + "box_predictor.attr_score.weight"] = torch.cat([weight, no_attribute_weight])
    state_dict[prefix + "box_predictor.attr_score.bias"] = torch.cat([bias, no_attribute_bias])
