"""
scene_graph_benchmark's ``vinvl_vg_x152c4.pth`` (maskrcnn-benchmark key names, AttrRCNN) loaded
through ``MODEL.WEIGHTS`` into the VinVL config (``META_ARCHITECTURE: "VinVLRCNN"``, which
installs the conversion hook on the whole model).

Renames (maskrcnn-benchmark -> detectron2):

* ``backbone.body.stem.conv1`` / ``.bn1`` -> ``backbone.stem.conv1`` / ``.conv1.norm``;
* ``backbone.body.layer{s}.{b}.conv{i}`` / ``.bn{i}`` -> ``backbone.res{s+1}.{b}.conv{i}`` /
  ``.conv{i}.norm``; ``.downsample.0`` / ``.downsample.1`` -> ``.shortcut`` / ``.shortcut.norm``;
* ``roi_heads.box.feature_extractor.head.layer4.*`` -> ``roi_heads.res5.*`` (same inner names);
  ``attribute.feature_extractor.*`` (the same shared tensors, listed twice) dropped after
  checking they equal the box head's;
* ``rpn.head.{conv, cls_logits, bbox_pred}`` -> ``proposal_generator.rpn_head.{conv,
  objectness_logits, anchor_deltas}`` (rows as they are: VinVLAnchorGenerator has VinVL's
  ratio-major order); ``rpn.anchor_generator.cell_anchors.0`` checked against the model's
  cell anchors, then dropped;
* ``roi_heads.box.predictor.cls_score`` -> ``roi_heads.box_predictor.cls_score``, rows
  [1, ..., K, 0] (background last); ``.bbox_pred``: the 4 background rows dropped;
* ``attribute.predictor.cls_embedding`` (rows [1, ..., K, 0]), ``.fc_attr``, ``.attr_score``
  (rows [1, ..., A, 0], "no attribute" last) -> ``roi_heads.box_predictor.*``.

Every model key must come out of the checkpoint with the model's shape and every checkpoint
key must be used, else a one-line ValueError (detectron2 would only warn and keep random
weights).
"""
import re

import torch

from ..checkpoint import CHECKPOINT_CONVERSION_REGISTRY
from ..legacy import check_cell_anchors

_VINVL_PREFIXES = ("backbone.body.", "rpn.head.", "roi_heads.box.", "attribute.")
_RPN = {"conv": "conv", "cls_logits": "objectness_logits", "bbox_pred": "anchor_deltas"}


def _resnet_name(name):
    """maskrcnn-benchmark ResNet key (below ``backbone.body.`` / ``head.``) -> detectron2's."""
    match = re.match(r"^stem\.(conv1|bn1)\.(.*)$", name)
    if match:
        return "stem.conv1." + ("" if match.group(1) == "conv1" else "norm.") + match.group(2)
    match = re.match(r"^layer(\d)\.(\d+)\.(conv|bn|downsample\.)(\d)\.(.*)$", name)
    if not match:
        return None
    stage, block, kind, index, rest = match.groups()
    head = f"res{int(stage) + 1}.{block}."
    if kind == "conv":
        return f"{head}conv{index}.{rest}"
    if kind == "bn":
        return f"{head}conv{index}.norm.{rest}"
    return f"{head}shortcut.{rest}" if index == "0" else f"{head}shortcut.norm.{rest}"


def _background_last(tensor):
    """Rows [1, ..., N-1, 0] of a tensor whose row 0 is background / "no attribute"."""
    return torch.cat([tensor[1:], tensor[:1]])


def _convert_key(name, value):
    """(detectron2 name, tensor) for one maskrcnn-benchmark key, or None if it has none."""
    if name.startswith("backbone.body."):
        d2 = _resnet_name(name[len("backbone.body."):])
        return (f"backbone.{d2}", value) if d2 else None
    if name.startswith("roi_heads.box.feature_extractor.head."):
        d2 = _resnet_name(name[len("roi_heads.box.feature_extractor.head."):])
        return (f"roi_heads.{d2}", value) if d2 and d2.startswith("res5.") else None
    match = re.match(r"^rpn\.head\.(conv|cls_logits|bbox_pred)\.(weight|bias)$", name)
    if match:
        return f"proposal_generator.rpn_head.{_RPN[match.group(1)]}.{match.group(2)}", value
    match = re.match(r"^roi_heads\.box\.predictor\.(cls_score|bbox_pred)\.(weight|bias)$", name)
    if match:
        layer, kind = match.groups()
        value = _background_last(value) if layer == "cls_score" else value[4:]
        return f"roi_heads.box_predictor.{layer}.{kind}", value
    match = re.match(r"^attribute\.predictor\.(cls_embedding|fc_attr|attr_score)\.(weight|bias)$", name)
    if match:
        layer, kind = match.groups()
        value = value if layer == "fc_attr" else _background_last(value)
        return f"roi_heads.box_predictor.{layer}.{kind}", value
    return None


def _fail(message):
    raise ValueError(f"VinVL checkpoint (maskrcnn-benchmark names): {message}")


def _check_side_keys(module, state_dict):
    """Check, then drop, the keys that hold nothing to load: shared-extractor duplicates and
    the cell anchors."""
    for key in [k for k in state_dict if k.startswith("attribute.feature_extractor.")]:
        twin = "roi_heads.box." + key[len("attribute."):]
        if twin in state_dict and not torch.equal(state_dict[twin], state_dict[key]):
            _fail(f"{key} differs from {twin} (the attribute head must share the box head's res5)")
        del state_dict[key]
    anchors = state_dict.pop("rpn.anchor_generator.cell_anchors.0", None)
    if anchors is not None:
        error = check_cell_anchors(
            module.proposal_generator.anchor_generator, anchors,
            'use MODEL.ANCHOR_GENERATOR.NAME "VinVLAnchorGenerator" with VinVL\'s sizes and ratios',
        )
        if error:
            _fail(f"rpn.anchor_generator: {error}")


@CHECKPOINT_CONVERSION_REGISTRY.register()
def convert_vinvl(module, state_dict, prefix):
    """Rewrite a VinVL checkpoint in place into ``module``'s names (a no-op for other kinds)."""
    if not any(k.startswith(prefix + p) for k in state_dict for p in _VINVL_PREFIXES):
        return
    if prefix or not hasattr(module, "proposal_generator"):
        _fail('load it into MODEL.META_ARCHITECTURE "VinVLRCNN" (the whole model converts it)')
    _check_side_keys(module, state_dict)
    expected = module.state_dict()
    converted, unused = {}, []
    for name in [k for k in state_dict if k.startswith(_VINVL_PREFIXES)]:
        value = state_dict.pop(name)
        result = _convert_key(name, value)
        if result is None or result[0] not in expected:
            unused.append(name)
            continue
        d2_name, tensor = result
        if tuple(tensor.shape) != tuple(expected[d2_name].shape):
            _fail(f"{name} has shape {tuple(value.shape)}, the model's {d2_name} needs "
                  f"{tuple(expected[d2_name].shape)} (after moving the background rows)")
        converted[d2_name] = tensor
    if unused:
        _fail(f"{len(unused)} key(s) have no place in the model, first {unused[0]}")
    missing = [k for k in expected if k not in converted and k not in state_dict]
    if missing:
        _fail(f"{len(missing)} model key(s) are not in it, first {missing[0]}")
    state_dict.update(converted)
