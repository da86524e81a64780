"""
Loading other codebases' checkpoints through ``MODEL.WEIGHTS``: the one conversion hook.

Every module that may receive a foreign checkpoint calls :func:`register_checkpoint_conversion`
on itself when it is built (the Feature ROI heads, the caffe backbone). Its load-state-dict
pre-hook then runs every conversion registered in :data:`CHECKPOINT_CONVERSION_REGISTRY`,
in registration order, over the keys under the module's prefix, before the module loads them.

A conversion is a callable ``(module, state_dict, prefix)`` that rewrites ``state_dict`` in
place (renaming, reordering rows, dropping what the module has no use for) and does nothing
to a checkpoint that is not of its kind. The first one registered is for the PyTorch ports of
bottom-up-attention's weights (the Hugging Face LXMERT demo's ``pytorch_model.bin`` of
``modeling_frcnn.py``, airsplay/py-bottom-up-attention's ``.pkl``): their keys are
detectron2's module names, so they map onto our modules by identity; what differs is what
they hold beyond parameters: plain BatchNorm's ``num_batches_tracked`` counters (our frozen
batch norms have none) and the anchor generator's cell anchors (non-persistent buffers here;
detectron2's ``DetectionCheckpointer`` already ignores them).
"""
from detectron2.utils.registry import Registry

CHECKPOINT_CONVERSION_REGISTRY = Registry("CHECKPOINT_CONVERSION")
CHECKPOINT_CONVERSION_REGISTRY.__doc__ = """
Conversions of foreign checkpoints, each a callable ``(module, state_dict, prefix)`` that
rewrites, in place, the keys under ``prefix`` of a checkpoint of its kind (see
:mod:`d2_regionfeat.modeling.checkpoint`).
"""


@CHECKPOINT_CONVERSION_REGISTRY.register()
def drop_parameterless_keys(module, state_dict, prefix):
    """Drop ``num_batches_tracked`` entries under ``prefix`` that ``module`` has no buffer for."""
    own = {prefix + name for name in module.state_dict().keys()}
    for key in list(state_dict):
        if key.startswith(prefix) and key.endswith("num_batches_tracked") and key not in own:
            del state_dict[key]


def _convert(module, state_dict, prefix, *args):
    for _, conversion in CHECKPOINT_CONVERSION_REGISTRY:
        conversion(module, state_dict, prefix)


def register_checkpoint_conversion(module):
    """
    Make ``module.load_state_dict`` (and so ``DetectionCheckpointer``) run every registered
    conversion over the keys under the module's prefix first.
    """
    module._register_load_state_dict_pre_hook(_convert, with_module=True)
