"""
Conversions of other codebases' checkpoints onto our modules, one module a codebase, each
registered in :data:`d2_regionfeat.modeling.checkpoint.CHECKPOINT_CONVERSION_REGISTRY` on
import.
"""
