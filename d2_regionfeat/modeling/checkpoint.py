"""
Loading the PyTorch ports of bottom-up-attention's weights through ``MODEL.WEIGHTS``.

The ports (the Hugging Face LXMERT demo's ``pytorch_model.bin`` of ``modeling_frcnn.py``,
airsplay/py-bottom-up-attention's ``.pkl``) use detectron2's module names, so their keys map
onto our modules by identity; what differs is what they hold beyond parameters: plain
BatchNorm's ``num_batches_tracked`` counters (our frozen batch norms have none) and the
anchor generator's cell anchors (non-persistent buffers here; detectron2's
``DetectionCheckpointer`` already ignores them). The hook below is the one place where a
checkpoint is adapted at load time: it drops those counters, silently.
"""


def _drop_parameterless_keys(module, state_dict, prefix, *args):
    own = {prefix + name for name in module.state_dict().keys()}
    for key in list(state_dict):
        if key.startswith(prefix) and key.endswith("num_batches_tracked") and key not in own:
            del state_dict[key]


def register_checkpoint_conversion(module):
    """
    Make ``module.load_state_dict`` (and so ``DetectionCheckpointer``) drop, under the
    module's prefix, ``num_batches_tracked`` entries that the module has no buffer for.
    """
    module._register_load_state_dict_pre_hook(_drop_parameterless_keys, with_module=True)
