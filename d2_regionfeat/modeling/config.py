"""The ``MODEL.REGION_FEATURES`` config node and its validation."""
from detectron2.config import CfgNode as CN

SOURCES = ("box_head", "pooled")
SELECTIONS = ("detections", "regions", "butd")
BOX_MODES = ("proposal", "regressed")
POOL_AT = ("proposal", "final")
# detectron2's ROI heads and the Feature head standing in for each.
FEATURE_HEADS = {
    "StandardROIHeads": "FeatureROIHeads",
    "Res5ROIHeads": "FeatureRes5ROIHeads",
    "CascadeROIHeads": "FeatureCascadeROIHeads",
}


def add_regionfeat_config(cfg):
    """
    Add d2_regionfeat's keys to ``cfg`` (in place; nodes already present are left alone):
    the ``MODEL.REGION_FEATURES`` node, ``MODEL.ATTRIBUTE_ON`` and the
    ``MODEL.ROI_ATTRIBUTE_HEAD`` node.

    Importing :mod:`d2_regionfeat` also adds them to detectron2's default config, so every
    ``get_cfg()`` made afterwards has them and YAML files can set their keys directly.
    """
    if "REGION_FEATURES" not in cfg.MODEL:
        _add_region_features_node(cfg)
    if "GRID" not in cfg.MODEL.REGION_FEATURES:
        _add_grid_node(cfg)
    if "ATTRIBUTE_ON" not in cfg.MODEL:
        _add_attribute_keys(cfg)


def _add_region_features_node(cfg):
    node = cfg.MODEL.REGION_FEATURES = CN()
    # Name in ROI_BOX_PREDICTOR_REGISTRY of the box predictor the Feature heads build.
    node.PREDICTOR = "FeatureFastRCNNOutputLayers"
    # "box_head": the box head's output (1024-d for FPN, the mean-pooled res5 output for C4).
    # "pooled": the ROI-pooled feature map, averaged over its spatial cells.
    node.SOURCE = "box_head"
    # "proposal": the feature of the proposal that produced the detection.
    # "final": pooled again at the final (regressed) box, through the box head once more.
    node.POOL_AT = "proposal"
    # Add ``class_probs`` (softmax over K+1) to each detection in "detections" mode.
    node.CLASS_PROBS = False
    # "detections": detectron2's own post-processing, unchanged.
    # "regions": bottom-up-attention style, at most one region per proposal.
    # "butd": the selection of bottom-up-attention's tools/generate_tsv.py, to the row (per-class
    # NMS over the proposal boxes with the legacy +1 IoU, proposal order within the bounds).
    node.SELECTION = "detections"
    # "regions" and "butd" modes: keep regions scoring >= CONF_THRESH, but at least MIN_BOXES
    # and at most MAX_BOXES of them (highest scores first).
    node.CONF_THRESH = 0.2
    node.MIN_BOXES = 10
    node.MAX_BOXES = 100
    # "regions" mode: "proposal" reports the box the region was pooled from (the proposal; for
    # Cascade R-CNN the last stage's input box), as bottom-up-attention does;
    # "regressed": the box regressed for the region's class.
    node.BOX = "proposal"
    # At least this many regions per image, in every mode: "detections" mode falls back, for an
    # image with fewer detections, to its top-MIN_REGIONS regions by score ("regions" mode
    # with CONF_THRESH above every score, boxes regressed); "regions" and "butd" modes raise
    # MIN_BOXES/MAX_BOXES to it. 0: off.
    node.MIN_REGIONS = 0
    # Optional vocabulary files (one name per line; the first comma-separated synonym is the
    # display name), e.g. bottom-up-attention's objects_vocab.txt / attributes_vocab.txt:
    # they become ``thing_classes`` / ``attribute_classes`` in the MetadataCatalog of every
    # dataset of DATASETS.TEST when the model is built. "" = leave the metadata alone.
    node.CLASS_NAMES_FILE = ""
    node.ATTRIBUTE_NAMES_FILE = ""


def _add_grid_node(cfg):
    node = cfg.MODEL.REGION_FEATURES.GRID = CN()
    # Give every output dict a "grid" entry from the same backbone run as the instances (see
    # d2_regionfeat.modeling.outputs.GridOutputs); needs META_ARCHITECTURE "RegionFeatureRCNN".
    node.ENABLED = False
    # The map: a backbone output ("res5", "p5", "res4", ...); on a C4 model, whose backbone
    # stops at res4, "res5" is the ROI head's res5 applied to the whole res4 map (as
    # grid-feats-vqa's AttributeRes5ROIHeads.get_conv5_features does).
    node.FEATURE = "res5"
    # [] : the cells as they are; [h, w] : adaptive average pooling of the image's cells to
    # h x w (e.g. [7, 7], [8, 8], [16, 16]).
    node.POOL = []
    # Grid only: no proposals and no ROI heads run, the output dicts hold "grid" alone.
    node.ONLY = False


def grid_node(cfg):
    """
    Return ``cfg.MODEL.REGION_FEATURES.GRID`` after checking its values, or None when it is
    off (or absent).

    Raises:
        ValueError: naming the key whose value is not allowed (one line).
    """
    node = cfg.MODEL.get("REGION_FEATURES", {}).get("GRID")
    if node is None or not node.ENABLED:
        return None
    pool = list(node.POOL)
    if pool and (len(pool) != 2 or min(pool) < 1):
        raise ValueError(
            f"MODEL.REGION_FEATURES.GRID.POOL must be [] or [h, w] with h, w >= 1; got {pool}"
        )
    if not isinstance(node.FEATURE, str) or not node.FEATURE:
        raise ValueError(f"MODEL.REGION_FEATURES.GRID.FEATURE must name a map; got {node.FEATURE!r}")
    from detectron2.modeling import META_ARCH_REGISTRY

    from .meta_arch import RegionFeatureRCNN  # it imports this module

    meta_arch = cfg.MODEL.META_ARCHITECTURE
    if not issubclass(META_ARCH_REGISTRY.get(meta_arch), RegionFeatureRCNN):
        raise ValueError(
            f'MODEL.REGION_FEATURES.GRID.ENABLED needs MODEL.META_ARCHITECTURE "RegionFeatureRCNN" '
            f"(or a subclass); got {meta_arch!r}"
        )
    return node


def _add_attribute_keys(cfg):
    # Add the attribute head to the Feature heads' box predictor (like MASK_ON for masks).
    cfg.MODEL.ATTRIBUTE_ON = False
    node = cfg.MODEL.ROI_ATTRIBUTE_HEAD = CN()
    # A: number of real attributes; the head scores A + 1 ("no attribute" last).
    node.NUM_ATTRIBUTES = 400
    # Size of the class embedding (an Embedding over the K + 1 classes) fed to the head.
    node.EMBED_DIM = 256
    # Width of the hidden layer fc_attr on [region feature, class embedding].
    node.HIDDEN_DIM = 512
    # Weight of loss_attr in the total loss.
    node.LOSS_WEIGHT = 1.0
    # Training: at most this many attributes per annotation (gt_attributes has this many
    # columns, padded with -1); an annotation with more is an error.
    node.MAX_ATTRIBUTES_PER_INSTANCE = 16


def _check_choice(node, key, choices):
    value = node[key]
    if value not in choices:
        raise ValueError(
            f"MODEL.REGION_FEATURES.{key} must be one of {', '.join(choices)}; got {value!r}"
        )


def region_features_node(cfg):
    """
    Return ``cfg.MODEL.REGION_FEATURES`` after checking every value in it.

    Raises:
        ValueError: naming the first key whose value is missing or not allowed.
    """
    if "REGION_FEATURES" not in cfg.MODEL:
        raise ValueError(
            "cfg.MODEL.REGION_FEATURES is missing: import d2_regionfeat before calling get_cfg(), "
            "or call d2_regionfeat.add_regionfeat_config(cfg)"
        )
    node = cfg.MODEL.REGION_FEATURES
    grid_node(cfg)
    _check_choice(node, "SOURCE", SOURCES)
    _check_choice(node, "SELECTION", SELECTIONS)
    _check_choice(node, "BOX", BOX_MODES)
    _check_choice(node, "POOL_AT", POOL_AT)
    if not 0.0 <= node.CONF_THRESH <= 1.0:
        raise ValueError(
            f"MODEL.REGION_FEATURES.CONF_THRESH must be within [0, 1]; got {node.CONF_THRESH}"
        )
    if node.MIN_BOXES < 0:
        raise ValueError(f"MODEL.REGION_FEATURES.MIN_BOXES must be >= 0; got {node.MIN_BOXES}")
    if node.MIN_REGIONS < 0:
        raise ValueError(f"MODEL.REGION_FEATURES.MIN_REGIONS must be >= 0; got {node.MIN_REGIONS}")
    if node.MAX_BOXES < node.MIN_BOXES:
        raise ValueError(
            f"MODEL.REGION_FEATURES.MAX_BOXES ({node.MAX_BOXES}) must be >= "
            f"MIN_BOXES ({node.MIN_BOXES})"
        )
    return node


# grid-feats-vqa's add_attribute_config spelling of the attribute head -> ours. It replaces
# the MODEL.ROI_ATTRIBUTE_HEAD node with its own (and adds INPUT.MAX_ATTR_PER_INS); its
# attr_score has no "no attribute" row, which its checkpoints gain on load
# (d2_regionfeat.modeling.ports.grid_feats).
GRID_FEATS_ATTRIBUTE_KEYS = {
    "NUM_CLASSES": "NUM_ATTRIBUTES",
    "OBJ_EMBED_DIM": "EMBED_DIM",
    "FC_DIM": "HIDDEN_DIM",
    "LOSS_WEIGHT": "LOSS_WEIGHT",
}


def _attribute_keys(cfg):
    """
    ``MODEL.ROI_ATTRIBUTE_HEAD`` in our spelling (a copy), whichever of ours and
    grid-feats-vqa's ``add_attribute_config`` made the node.

    Raises:
        ValueError: the node holds a key in both spellings with two values (one line).
    """
    node = cfg.MODEL.ROI_ATTRIBUTE_HEAD.clone()
    theirs = {k: v for k, v in GRID_FEATS_ATTRIBUTE_KEYS.items() if k in node and k != v}
    if not theirs:
        return node
    aliases = {**theirs, "MAX_ATTR_PER_INS": "MAX_ATTRIBUTES_PER_INSTANCE"}
    values = dict(node, MAX_ATTR_PER_INS=cfg.INPUT.get("MAX_ATTR_PER_INS", 16))
    for their_key, our_key in aliases.items():
        if our_key in node and node[our_key] != values[their_key]:
            raise ValueError(
                f"MODEL.ROI_ATTRIBUTE_HEAD.{our_key} ({node[our_key]}) and grid-feats-vqa's "
                f"{their_key} ({values[their_key]}) clash: set one of them"
            )
        node[our_key] = values[their_key]
    return node


def attribute_head_node(cfg):
    """
    Return ``cfg.MODEL.ROI_ATTRIBUTE_HEAD`` in our key names (those of grid-feats-vqa's
    ``add_attribute_config`` are taken as aliases) when ``MODEL.ATTRIBUTE_ON`` is set, after
    checking its values; else None.

    Raises:
        ValueError: naming the first key whose value is not allowed, or the clash of a key
            set in both spellings to two values.
    """
    if not cfg.MODEL.get("ATTRIBUTE_ON", False):
        return None
    node = _attribute_keys(cfg)
    for key in ("NUM_ATTRIBUTES", "EMBED_DIM", "HIDDEN_DIM", "MAX_ATTRIBUTES_PER_INSTANCE"):
        if node[key] < 1:
            raise ValueError(f"MODEL.ROI_ATTRIBUTE_HEAD.{key} must be >= 1; got {node[key]}")
    if node.LOSS_WEIGHT < 0:
        raise ValueError(
            f"MODEL.ROI_ATTRIBUTE_HEAD.LOSS_WEIGHT must be >= 0; got {node.LOSS_WEIGHT}"
        )
    return node


def use_feature_heads(cfg):
    """
    Switch ``cfg`` (in place) from a standard detectron2 ROI head to its Feature head; a
    Feature head stays as it is. Raises ValueError for heads without a Feature counterpart.
    """
    name = cfg.MODEL.ROI_HEADS.NAME
    if name in FEATURE_HEADS.values():
        return cfg
    if name not in FEATURE_HEADS:
        raise ValueError(
            f"MODEL.ROI_HEADS.NAME {name!r} has no Feature head; use one of "
            f"{', '.join(FEATURE_HEADS)} or their Feature versions"
        )
    cfg.MODEL.ROI_HEADS.NAME = FEATURE_HEADS[name]
    return cfg
