"""
The config you trained with, in every tool (extraction/model_config.py): the model zoo's yacs
files as they are and a user's LazyConfig ``.py``, with overrides in their own form, through
the tools' real command line; plain heads enabled; the config kept in the manifest.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detectron2
from detectron2 import model_zoo
from detectron2.data.detection_utils import read_image

from d2_regionfeat.extraction.model_config import (
    ConfigError,
    load_model_config,
    split_overrides,
)
from d2_regionfeat.io import read_features
from helpers import image, tame

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
IMAGES = {"a": (1, 120, 170), "b": (2, 150, 110)}
# The zoo's files as they are, made cheap by command-line overrides only (helpers.narrow's widths).
SMALL = [
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32", "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
]
LAZY_SMALL = [
    "dataloader.test.mapper.augmentations.0.short_edge_length=128",
    "dataloader.test.mapper.augmentations.0.max_size=192",
    "model.proposal_generator.post_nms_topk=[2000,100]",
]
# A user's LazyConfig, as lazyconfig_train_net.py takes them: detectron2's common model.
USER_LAZY = """\
from detectron2.model_zoo import get_config

model = get_config("common/models/mask_rcnn_fpn.py").model
dataloader = get_config("common/data/coco.py").dataloader
train = get_config("common/train.py").train
model.roi_heads.num_classes = 7  # more classes than the shapes' (the demo's labels and colours)
"""

pytestmark = pytest.mark.timeout(600)


def run_tool(tool, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(TOOLS / tool), *map(str, args)], env=env, capture_output=True,
        text=True, timeout=400,
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for name, (seed, height, width) in IMAGES.items():
        bgr = image(seed, height, width).permute(1, 2, 0).numpy().astype(np.uint8)
        Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])).save(folder / f"{name}.png")
    return folder


def saved_weights(path, overrides, folder):
    """Tamed random weights of the model of the config at ``path``, saved under ``folder``."""
    torch.manual_seed(0)
    model = tame(load_model_config(str(path), overrides, device="cpu").build_model())
    weights = folder / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    return weights


def assert_features_are_predictor_inputs(out, images, path, overrides, weights):
    """
    Each record's rows are the box predictor's input rows of its detections' proposals (asked
    of the model in this process, through a hook on the predictor), and its boxes the model's.
    """
    config = load_model_config(str(path), overrides, weights=str(weights), device="cpu")
    predictor = config.predictor()
    seen = []
    heads = predictor.model.roi_heads
    hook = heads.feature_predictor.register_forward_hook(lambda m, args, out: seen.append(args[0].flatten(1)))
    records = {r["image_id"]: r for r in read_features(str(out), "npz")}
    assert sorted(records) == sorted(IMAGES)
    try:
        for name in IMAGES:
            seen.clear()
            instances = predictor(read_image(str(images / f"{name}.png"), "BGR"))["instances"]
            (rows,) = seen
            np.testing.assert_array_equal(instances.box_features.numpy(), rows[instances.proposal_index].numpy())
            record = records[name]
            assert record["num_bbox"] == len(instances) > 0
            features = instances.box_features.numpy()
            np.testing.assert_allclose(record["x"], features, rtol=0, atol=1e-4 * np.abs(features).max())
            np.testing.assert_allclose(record["bbox"], instances.pred_boxes.tensor.numpy(), rtol=0, atol=1e-2)
    finally:
        hook.remove()
    return records


@pytest.mark.parametrize("zoo_file,head", [
    ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", "StandardROIHeads"),
    ("COCO-Detection/faster_rcnn_R_50_C4_3x.yaml", "Res5ROIHeads"),
    ("Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml", "CascadeROIHeads"),
])
def test_model_zoo_yaml_as_it_is(zoo_file, head, images, tmp_path):
    path = model_zoo.get_config_file(zoo_file)
    weights = saved_weights(path, SMALL, tmp_path)
    out = tmp_path / "out"
    result = run_tool(
        "extract_net.py", "--config-file", path, "--input", images, "--output", out,
        "--format", "npz", "tsv", "--num-workers", "0", *SMALL, "MODEL.WEIGHTS", weights,
    )
    assert result.returncode == 0, result.stderr
    enabled = [line for line in (result.stdout + result.stderr).splitlines() if "region features:" in line]
    assert len(enabled) == 1 and f"{head} wrapped" in enabled[0] and "MODEL.ROI_HEADS.NAME" in enabled[0]
    assert_features_are_predictor_inputs(out, images, path, SMALL, weights)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config_kind"] == "yacs" and manifest["config_text"] == Path(path).read_text()
    assert manifest["config_overrides"] == [*SMALL, "MODEL.WEIGHTS", str(weights)]
    assert "FeatureROIHeads" in manifest["config"] and manifest["formats"] == ["npz", "tsv"]


@pytest.fixture(scope="module")
def user_lazy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lazy")
    path = folder / "my_mask_rcnn.py"
    path.write_text(USER_LAZY)
    return path, saved_weights(path, LAZY_SMALL, folder)


def extract_net_main(argv):
    spec = importlib.util.spec_from_file_location("extract_net", TOOLS / "extract_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_user_lazy_config_with_overrides(user_lazy, images, tmp_path, capsys):
    path, weights = user_lazy
    out = tmp_path / "out"
    overrides = [
        *LAZY_SMALL, f"train.init_checkpoint={weights}", "region_features.selection=regions",
        "region_features.min_boxes=2", "region_features.max_boxes=4",
    ]
    result = run_tool(
        "extract_net.py", "--config-file", path, "--input", images, "--output", out,
        "--num-workers", "0", *overrides,
    )
    assert result.returncode == 0, result.stderr
    assert "StandardROIHeads wrapped" in result.stdout + result.stderr
    records = assert_features_are_predictor_inputs(out, images, path, overrides, weights)
    assert all(2 <= r["num_bbox"] <= 4 for r in records.values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config_kind"] == "lazy" and manifest["config_text"] == USER_LAZY
    assert manifest["config_overrides"] == overrides and manifest["weights"] == str(weights)
    assert "FeatureROIHeads" in manifest["config"] and "selection: regions" in manifest["config"]

    # the same folder with other overrides is refused in one line, and left as it is
    before = (out / "manifest.json").read_text()
    with pytest.raises(SystemExit) as refused:
        extract_net_main([
            "--config-file", str(path), "--input", str(images), "--output", str(out), "--resume",
            *overrides[:-1], "region_features.max_boxes=3",
        ])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.count("\n") == 1 and "config, config overrides differ" in err, err
    assert (out / "manifest.json").read_text() == before


def test_explain_and_demo_take_a_lazy_config(user_lazy, images, tmp_path):
    path, weights = user_lazy
    result = run_tool(
        "explain_detections.py", "--config-file", path, "--input", images / "a.png", images / "b.png",
        "--json", *LAZY_SMALL, f"train.init_checkpoint={weights}",
    )
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)
    assert sorted(reports) == [str(images / "a.png"), str(images / "b.png")]
    predictor = load_model_config(str(path), LAZY_SMALL, weights=str(weights), device="cpu").predictor()
    for name in ("a", "b"):
        instances = predictor(read_image(str(images / f"{name}.png"), "BGR"))["instances"]
        assert reports[str(images / f"{name}.png")]["final"] == len(instances)

    out = tmp_path / "demo"
    result = run_tool(
        "demo.py", "--config-file", path, "--images", images, "--output", out,
        "--confidence-threshold", "0.05", "--weights", weights, *LAZY_SMALL,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "overview.png").is_file()
    with np.load(out / "a.npz") as npz:
        assert npz["cls_prob"].shape == (int(npz["num_bbox"]), 8) and npz["x"].shape[1] == 1024


VITDET = Path(detectron2.__file__).resolve().parents[1] / "projects" / "ViTDet" / "configs" / "COCO" / "mask_rcnn_vitdet_b_100ep.py"


@pytest.mark.skipif(
    not VITDET.is_file(),
    reason=f"this detectron2 ({detectron2.__version__}, {Path(detectron2.__file__).parent}) lacks "
    "ViTDet (projects/ViTDet, upstream detectron2 only; pb1-detectron2 0.6 has none)",
)
def test_vitdet_lazy_config_as_it_is(images, tmp_path):
    small = [
        "model.backbone.net.img_size=256", "model.backbone.square_pad=256",
        "model.backbone.net.depth=2", "model.backbone.net.window_block_indexes=[0]",
        "model.roi_heads.num_classes=3", "train.device=cpu",
        "dataloader.test.mapper.augmentations.0.short_edge_length=256",
        "dataloader.test.mapper.augmentations.0.max_size=256",
    ]
    weights = saved_weights(VITDET, small, tmp_path)
    out = tmp_path / "out"
    result = run_tool(
        "extract_net.py", "--config-file", VITDET, "--input", images, "--output", out,
        "--num-workers", "0", "--weights", weights, *small,
    )
    assert result.returncode == 0, result.stderr
    assert_features_are_predictor_inputs(out, images, VITDET, small, weights)
    assert json.loads((out / "manifest.json").read_text())["config_text"] == VITDET.read_text()


def test_region_settings_in_both_forms(user_lazy):
    """selection=butd, class_probs, attributes, regions min/max and the score threshold."""
    path, _ = user_lazy
    lazy = load_model_config(str(path), [
        "region_features.selection=butd", "region_features.class_probs=true",
        "region_features.num_attributes=7", "region_features.min_boxes=3",
        "region_features.max_boxes=9", "region_features.score_thresh=0.4",
    ], device="cpu")
    yacs = load_model_config(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"), [
        "MODEL.REGION_FEATURES.SELECTION", "butd", "MODEL.REGION_FEATURES.CLASS_PROBS", "True",
        "MODEL.ATTRIBUTE_ON", "True", "MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES", "7",
        "MODEL.REGION_FEATURES.MIN_BOXES", "3", "MODEL.REGION_FEATURES.MAX_BOXES", "9",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.4",
    ], device="cpu")
    for config in (lazy, yacs):
        model = config.build_model()
        predictor = model.roi_heads.feature_predictor
        assert type(model).__name__ == "RegionFeatureRCNN", config.kind
        assert (predictor.selection, predictor.class_probs, predictor.min_boxes, predictor.max_boxes) == (
            "butd", True, 3, 9)
        assert predictor.attr_score.out_features == 8 and predictor.test_score_thresh == 0.4
    assert "box_predictor.selection None -> butd" in " ".join(f"{k} {v}" for k, v in lazy.changes.items())


def test_bad_configs_get_one_line(user_lazy, tmp_path):
    path, _ = user_lazy
    (tmp_path / "notes.txt").write_text("MODEL:\n")
    (tmp_path / "list.yaml").write_text("- 1\n")
    cases = {
        str(tmp_path / "notes.txt"): ([], "is neither a yacs YAML nor a LazyConfig"),
        str(tmp_path / "list.yaml"): ([], "is neither a yacs YAML nor a LazyConfig"),
        str(tmp_path / "none.yaml"): ([], "not found"),
        str(path): (["MODEL.WEIGHTS", "x.pth"], "its overrides are key=value, not KEY VALUE"),
        model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_C4_3x.yaml"): (
            ["model.x=1"], "its overrides are KEY VALUE pairs, not key=value"),
        model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_3x.yaml"): (
            [], "MODEL.META_ARCHITECTURE RetinaNet has no ROI heads"),
        model_zoo.get_config_file("common/models/retinanet.py"): (
            [], "no model.roi_heads._target_ to give region features"),
    }
    for file, (overrides, message) in cases.items():
        with pytest.raises(ConfigError) as error:
            load_model_config(file, overrides)
        assert message in str(error.value) and "\n" not in str(error.value), file
    with pytest.raises(ConfigError, match="region_features.nope is not a region-feature setting; known: region_source"):
        load_model_config(str(path), ["region_features.nope=1"])


def test_many_word_options_stop_at_the_overrides():
    assert split_overrides(["npz", "tsv", "MODEL.WEIGHTS", "m.pth"]) == (["npz", "tsv"], ["MODEL.WEIGHTS", "m.pth"])
    assert split_overrides(["a.jpg", "b.JPG", "train.init_checkpoint=m.pth"]) == (
        ["a.jpg", "b.JPG"], ["train.init_checkpoint=m.pth"])
    assert split_overrides(["npz,tsv"]) == (["npz,tsv"], [])
