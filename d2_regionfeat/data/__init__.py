"""Datasets of d2_regionfeat: the synthetic shapes the shipped default model is trained on."""
from .synthetic import (
    ATTRIBUTES,
    CLASSES,
    load_synthetic_shapes,
    register_synthetic_shapes,
    render_image,
)

__all__ = [
    "ATTRIBUTES",
    "CLASSES",
    "load_synthetic_shapes",
    "register_synthetic_shapes",
    "render_image",
]
