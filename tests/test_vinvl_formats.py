"""The "vinvl" layout (scene_graph_benchmark's predictions.tsv): written, read as its users
read it, and read back into the same records; Oscar's 2054-d rows of the "oscar" layout."""
import base64
import json

import numpy as np
import torch
import pytest

from d2_regionfeat.formats import LAYOUTS
from d2_regionfeat.io import read_features
from d2_regionfeat.modeling.vocabulary import Vocabularies
from d2_regionfeat.formats.records import spatial6
from d2_regionfeat.modeling.vocabulary import read_labelmap


def records():
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate((3, 0, 5)):
        labels = np.full((n, 16), -1, np.int64)
        scores = np.zeros((n, 16), np.float32)
        for r in range(n):
            k = int(rng.integers(0, 4))
            labels[r, :k] = rng.choice(7, size=k, replace=False)
            scores[r, :k] = np.sort(rng.random(k).astype(np.float32))[::-1]
        out.append({
            "image_id": f"img{i}", "image_h": 300, "image_w": 400, "num_bbox": n,
            "x": rng.standard_normal((n, 2048)).astype(np.float32),
            "bbox": (rng.random((n, 4)) * 300).astype(np.float32),
            "objects_id": rng.integers(0, 5, n), "objects_conf": rng.random(n).astype(np.float32),
            "attr_labels": labels, "attr_scores": scores,
        })
    return out


def write(tmp_path, fmt, manifest):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    writer = LAYOUTS[fmt](str(tmp_path), 0, 1)
    writer.write(records())
    writer.close()
    names = Vocabularies(manifest.get("class_names"), manifest.get("attribute_names"))
    LAYOUTS[fmt].merge(str(tmp_path), 1, **({"names": names} if LAYOUTS[fmt].takes_names else {}))


def sgb_reader(path):
    """As scene_graph_benchmark's users read predictions.tsv (TSV row, JSON, base64 float32)."""
    out = {}
    with open(path) as f:
        for line in f:
            key, text = line.rstrip("\n").split("\t")
            objects = json.loads(text)["objects"]
            out[key] = (
                np.array([np.frombuffer(base64.b64decode(o["feature"]), np.float32) for o in objects]),
                [o["class"] for o in objects], [o.get("attributes") for o in objects],
            )
    return out


def test_vinvl_layout_reads_back_and_names_from_manifest(tmp_path):
    classes, attributes = [f"class{i}" for i in range(5)], [f"attr{i}" for i in range(7)]
    write(tmp_path, "vinvl", {"formats": ["vinvl"], "class_names": classes, "attribute_names": attributes})
    lines = (tmp_path / "vinvl" / "predictions.tsv").read_bytes().splitlines(keepends=True)
    offsets = [int(v) for v in (tmp_path / "vinvl" / "predictions.lineidx").read_text().split()]
    assert offsets == list(np.cumsum([0] + [len(l) for l in lines[:-1]]))
    seen = sgb_reader(tmp_path / "vinvl" / "predictions.tsv")
    back = {r["image_id"]: r for r in read_features(str(tmp_path), "vinvl")}
    for want in records():
        key = want["image_id"]
        features, names, attrs = seen[key]
        assert names == [classes[c] for c in want["objects_id"]]
        for r in range(want["num_bbox"]):
            assert attrs[r] == [attributes[a] for a in want["attr_labels"][r] if a >= 0]
            np.testing.assert_array_equal(features[r], want["x"][r])
        got = back[key]
        for k in ("num_bbox", "bbox", "objects_id", "objects_conf", "attr_labels", "attr_scores"):
            if want["num_bbox"] or k == "num_bbox":
                np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        if want["num_bbox"]:
            np.testing.assert_array_equal(got["x"], want["x"])


def test_oscar_layout_rows_are_2054_with_mmf_spatial(tmp_path):
    write(tmp_path, "oscar", {"formats": ["oscar"], "class_names": None})
    for line in (tmp_path / "oscar" / "features.tsv").read_text().splitlines():
        key, text = line.split("\t")
        info = json.loads(text)
        rows = np.frombuffer(base64.b64decode(info["features"]), np.float32).reshape(-1, 2054)  # as run_vqa.py
        want = {r["image_id"]: r for r in records()}[key]
        assert len(rows) == want["num_bbox"]
        np.testing.assert_array_equal(rows[:, :2048], want["x"])
        w, h = 400.0, 300.0
        b = want["bbox"]
        mmf = np.stack([b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h, (b[:, 2] - b[:, 0]) / w,
                        (b[:, 3] - b[:, 1]) / h], axis=1)
        np.testing.assert_allclose(rows[:, 2048:], mmf, rtol=1e-6)
        np.testing.assert_array_equal(rows[:, 2048:], spatial6(want))


def test_labelmap_names_are_one_based_and_checked(tmp_path):
    path = tmp_path / "labelmap.json"
    path.write_text(json.dumps({"label_to_idx": {"dog": 2, "cat": 1}, "attribute_to_idx": {"red": 1},
                                "idx_to_label": {"1": "cat", "2": "dog"}}))
    assert read_labelmap(str(path)) == (["cat", "dog"], ["red"])
    path.write_text(json.dumps({"label_to_idx": {"dog": 0, "cat": 1}, "attribute_to_idx": {}}))
    with pytest.raises(ValueError, match="indexes are not 1..2"):
        read_labelmap(str(path))


def test_extract_net_oscar_labels_are_the_labelmaps_words(tmp_path):
    """The VinVL model (reduced depth, random weights in its checkpoint's layout) with
    MODEL.VINVL.LABELMAP, run by tools/extract_net.py --format oscar: each region's label is
    the labelmap's word for its class."""
    from test_extract_net import by_id, generated, run_tool, save_bgr, tool_args
    from test_vinvl_model import A, K, narrow_cfg, tamed_state_dict

    words = ["zebra", "red car", "tree", "sky", "dog"][:K]
    labelmap = tmp_path / "labelmap.json"
    labelmap.write_text(json.dumps({
        "label_to_idx": {w: i + 1 for i, w in enumerate(words)},
        "attribute_to_idx": {f"attr{i}": i + 1 for i in range(A)},
    }))
    weights = tmp_path / "vinvl.pth"
    torch.save({"model": tamed_state_dict()}, weights)
    cfg = narrow_cfg()
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.VINVL.LABELMAP = str(labelmap)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 120, 200
    config = tmp_path / "vinvl.yaml"
    config.write_text(cfg.dump())
    images = tmp_path / "images"
    for name, (seed, h, w) in {"a": (1, 120, 170), "b": (2, 150, 110)}.items():
        save_bgr(images / f"{name}.png", generated(seed, h, w))
    out = tmp_path / "out"
    model = type("Model", (), {"yaml": config})
    result = run_tool(*tool_args(model, images, out, formats=["oscar", "npz"]))
    assert result.returncode == 0, result.stderr
    npz = by_id(read_features(str(out), "npz"))
    lines = (out / "oscar" / "labels.tsv").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        image_id, labels = line.split("\t")
        classes = [label["class"] for label in json.loads(labels)]
        assert classes and classes == [words[c] for c in npz[image_id]["objects_id"]]
