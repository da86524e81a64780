#!/usr/bin/env python
"""
Run a model (by default the shipped one) over images through the region-feature heads, as
detectron2's DefaultPredictor does, and write what it finds:

* ``<output>/<image name>.npz`` per image: ``x`` (N, D) float32 region features, ``bbox``
  (N, 4) x1y1x2y2 in original image pixels, ``num_bbox``, ``image_h``, ``image_w``,
  ``objects_id`` (N,) classes, ``objects_conf`` (N,) scores, ``cls_prob`` (N, K+1), and
  for a model with the attribute head ``attrs_id`` (N,) most probable attributes,
  ``attrs_conf`` (N,) their probabilities, ``attr_prob`` (N, A+1) ("no attribute" last),
  the keys of d2_regionfeat's per-image record;
* ``<output>/overview.png``: each image with its boxes, class names, attributes and scores
  ("large red star 0.97"), beside a 2-D PCA projection of all regions' features coloured by
  class.

    python tools/demo.py                       # demo/images -> demo_out
    python tools/demo.py --images my_pics --output out MODEL.REGION_FEATURES.SOURCE pooled
    python tools/demo.py --config-file my_lazy_config.py train.init_checkpoint=model.pth

``--config-file`` takes a yacs YAML (``KEY VALUE`` overrides) or a LazyConfig ``.py``
(``key=value`` overrides), as tools/extract_net.py does; the labels use the shapes' names
when the model has none.
"""
import argparse
import glob
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from d2_regionfeat.data.synthetic import (  # noqa: E402
    ATTRIBUTE_GROUPS,
    ATTRIBUTES,
    CLASS_COLORS,
    CLASSES,
)
from d2_regionfeat.default_model import CONFIG_FILE, get_default_model_cfg  # noqa: E402
from d2_regionfeat.extraction.model_config import add_config_arguments, model_config_from_args  # noqa: E402

from detectron2.data.detection_utils import read_image  # noqa: E402

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The attribute groups in the order their names go before the class name ("large red star").
LABEL_GROUPS = ("size", "colour")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Region features of a model (by default the shipped one)")
    parser.add_argument("--images", default=os.path.join(REPO_ROOT, "demo", "images"),
                        help="a folder of images, or image files")
    parser.add_argument("--output", default="demo_out", help="folder for the .npz files and overview.png")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score of the detections kept")
    parser.add_argument("--attribute-threshold", type=float, default=0.2,
                        help="minimum probability of the attributes shown (the best of each group)")
    args = add_config_arguments(parser, config_file=CONFIG_FILE).parse_args(argv)
    if args.config_file == CONFIG_FILE and not args.weights:
        args.weights = get_default_model_cfg().MODEL.WEIGHTS  # the shipped weights (or why they are missing)
    return args


def image_files(path):
    """The image files of ``path`` (a folder or a file), sorted; errors if there are none."""
    files = [path] if os.path.isfile(path) else sorted(
        f for f in glob.glob(os.path.join(path, "*")) if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found at {path}")
    return files


def regions_of(predictor, path):
    """The image (H, W, 3) RGB and its regions, as the arrays written to the .npz file."""
    image = read_image(path, format="BGR")
    instances = predictor(image)["instances"].to("cpu")
    boxes = instances.pred_boxes.tensor.numpy().astype(np.float32)
    regions = {
        "x": instances.box_features.numpy().astype(np.float32),
        "bbox": boxes,
        "num_bbox": np.int64(len(instances)),
        "image_h": np.int64(image.shape[0]),
        "image_w": np.int64(image.shape[1]),
        "objects_id": instances.pred_classes.numpy().astype(np.int64),
        "objects_conf": instances.scores.numpy().astype(np.float32),
        "cls_prob": instances.class_probs.numpy().astype(np.float32),
    }
    if instances.has("attr_probs"):
        regions["attrs_id"] = instances.attrs_id.numpy().astype(np.int64)
        regions["attrs_conf"] = instances.attrs_conf.numpy().astype(np.float32)
        regions["attr_prob"] = instances.attr_probs.numpy().astype(np.float32)
    return image[:, :, ::-1], regions


def attribute_words(attr_prob, threshold):
    """
    The attribute names of one region for its label: of each group of ``LABEL_GROUPS``, the
    most probable attribute if its probability (``attr_prob`` (A+1,)) is at least ``threshold``.
    """
    words = []
    for group in LABEL_GROUPS:
        ids = [ATTRIBUTES.index(name) for name in ATTRIBUTE_GROUPS[group]]
        best = ids[int(np.argmax(attr_prob[ids]))]
        if attr_prob[best] >= threshold:
            words.append(ATTRIBUTES[best])
    return words


def is_shipped(config):
    """Whether ``config`` is the shipped model's (whose names are the shapes dataset's)."""
    return bool(config.path) and os.path.abspath(config.path) == os.path.abspath(CONFIG_FILE)


def class_names(config, num_classes):
    """
    The ``num_classes`` class names of the model: its names files or catalog's, the shapes'
    for the shipped model, else ``class_<i>``.
    """
    names = config.vocabularies().class_names or (list(CLASSES) if is_shipped(config) else None)
    return names or [f"class_{i}" for i in range(num_classes)]


def region_label(regions, i, names, attribute_threshold):
    """
    The label of region ``i``: its attributes (the shapes' attribute head only), class name
    and score ("large red star 0.97").
    """
    shapes_attributes = "attr_prob" in regions and regions["attr_prob"].shape[1] == len(ATTRIBUTES) + 1
    words = attribute_words(regions["attr_prob"][i], attribute_threshold) if shapes_attributes else []
    return " ".join([*words, names[regions["objects_id"][i]], f"{regions['objects_conf'][i]:.2f}"])


def pca_2d(features):
    """(N, D) -> (N, 2): projection on the two main principal axes."""
    centered = features - features.mean(axis=0, keepdims=True)
    _, _, axes = np.linalg.svd(centered, full_matrices=False)
    return centered @ axes[:2].T


def class_color(class_id):
    """The shapes' colour of a class; beyond them, matplotlib's tab20 in turn."""
    if class_id < len(CLASS_COLORS):
        return np.array(CLASS_COLORS[class_id]) / 255.0
    return np.array(plt.get_cmap("tab20")(int(class_id) % 20)[:3])


def draw_overview(images, regions, names, output_file, attribute_threshold, classes):
    """
    Images (named ``names``) with their boxes, labelled with the ``classes`` names, in a grid,
    and the PCA of all region features beside them; the boxes' labels name the attributes of at least ``attribute_threshold`` when there are any.
    """
    columns = min(3, len(images))
    rows = -(-len(images) // columns)
    fig = plt.figure(figsize=(4 * columns + 6, 4 * rows))
    grid = fig.add_gridspec(rows, columns + 2)
    for i, (image, r, name) in enumerate(zip(images, regions, names)):
        ax = fig.add_subplot(grid[i // columns, i % columns])
        ax.imshow(image)
        for i, ((x1, y1, x2, y2), c) in enumerate(zip(r["bbox"], r["objects_id"])):
            color = class_color(c)
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color, lw=2))
            ax.text(x1, y1, region_label(r, i, classes, attribute_threshold), fontsize=7, color="white",
                    va="bottom",
                    bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "lw": 0})
        ax.set_title(f"{name}: {int(r['num_bbox'])} regions", fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[:, columns:])
    features = np.concatenate([r["x"] for r in regions])
    class_ids = np.concatenate([r["objects_id"] for r in regions])
    if len(features) >= 2:
        points = pca_2d(features)
        for c in np.unique(class_ids):  # the classes found
            chosen, name = class_ids == c, classes[c]
            ax.scatter(points[chosen, 0], points[chosen, 1], s=30, color=class_color(c),
                       label=f"{name} ({chosen.sum()})", edgecolors="k", linewidths=0.3)
        ax.legend(fontsize=8)
    ax.set_title(f"PCA of the {len(features)} regions' {features.shape[1]}-d features", fontsize=10)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.tight_layout()
    fig.savefig(output_file, dpi=80)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    # cls_prob is part of the output
    config = model_config_from_args(args, score_thresh=args.confidence_threshold, class_probs=True)
    predictor = config.predictor()
    os.makedirs(args.output, exist_ok=True)
    images, regions, names = [], [], []
    for path in image_files(args.images):
        image, r = regions_of(predictor, path)
        name = os.path.splitext(os.path.basename(path))[0]
        np.savez(os.path.join(args.output, name + ".npz"), **r)
        print(f"{path}: {int(r['num_bbox'])} regions, features {r['x'].shape}")
        images.append(image)
        regions.append(r)
        names.append(name)
    overview = os.path.join(args.output, "overview.png")
    classes = class_names(config, regions[0]["cls_prob"].shape[1] - 1)
    draw_overview(images, regions, names, overview, args.attribute_threshold, classes)
    print(f"\nWrote {len(names)} feature files (.npz) to {os.path.abspath(args.output)}/")
    print(f"Wrote the overview (detections and PCA of the features) to {os.path.abspath(overview)}")


if __name__ == "__main__":
    main()
