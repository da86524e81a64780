"""Conversions of other codebases' checkpoints, one module each, registered on import in
:data:`d2_regionfeat.modeling.checkpoint.CHECKPOINT_CONVERSION_REGISTRY`."""
