"""Attributes of the synthetic shapes, and the shipped default model's attribute head."""
import numpy as np
import pytest

import d2_regionfeat  # noqa: F401  (registers the heads and backbone, adds the config node)
from d2_regionfeat.data.synthetic import (
    ATTRIBUTE_GROUPS,
    ATTRIBUTES,
    LARGE_RADIUS,
    SMALL_RADIUS,
    color_name,
    image_seed,
    load_synthetic_shapes,
    register_synthetic_shapes,
    render_image,
)
from detectron2.data import DatasetCatalog, MetadataCatalog

COLOURS = ATTRIBUTE_GROUPS["colour"]


def names_of(annotation):
    return [ATTRIBUTES[i] for i in annotation["attribute_ids"]]


# ---------------------------------------------------------------- the synthetic attributes


@pytest.mark.parametrize(
    "rgb, name",
    [
        ((255, 0, 0), "red"), ((255, 128, 0), "orange"), ((255, 255, 0), "yellow"),
        ((0, 200, 0), "green"), ((0, 255, 255), "cyan"), ((0, 0, 255), "blue"),
        ((128, 0, 255), "purple"), ((255, 0, 200), "pink"), ((20, 20, 20), "black"),
        ((0, 0, 60), "black"), ((128, 128, 128), None), ((139, 69, 19), None),  # grey, brown
    ],
)
def test_colour_names(rgb, name):
    assert color_name(rgb) == name


@pytest.mark.parametrize("index", range(10))
def test_attribute_ids_match_what_is_drawn(index):
    image, anns = render_image(image_seed(0, "val", index))
    for ann in anns:
        names = names_of(ann)
        assert len(names) == len(set(names)) <= 2
        colours = [n for n in names if n in COLOURS]
        # The colour name of the object's pixels in the image (median: shading, antialiasing).
        assert colours == [n for n in [color_name(np.median(image[ann["mask"]], axis=0))] if n]
        x0, y0, x1, y1 = ann["bbox"]
        side = max(x1 - x0, y1 - y0)
        if "small" in names:
            assert side <= 2 * SMALL_RADIUS + 1
        if "large" in names:
            # at least the height of an equilateral triangle of that circumradius
            assert side >= 1.5 * LARGE_RADIUS
        assert ("small" in names) == (ann["radius"] < SMALL_RADIUS)
        assert ("large" in names) == (ann["radius"] >= LARGE_RADIUS)


def test_every_attribute_occurs_and_most_objects_have_one():
    counts = np.zeros(len(ATTRIBUTES), dtype=int)
    objects = with_attributes = 0
    for index in range(60):
        for ann in render_image(image_seed(0, "train", index))[1]:
            objects += 1
            with_attributes += bool(ann["attribute_ids"])
            np.add.at(counts, ann["attribute_ids"], 1)
    assert (counts > 0).all(), dict(zip(ATTRIBUTES, counts))
    assert with_attributes >= 0.7 * objects


def test_records_and_metadata_carry_attributes(tmp_path):
    records = load_synthetic_shapes(str(tmp_path), "val", num_images=2, seed=0)
    for index, record in enumerate(records):
        anns = render_image(image_seed(0, "val", index))[1]
        assert [o["attribute_ids"] for o in record["annotations"]] == [
            a["attribute_ids"] for a in anns
        ]
    names = register_synthetic_shapes(str(tmp_path), prefix="test_attr_shapes")
    try:
        metadata = MetadataCatalog.get("test_attr_shapes_val")
        assert metadata.attribute_classes == list(ATTRIBUTES)
        assert metadata.attribute_groups == {g: list(n) for g, n in ATTRIBUTE_GROUPS.items()}
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
