"""The ``MODEL.REGION_FEATURES`` config node and its validation."""
from detectron2.config import CfgNode as CN

SOURCES = ("box_head", "pooled")
SELECTIONS = ("detections", "regions", "butd", "vinvl")
BOX_MODES = ("proposal", "regressed")
POOL_AT = ("proposal", "final")
# Constructor argument of the heads and predictors -> its key under MODEL.REGION_FEATURES.
SETTING_KEYS = {
    "region_source": "SOURCE",
    "pool_at": "POOL_AT",
    "selection": "SELECTION",
    "region_box": "BOX",
    "conf_thresh": "CONF_THRESH",
    "min_boxes": "MIN_BOXES",
    "max_boxes": "MAX_BOXES",
    "min_regions": "MIN_REGIONS",
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
    if "VINVL" not in cfg.MODEL:
        _add_vinvl_keys(cfg)
    if "BUTA" not in cfg.MODEL:
        _add_buta_keys(cfg)


def _add_region_features_node(cfg):
    node = cfg.MODEL.REGION_FEATURES = CN()
    # Name in ROI_BOX_PREDICTOR_REGISTRY of the box predictor the Feature heads build.
    node.PREDICTOR = "FeatureFastRCNNOutputLayers"
    # With MODEL.ROI_HEADS.NAME "FeatureROIHeads": the ROI heads (any name in ROI_HEADS_REGISTRY,
    # a project's or your own) whose region-feature version is built; its parameters, training
    # and detections are unchanged (see README "Your own heads").
    node.BASE_ROI_HEADS = "StandardROIHeads"
    # "" : box_features are the box predictor's input rows (SOURCE decides further).
    # A dotted module path under the ROI heads (e.g. "box_head.fc1", or Detic's
    # "box_predictor.2.cls_score.linear"): box_features are that module's output, one row per
    # proposal of the predictor call that made the detections (flattened); SOURCE and POOL_AT
    # must keep their defaults.
    node.SOURCE_MODULE = ""
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
    # "vinvl": scene_graph_benchmark's filter_results_peter (NMS_FILTER 1), to the row (per-class
    # NMS at MODEL.VINVL.NMS_THRESH over all rows in network-input pixels, best surviving class,
    # sorted by score; BOX "proposal" = TEST.IGNORE_BOX_REGRESSION True).
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
    # d2_regionfeat.modeling.outputs.GridFields); needs META_ARCHITECTURE "RegionFeatureRCNN".
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


def _add_vinvl_keys(cfg):
    # The parts of scene_graph_benchmark's VinVL detector that differ from detectron2's (see
    # the README section "VinVL").
    node = cfg.MODEL.VINVL = CN()
    # SELECTION "vinvl": IoU threshold of its per-class NMS (hard-coded 0.3 there).
    node.NMS_THRESH = 0.3
    # SELECTION "vinvl": which NMS: "torchvision" (IoU without +1, suppress when > threshold;
    # scene_graph_benchmark HEAD), "legacy_ge" / "legacy_gt" (its first release's compiled
    # _C.nms: +1 IoU, suppress when >= (CPU) / > (CUDA)).
    node.NMS_IOU = "torchvision"
    # Meta-architecture "VinVLRCNN": every FrozenBatchNorm2d computes x * w / sqrt(var) + ...,
    # without eps (maskrcnn-benchmark's FrozenBatchNorm2d).
    node.FROZEN_BN_NO_EPS = True
    # Meta-architecture "VinVLRCNN": output boxes are only rescaled to the original image size
    # (BoxList.resize), never clipped, and regions of zero width or height are kept (detectron2's
    # detector_postprocess clips and drops them).
    node.KEEP_EMPTY_BOXES = True
    # Meta-architecture "VinVLRCNN": scene_graph_benchmark's labelmap (VG-SGG-dicts-vgoi6-
    # clipped.json; label_to_idx / attribute_to_idx, 1-based): its names become thing_classes /
    # attribute_classes of DATASETS.TEST's metadata when the model is built. "" = none.
    node.LABELMAP = ""
    # The test resize (d2_regionfeat.data.build_test_transform): "round" = detectron2's
    # ResizeShortestEdge (both sides int(x + 0.5)); "truncate" = maskrcnn-benchmark's Resize
    # (long side int(short * long / short_side), truncated; e.g. 500x333 -> 900x600, not 901).
    cfg.INPUT.RESIZE_LONG_SIDE = "round"
    attributes = cfg.MODEL.ROI_ATTRIBUTE_HEAD
    # "butd": bottom-up-attention's head (class = argmax of all K + 1 logits, the proposal's
    # feature; attr_probs / attrs_id / attrs_conf). "vinvl": scene_graph_benchmark's, with
    # META_ARCHITECTURE "VinVLRCNN" and PREDICTOR "VinVLOutputLayers": class = the selected one,
    # feature pooled again at the output box, softmax over A + 1 with "no attribute" zeroed,
    # kept > SCORE_THRESH, at most MAX_PER_REGION: attr_labels (M, MAX_PER_REGION) attribute ids
    # padded with -1, attr_scores (M, MAX_PER_REGION) padded with 0.
    attributes.KIND = "butd"
    attributes.SCORE_THRESH = 0.05
    attributes.MAX_PER_REGION = 16


def _add_buta_keys(cfg):
    # The parts of MILVLG/bottom-up-attention.pytorch's detectors (BUTA.pt) that differ from
    # detectron2's (d2_regionfeat.modeling.buta, configs/BUTA/).
    node = cfg.MODEL.BUTA = CN()
    # Meta-architecture "BUTARCNN" at inference: the image is resized as a float image
    # (bilinear) by scale = TEST_SCALE / short side, or TEST_MAX_SIZE / long side when
    # round(scale * long side) > TEST_MAX_SIZE (BUTA.pt's hard-coded TEST_SCALES (600,) and
    # TEST_MAX_SIZE 1000). The input side must not resize: BUTA's configs set
    # INPUT.MIN_SIZE_TEST 0.
    node.TEST_SCALE = 600
    node.TEST_MAX_SIZE = 1000
    # True: PIXEL_MEAN / PIXEL_STD applied before that resize (its caffe mode's
    # get_image_blob); False: after it (its d2 mode: get_image_blob with mean 0, then
    # detectron2's normalisation in the model).
    node.NORMALIZE_BEFORE_RESIZE = True
    # Backbone "build_buta_preact_resnet_backbone" and ROI heads "BUTAPreActRes5ROIHeads"
    # (BUTA.pt's RESNET_VERSION 2, its R152): eps of every batch norm.
    node.BN_EPS = 2e-5


def buta_node(cfg):
    """Return ``cfg.MODEL.BUTA`` after checking its values (ValueError naming the key)."""
    node = cfg.MODEL.BUTA
    for key in ("TEST_SCALE", "TEST_MAX_SIZE"):
        if node[key] < 1:
            raise ValueError(f"MODEL.BUTA.{key} must be >= 1; got {node[key]}")
    if node.BN_EPS <= 0:
        raise ValueError(f"MODEL.BUTA.BN_EPS must be > 0; got {node.BN_EPS}")
    return node


def _check_choice(key, value, choices):
    if value not in choices:
        raise ValueError(
            f"MODEL.REGION_FEATURES.{key} must be one of {', '.join(choices)}; got {value!r}"
        )


def check_region_settings(**settings):
    """
    Check constructor arguments of the region-feature heads and predictors (names of
    :data:`SETTING_KEYS`; those given are checked), so that yacs, LazyConfig and direct
    construction share one set of checks.

    Raises:
        ValueError: naming the ``MODEL.REGION_FEATURES`` key of the first value not allowed.
    """
    choices = {"region_source": SOURCES, "pool_at": POOL_AT, "selection": SELECTIONS,
               "region_box": BOX_MODES}
    for name, allowed in choices.items():
        if name in settings:
            _check_choice(SETTING_KEYS[name], settings[name], allowed)
    if "conf_thresh" in settings and not 0.0 <= settings["conf_thresh"] <= 1.0:
        raise ValueError(
            f"MODEL.REGION_FEATURES.CONF_THRESH must be within [0, 1]; got {settings['conf_thresh']}"
        )
    for name in ("min_boxes", "min_regions"):
        if settings.get(name, 0) < 0:
            raise ValueError(
                f"MODEL.REGION_FEATURES.{SETTING_KEYS[name]} must be >= 0; got {settings[name]}"
            )
    if settings.get("max_boxes", 0) < settings.get("min_boxes", 0):
        raise ValueError(
            f"MODEL.REGION_FEATURES.MAX_BOXES ({settings['max_boxes']}) must be >= "
            f"MIN_BOXES ({settings['min_boxes']})"
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
    check_region_settings(**{name: node[key] for name, key in SETTING_KEYS.items()})
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


def region_selection_settings(cfg) -> dict:
    """
    The region-selection settings of ``cfg``, as the arguments of every holder of a selection
    (:class:`~d2_regionfeat.modeling.predictor.FeatureFastRCNNOutputLayers`, and the
    ``region_selection`` of heads whose own predictor is kept): ``MODEL.REGION_FEATURES``'s
    and ``MODEL.VINVL``'s NMS, checked.
    """
    node, vinvl = region_features_node(cfg), vinvl_node(cfg)
    return {
        "selection": node.SELECTION, "class_probs": node.CLASS_PROBS, "conf_thresh": node.CONF_THRESH,
        "min_boxes": node.MIN_BOXES, "max_boxes": node.MAX_BOXES, "region_box": node.BOX,
        "min_regions": node.MIN_REGIONS, "vinvl_nms": (vinvl.NMS_THRESH, vinvl.NMS_IOU),
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


def vinvl_node(cfg):
    """Return ``cfg.MODEL.VINVL`` after checking its values (ValueError naming the key)."""
    from .selection import VINVL_NMS

    node = cfg.MODEL.VINVL
    if node.NMS_IOU not in VINVL_NMS:
        raise ValueError(
            f"MODEL.VINVL.NMS_IOU must be one of {', '.join(VINVL_NMS)}; got {node.NMS_IOU!r}"
        )
    if not 0.0 <= node.NMS_THRESH <= 1.0:
        raise ValueError(f"MODEL.VINVL.NMS_THRESH must be within [0, 1]; got {node.NMS_THRESH}")
    kind = cfg.MODEL.ROI_ATTRIBUTE_HEAD.KIND
    if kind not in ("butd", "vinvl"):
        raise ValueError(f'MODEL.ROI_ATTRIBUTE_HEAD.KIND must be "butd" or "vinvl"; got {kind!r}')
    return node
