"""
MILVLG/bottom-up-attention.pytorch's caffe-mode checkpoints (``bua-caffe-frcn-r101-k10-100.pth``,
``bua-caffe-frcn-r101-k36.pth``, ``bua-caffe-frcn-r152.pth``), saved by its detectron2 v0.2.1
as ``{"model": state_dict}`` or a plain state dict, loaded through ``MODEL.WEIGHTS`` into
``configs/BUTA/`` (``META_ARCHITECTURE: "BUTARCNN"``, which installs the conversion hook on
the whole model). Recognised by ``roi_heads.box_predictor.cls_embed.weight``, or by the
saved ``proposal_generator.anchor_generator.cell_anchors.0`` beside a ``bbox_pred`` that
regresses the background too.

Its keys are detectron2 module names; what differs:

* ``roi_heads.box_predictor.cls_score``: background is row 0 -> rows [1, ..., K, 0]
  (background last); ``bbox_pred`` stays as it is (:class:`BUTAOutputLayers` holds its
  (K + 1) * 4 rows);
* ``cls_embed`` (rows [1, ..., K, 0]), ``attr_linear1``, ``attr_linear2`` ("no attribute"
  row 0 -> last) -> ``cls_embedding``, ``fc_attr``, ``attr_score``;
* R152: ``roi_heads.res5_bn`` -> ``roi_heads.res5.norm`` (:class:`PreActRes5`);
* ``proposal_generator.anchor_generator.cell_anchors.0`` checked against the model's, then
  dropped; BatchNorm's ``num_batches_tracked`` dropped (frozen here).

Every model key must come out of the file with the model's shape and every key of the file
must be used, else a one-line ValueError naming the keys (detectron2 would only warn).
"""
import torch

from ..buta import BUTARCNN
from ..checkpoint import CHECKPOINT_CONVERSION_REGISTRY
from ..legacy import check_cell_anchors

_PREDICTOR = "roi_heads.box_predictor."
_ANCHORS = "proposal_generator.anchor_generator.cell_anchors.0"
# BUTA.pt name -> (ours, whether row 0 moves last)
_RENAMES = {
    _PREDICTOR + "cls_score.weight": (_PREDICTOR + "cls_score.weight", True),
    _PREDICTOR + "cls_score.bias": (_PREDICTOR + "cls_score.bias", True),
    _PREDICTOR + "cls_embed.weight": (_PREDICTOR + "cls_embedding.weight", True),
    _PREDICTOR + "attr_linear1.weight": (_PREDICTOR + "fc_attr.weight", False),
    _PREDICTOR + "attr_linear1.bias": (_PREDICTOR + "fc_attr.bias", False),
    _PREDICTOR + "attr_linear2.weight": (_PREDICTOR + "attr_score.weight", True),
    _PREDICTOR + "attr_linear2.bias": (_PREDICTOR + "attr_score.bias", True),
}
_RES5_BN = ("roi_heads.res5_bn.", "roi_heads.res5.norm.")


def is_buta_checkpoint(state_dict, prefix=""):
    """Whether the keys under ``prefix`` are BUTA.pt's caffe-mode model's (full names)."""
    full = {k for k in state_dict if k.startswith(prefix)}
    if any(k.endswith("box_predictor.cls_embed.weight") for k in full):
        return True
    bbox, cls = state_dict.get(_PREDICTOR + "bbox_pred.weight"), state_dict.get(_PREDICTOR + "cls_score.weight")
    return (_ANCHORS in full and bbox is not None and cls is not None
            and bbox.shape[0] == 4 * cls.shape[0])


def _fail(message):
    raise ValueError(f"BUTA.pt checkpoint: {message}")


def _named(keys):
    shown = ", ".join(keys[:4])
    return f"{len(keys)} key(s): {shown}" + (", ..." if len(keys) > 4 else "")


@CHECKPOINT_CONVERSION_REGISTRY.register()
def convert_buta(module, state_dict, prefix):
    """Rewrite a BUTA.pt checkpoint in place into ``module``'s names (a no-op for others)."""
    if not is_buta_checkpoint(state_dict, prefix):
        return
    if prefix or not isinstance(module, BUTARCNN):
        _fail('load it into MODEL.META_ARCHITECTURE "BUTARCNN" (configs/BUTA/; the whole '
              "model converts it)")
    anchors = state_dict.pop(_ANCHORS, None)
    if anchors is not None:
        error = check_cell_anchors(module.proposal_generator.anchor_generator, anchors,
                                   "use MODEL.ANCHOR_GENERATOR.SIZES [[4, 8, 16, 32]] (configs/BUTA/)")
        if error:
            _fail(f"proposal_generator.anchor_generator: {error}")
    for old, (new, background_first) in _RENAMES.items():
        if old in state_dict:
            value = state_dict.pop(old)
            state_dict[new] = torch.cat([value[1:], value[:1]]) if background_first else value
    for key in [k for k in state_dict if k.startswith(_RES5_BN[0])]:
        state_dict[_RES5_BN[1] + key[len(_RES5_BN[0]):]] = state_dict.pop(key)

    expected = module.state_dict()
    unused = [k for k in state_dict if k not in expected]
    if unused:
        _fail(f"{_named(unused)} have no place in the model (check the config: configs/BUTA/)")
    missing = [k for k in expected if k not in state_dict]
    if missing:
        _fail(f"{_named(missing)} of the model are not in it (or were skipped for their shape)")
    wrong = [k for k in expected if tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if wrong:
        _fail(f"{_named(wrong)} have another shape than the model's, first "
              f"{tuple(state_dict[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)}")
