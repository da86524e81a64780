"""
The input side of d2_regionfeat: the test transform every path uses, and the synthetic
shapes the shipped default model is trained on.
"""
from .synthetic import (
    ATTRIBUTES,
    CLASSES,
    load_synthetic_shapes,
    register_synthetic_shapes,
    render_image,
)
from .transforms import VinVLResize, build_test_transform

__all__ = [
    "VinVLResize",
    "build_test_transform",
    "ATTRIBUTES",
    "CLASSES",
    "load_synthetic_shapes",
    "register_synthetic_shapes",
    "render_image",
]
