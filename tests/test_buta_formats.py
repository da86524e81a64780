"""
The "buta" layout (MILVLG/bottom-up-attention.pytorch's save_roi_features npz): the keys and
``info`` its files hold, read as the code written for its features reads them, and read back
by us into the same records without unpickling.
"""
import os
import pickle

import numpy as np
import pytest

from d2_regionfeat.formats import LAYOUTS
from d2_regionfeat.io import read_features


def records(attributes=True):
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate((10, 36, 13)):
        record = {
            "image_id": f"COCO_val2014_{i:012d}", "image_h": 300 + i, "image_w": 400 - i, "num_bbox": n,
            "x": rng.standard_normal((n, 2048)).astype(np.float32),
            "bbox": (rng.random((n, 4)) * 300).astype(np.float32),
            "objects_id": rng.integers(0, 1600, n), "objects_conf": rng.random(n).astype(np.float32),
            "cls_prob": rng.random((n, 1601)).astype(np.float32),
        }
        if attributes:
            record.update(attrs_id=rng.integers(0, 400, n), attrs_conf=rng.random(n).astype(np.float32),
                          attr_prob=rng.random((n, 401)).astype(np.float32))
        out.append(record)
    return out


def write(folder, recs):
    writer = LAYOUTS["buta"](str(folder), 0, 1)
    writer.write(recs)
    writer.close()
    LAYOUTS["buta"].merge(str(folder), 1)
    return folder / "buta"


def its_reader(folder):
    """As the code written for its features reads a folder of them: ``np.load(path,
    allow_pickle=True)``, the arrays by name, ``.item()`` of the scalars and of ``info``."""
    out = {}
    for name in sorted(os.listdir(folder)):
        f = np.load(os.path.join(folder, name), allow_pickle=True)
        info = f["info"].item()
        out[name[: -len(".npz")]] = {
            "x": f["x"], "bbox": f["bbox"], "num_bbox": f["num_bbox"].item(),
            "image_h": f["image_h"].item(), "image_w": f["image_w"].item(), "info": info,
        }
    return out


@pytest.mark.parametrize("attributes", [True, False])
def test_its_readers_read_its_keys_and_info(tmp_path, attributes):
    recs = records(attributes)
    got = its_reader(write(tmp_path, recs))
    assert sorted(got) == [r["image_id"] for r in recs]
    info_keys = ["image_id", "image_h", "image_w", "num_boxes", "objects_id", "objects_conf"]
    info_keys += ["attrs_id", "attrs_conf"] if attributes else []
    for r in recs:
        g = got[r["image_id"]]
        assert g["x"].dtype == np.float32 and np.array_equal(g["x"], r["x"])
        assert np.array_equal(g["bbox"], r["bbox"])
        assert (g["num_bbox"], g["image_h"], g["image_w"]) == (r["num_bbox"], r["image_h"], r["image_w"])
        info = g["info"]
        assert list(info) == info_keys
        assert (info["image_id"], info["image_h"], info["image_w"], info["num_boxes"]) == (
            r["image_id"], r["image_h"], r["image_w"], r["num_bbox"])
        for key in info_keys[4:]:
            assert np.array_equal(info[key], r[key]), key


def test_read_back_without_unpickling(tmp_path, monkeypatch):
    recs = records()
    folder = write(tmp_path, recs)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    back = list(read_features(str(folder), "buta"))
    assert [b["image_id"] for b in back] == [r["image_id"] for r in recs]
    for b, r in zip(back, recs):
        assert sorted(b) == sorted(["image_id", "image_h", "image_w", "num_bbox", "x", "bbox", "objects_id",
                                    "objects_conf", "attrs_id", "attrs_conf"])
        for key in b:
            assert np.array_equal(b[key], r[key]), key
    with np.load(folder / f"{recs[0]['image_id']}.npz") as npz:  # allow_pickle=False, numpy's default
        with pytest.raises(ValueError):
            npz["info"]
