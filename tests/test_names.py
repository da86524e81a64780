"""
The model's class names (MODEL.REGION_FEATURES.CLASS_NAMES_FILE) in what the tools write: the
explain tool's JSON and the demo's labels (manifest and oscar: tests/test_extract_net.py).
"""
import importlib.util
import json

import numpy as np
import pytest

from d2_regionfeat.data.synthetic import CLASSES
from d2_regionfeat.default_model import get_default_model_cfg
from d2_regionfeat.extraction.model_config import as_model_config
from d2_regionfeat.modeling.vocabulary import vocabularies
from test_extract_net import REPO, generated, save_bgr


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_explain_json_names_classes(model, tmp_path, capsys):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red ball\ntable\nsky\n")
    save_bgr(tmp_path / "img.png", generated(7, 150, 190))
    explain = load_tool("explain_detections")
    argv = ["--config-file", str(model.yaml), "--input", str(tmp_path / "img.png"), "--thresh", "0.05",
            "--json", "--opts", "MODEL.REGION_FEATURES.SELECTION", "detections",
            "MODEL.REGION_FEATURES.CLASS_NAMES_FILE", str(vocab), "DATASETS.TEST", "('mydata',)"]
    explain.main(argv)
    (report,) = json.loads(capsys.readouterr().out).values()
    assert report["removed_by_nms"]
    for item in report["removed_by_nms"]:
        assert item["class_name"] == ["red ball", "table", "sky"][item["class"]]
    explain.main(argv[:-4])  # no names anywhere: said so
    (report,) = json.loads(capsys.readouterr().out).values()
    assert {i["class_name"] for i in report["removed_by_nms"]} <= {"class_0", "class_1", "class_2"}


def test_demo_labels_use_the_class_names_file(tmp_path):
    from d2_regionfeat.default_model import CONFIG_FILE
    from d2_regionfeat.extraction.model_config import load_model_config

    demo = load_tool("demo")
    assert demo.class_names(load_model_config(CONFIG_FILE), len(CLASSES)) == list(CLASSES)  # the shipped model
    cfg = get_default_model_cfg("cpu")
    names = [f"thing{i}" for i in range(len(CLASSES))]
    (tmp_path / "vocab.txt").write_text("\n".join(names) + "\n")
    cfg.MODEL.REGION_FEATURES.CLASS_NAMES_FILE = str(tmp_path / "vocab.txt")
    assert vocabularies(cfg).class_names == demo.class_names(as_model_config(cfg), len(CLASSES)) == names
    regions = {"objects_id": np.array([2, 0]), "objects_conf": np.array([0.97, 0.5], np.float32)}
    assert demo.region_label(regions, 0, names, 0.2) == "thing2 0.97"


def test_demo_labels_a_model_of_other_classes():
    """A model that is not the shipped one, of 80 classes and no names: class_<i>, colours for each."""
    demo = load_tool("demo")
    cfg = get_default_model_cfg("cpu")
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    names = demo.class_names(as_model_config(cfg), 80)
    assert names == [f"class_{i}" for i in range(80)]
    regions = {"objects_id": np.array([57]), "objects_conf": np.array([0.61], np.float32),
               "attr_prob": np.full((1, 3), 0.9, np.float32)}  # another model's attributes: not the shapes'
    assert demo.region_label(regions, 0, names, 0.2) == "class_57 0.61"
    assert all(np.all((0 <= demo.class_color(c)) & (demo.class_color(c) <= 1)) for c in range(80))


def test_demo_main_on_two_images(tmp_path, monkeypatch, capsys):
    """tools/demo.py as make demo runs it (its main), on two of the shipped demo images."""
    import shutil
    import sys

    images = tmp_path / "images"
    images.mkdir()
    for name in ("coffee.jpg", "shapes_val_0.jpg"):
        shutil.copy(REPO / "demo" / "images" / name, images / name)
    monkeypatch.setattr(sys, "argv", ["demo.py", "--images", str(images), "--output", str(tmp_path / "out"),
                                      "--confidence-threshold", "0.3"])
    load_tool("demo").main()
    stems = sorted(p.stem for p in images.iterdir())
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.npz")) == stems
    for stem in stems:
        with np.load(tmp_path / "out" / f"{stem}.npz") as record:
            assert record["x"].shape == (int(record["num_bbox"]), record["x"].shape[1])
            if stem.startswith("shapes"):  # the shipped model's own domain: it finds shapes
                assert int(record["num_bbox"]) > 0
    from PIL import Image

    with Image.open(tmp_path / "out" / "overview.png") as overview:
        assert overview.size[0] > 100 and overview.size[1] > 100
    assert "Wrote 2 feature files" in capsys.readouterr().out


def test_vinvl_labelmap_names_reach_every_tool_before_the_model_is_built(tmp_path):
    """
    MODEL.VINVL.LABELMAP is read with the other names files (modeling/vocabulary.py), so the
    tools, which ask for the names before they build the model (explain_detections, demo, the
    manifest of extract_net), get its words rather than ``class_<i>``.
    """
    from d2_regionfeat.extraction.model_config import load_model_config
    from test_vinvl_model import A, K, narrow_cfg

    labelmap = {"label_to_idx": {f"thing{i}": i + 1 for i in range(K)},
                "attribute_to_idx": {f"colour{i}": i + 1 for i in range(A)}}
    (tmp_path / "labelmap.json").write_text(json.dumps(labelmap))
    cfg = narrow_cfg()
    cfg.MODEL.VINVL.LABELMAP = str(tmp_path / "labelmap.json")
    (tmp_path / "vinvl.yaml").write_text(cfg.dump())
    names = load_model_config(str(tmp_path / "vinvl.yaml")).vocabularies()
    assert names.class_names == [f"thing{i}" for i in range(K)]
    assert names.attribute_names == [f"colour{i}" for i in range(A)]
    assert names.class_name(1) == "thing1"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = K + 1
    with pytest.raises(ValueError, match=f"MODEL.VINVL.LABELMAP .* holds {K} thing_classes; the model has {K + 1}"):
        vocabularies(cfg)
