"""
Every layout of d2_regionfeat.formats read by (a re-implementation of) its consumer's own
reader, after one extraction per selection mode over images that include one with no
detection; convert_features.py against direct extraction; SIGKILL + --resume of consumer
layouts; ids, images without regions, pickles never read back.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import consumers
from d2_regionfeat.extraction.convert import ConversionError
from d2_regionfeat.modeling.vocabulary import Vocabularies
from d2_regionfeat.extraction.convert import convert as convert_in_process
from d2_regionfeat.extraction.inputs import list_inputs
from d2_regionfeat.extraction.model_call import BatchExtractor
from d2_regionfeat.extraction.run import RankFiles, merge_outputs
from d2_regionfeat.formats import REGION_FORMATS, LAYOUTS, WriteOnlyLayoutError, read_features
from d2_regionfeat.formats.records import background_first, spatial6
from d2_regionfeat.io import read_features as io_read_features
from d2_regionfeat.modeling.config import region_features_node
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, Instances
from helpers import make_cfg
from test_extract_net import (  # noqa: F401  (tool_main is a module fixture)
    REPO,
    assert_same_records,
    by_id,
    error_of,
    folder_bytes,
    generated,
    run_and_kill,
    run_tool,
    save_bgr,
    tool_args,
    tool_main,
)

CONVERT = REPO / "tools" / "convert_features.py"
ALL = list(REGION_FORMATS)
CONSUMER = [f for f in ALL if not LAYOUTS[f].keeps_empty]
# COCO-style file stems; "...0009" is one flat gray: no detection at SCORE_THRESH_TEST 0.5
IMAGES = {
    "COCO_val2014_000000000001": (1, 120, 170),
    "COCO_val2014_000000000002": (2, 150, 110),
    "COCO_val2014_000000000003": (3, 125, 165),
}
EMPTY = "COCO_val2014_000000000009"
DETECTIONS = ["MODEL.REGION_FEATURES.SELECTION", "detections", "MODEL.REGION_FEATURES.CLASS_PROBS", "True",
              "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.5"]
# every image the same number of regions, as LXMERT's collate (and BAN's fixed layout) need
REGIONS = ["MODEL.REGION_FEATURES.MIN_BOXES", "6", "MODEL.REGION_FEATURES.MAX_BOXES", "6"]

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coco")
    for name, spec in IMAGES.items():
        save_bgr(folder / f"{name}.png", generated(*spec))
    save_bgr(folder / f"{EMPTY}.png", np.full((120, 160, 3), 128, np.uint8))
    return folder


def extract(model, source, out, *opts, formats=ALL):
    result = run_tool(*tool_args(model, source, out, *opts, formats=formats))
    assert result.returncode == 0, result.stderr
    return SimpleNamespace(out=out, stdout=result.stdout, npz=by_id(read_features(str(out), "npz")))


@pytest.fixture(scope="module")
def detections(model, coco_set, tmp_path_factory):
    return extract(model, coco_set, tmp_path_factory.mktemp("detections") / "out", *DETECTIONS)


@pytest.fixture(scope="module")
def regions(model, coco_set, tmp_path_factory):
    return extract(model, coco_set, tmp_path_factory.mktemp("regions") / "out", *REGIONS)


def numeric(name):
    return int(name.rsplit("_", 1)[1])


def assert_holds(run, got, key_of, layout, boxes=True):
    """``got`` (consumer key -> (features, boxes, ...)) holds every image with regions of ``run``,
    with our npz's features and boxes."""
    expected = {key_of(i): r for i, r in run.npz.items() if r["num_bbox"]}
    assert sorted(got) == sorted(expected), layout
    for key, (features, box, *_) in got.items():
        record = expected[key]
        np.testing.assert_array_equal(features, record["x"].astype(np.float32), err_msg=f"{layout} {key}")
        if boxes:
            np.testing.assert_allclose(box, record["bbox"], rtol=1e-5, atol=1e-3, err_msg=f"{layout} {key}")


@pytest.mark.parametrize("mode", ["detections", "regions"])
def test_consumer_readers_read_every_layout(mode, request, tmp_path):
    run = request.getfixturevalue(mode)
    out = run.out
    counts = {i: r["num_bbox"] for i, r in run.npz.items()}
    assert sorted(counts) == sorted([*IMAGES, EMPTY])
    if mode == "detections":
        assert counts[EMPTY] == 0 and all(counts[i] for i in IMAGES)
    else:
        assert set(counts.values()) == {6}

    got, items = consumers.lxmert(out / "features.tsv")
    assert_holds(run, got, str, "tsv")
    if mode == "regions":  # the task datasets stack a batch
        batch = torch.utils.data.default_collate([torch.from_numpy(i["features"].copy()) for i in items])
        assert batch.shape == (4, 6, 1024)
    assert_holds(run, consumers.butd_tsv(out / "features_butd.tsv"), numeric, "butd_tsv")
    assert_holds(run, consumers.openvqa(str(out / "openvqa")), numeric, "openvqa")
    assert_holds(run, consumers.openvqa_gqa(str(out / "openvqa_gqa")), str, "openvqa_gqa")
    assert_holds(run, consumers.oscar(str(out / "oscar")), str, "oscar")
    assert_holds(run, consumers.visualbert(str(out / "visualbert"), [i for i, n in counts.items() if n]), str,
                 "visualbert", boxes=False)
    assert_holds(run, consumers.ban(str(out / "ban")), numeric, "ban_hdf5")
    assert_holds(run, consumers.vilbert(str(out / "vilbert"), str(tmp_path / "vilbert.lmdb"), 1024), numeric, "vilbert")
    mmf = consumers.mmf(str(out / "mmf"))
    assert_holds(run, mmf, str, "mmf")

    uniter = consumers.uniter(str(out / "uniter"))
    assert sorted(uniter) == sorted(f"{i}.npz" for i, n in counts.items() if n)
    for name, (features, norm_bb, soft_labels, conf) in uniter.items():
        record = run.npz[name[: -len(".npz")]]
        assert features.dtype == soft_labels.dtype == np.float16 and norm_bb.shape == (record["num_bbox"], 7)
        np.testing.assert_array_equal(features, record["x"].astype(np.float16))
        np.testing.assert_array_equal(soft_labels, background_first(record["cls_prob"]).astype(np.float16))
        np.testing.assert_allclose(norm_bb[:, :6], spatial6(record), atol=1e-3)
        np.testing.assert_array_equal(conf[:, 0], record["objects_conf"].astype(np.float16))

    # what the consumers derive besides features and boxes
    for image_id, (_, _, spatial, od_labels) in consumers.oscar(str(out / "oscar")).items():
        np.testing.assert_allclose(spatial, spatial6(run.npz[image_id]), rtol=1e-6)
        # the config's test set (COCO) does not name the model's 3 classes: class_<index>
        assert od_labels.split() == [f"class_{c}" for c in run.npz[image_id]["objects_id"]]
    for image_id, (_, _, spatial) in consumers.ban(str(out / "ban")).items():
        np.testing.assert_allclose(spatial, spatial6(run.npz[f"COCO_val2014_{image_id:012d}"]), rtol=1e-6)
    for image_id, (_, _, info) in mmf.items():
        record = run.npz[image_id]
        np.testing.assert_array_equal(info["cls_prob"], record["cls_prob"][:, :-1])
        assert (info["image_width"], info["image_height"]) == (record["image_w"], record["image_h"])
    fixed = mode == "regions"
    assert sorted(os.listdir(out / "ban")) == (
        ["features6.hdf5", "features6_imgid2idx.pkl"] if fixed else ["features.hdf5", "features_imgid2idx.pkl"])

    # d2_regionfeat reads back every layout but the two pickle folders
    for fmt in ALL:
        if fmt in ("mmf", "vilbert"):
            with pytest.raises(WriteOnlyLayoutError, match="holds pickles"):
                next(io_read_features(str(out), fmt))
            continue
        records = list(io_read_features(str(out), fmt))
        for record in records:
            key = record["image_id"]
            ours = run.npz[key if key in run.npz else f"COCO_val2014_{int(key):012d}"]
            for k in record.keys() & ours.keys() - {"image_id"}:
                want = ours[k].astype(record[k].dtype) if isinstance(ours[k], np.ndarray) else ours[k]
                np.testing.assert_array_equal(record[k], want, err_msg=f"{fmt} {key} {k}")
        assert len(records) == (4 if LAYOUTS[fmt].keeps_empty or mode == "regions" else 3), fmt


def test_images_without_regions_are_listed_and_counted(detections, model, coco_set, tmp_path):
    empty = detections.npz[EMPTY]
    assert empty["x"].shape == (0, 1024) and empty["bbox"].shape == (0, 4) and empty["cls_prob"].shape == (0, 4)
    for fmt in ("hdf5", "lmdb"):
        assert by_id(read_features(str(detections.out), fmt))[EMPTY]["num_bbox"] == 0
    entries = [json.loads(line) for line in (detections.out / "no_regions.jsonl").read_text().splitlines()]
    assert entries == [{"image_id": EMPTY, "path": str(coco_set / f"{EMPTY}.png"), "reason": "no regions",
                        "left_out_of": CONSUMER}]
    manifest = json.loads((detections.out / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 4, "written": 4, "failed": 0, "no_regions": 1,
                                  "left_out": {f: 1 for f in CONSUMER}}
    assert "no regions 1 images" in detections.stdout

    # --min-regions: the image gets its top-2 regions by score, the others keep their detections
    run = extract(model, coco_set, tmp_path / "out", "--min-regions", "2", *DETECTIONS, formats=["npz", "tsv"])
    assert run.npz[EMPTY]["num_bbox"] == 2 and run.npz[EMPTY]["cls_prob"].shape == (2, 4)
    for image_id in IMAGES:
        assert_same_records({image_id: run.npz[image_id]}, {image_id: detections.npz[image_id]})
    assert (tmp_path / "out" / "no_regions.jsonl").read_text() == ""
    assert EMPTY in consumers.lxmert(tmp_path / "out" / "features.tsv")[0]


def convert(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(CONVERT), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def assert_same_layouts(out, reference, formats):
    """The same files (bytes), and the same records in the HDF5 and LMDB layouts."""
    def files(folder):
        return {k: v for k, v in folder_bytes(folder).items()
                if k not in ("manifest.json", "no_regions.jsonl") and not k.endswith(".hdf5")
                and not k.startswith("parts/")}
    assert files(out) == {k: v for k, v in files(reference).items()
                          if k.split("/")[0] in [LAYOUTS[f].output_name for f in formats] or k == "failures.jsonl"}

    def no_regions(folder):
        entries = [json.loads(line) for line in (folder / "no_regions.jsonl").read_text().splitlines()]
        return [dict(e, left_out_of=set(e["left_out_of"]) & set(formats)) for e in entries]
    assert no_regions(out) == no_regions(reference)
    for fmt in {"hdf5", "lmdb", "ban_hdf5"} & set(formats):
        name = LAYOUTS[fmt].output_name
        got, want = list(read_features(str(out / name), fmt)), list(read_features(str(reference / name), fmt))
        assert [r["image_id"] for r in got] == [r["image_id"] for r in want]
        assert_same_records(by_id(got), by_id(want))


def test_convert_equals_direct_extraction(detections, tmp_path):
    out, source = tmp_path / "out", "hdf5"
    result = convert(detections.out, "--format", ",".join(ALL), "--output", out)
    assert result.returncode == 0, result.stderr
    assert "4 images, 1 without regions" in result.stdout
    assert_same_layouts(out, detections.out, ALL)
    manifest = json.loads((out / "manifest.json").read_text())
    direct = json.loads((detections.out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"] == direct["counts"]
    assert manifest["config_sha256"] == direct["config_sha256"] and manifest["converted_from"]["format"] == source
    # a finished conversion resumed changes nothing
    before = folder_bytes(out)
    assert convert(detections.out, "--format", ",".join(ALL), "--output", out, "--resume").returncode == 0
    assert folder_bytes(out) == before
    # from the npz folder (image id order, here the input order too), in process
    convert_in_process(detections.out, ALL, str(tmp_path / "from_npz"), source_format="npz")
    assert_same_layouts(tmp_path / "from_npz", detections.out, ALL)


def test_convert_refuses_what_the_source_cannot_give(detections, tmp_path):
    # the TSV holds no class probabilities: uniter names the config key that gives them
    result = convert(detections.out, "--format", "uniter", "--output", tmp_path / "a", "--source-format", "tsv")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "uniter needs class probabilities, which SELECTION detections gives only with " \
        "MODEL.REGION_FEATURES.CLASS_PROBS True" in result.stderr
    assert not (tmp_path / "a").exists()
    cases = {
        "holds pickles": dict(in_dir=detections.out, source_format="mmf"),
        "no finished extraction": dict(in_dir=tmp_path),
        "lacks image_h, image_w, bbox, objects_id": dict(in_dir=detections.out, source_format="uniter"),
    }
    for message, case in cases.items():
        with pytest.raises(ConversionError, match=message):
            convert_in_process(case.pop("in_dir"), ["tsv"], str(tmp_path / "b"), **case)
    assert not (tmp_path / "b").exists()
    # --id int on the converted ids; tsv then holds integer ids
    convert_in_process(detections.out, ["tsv"], str(tmp_path / "d"), id_mode="int")
    assert sorted(consumers.lxmert(tmp_path / "d" / "features.tsv")[0]) == ["1", "2", "3"]


def test_sigkill_then_resume_consumer_layouts(model, coco_set, detections, tmp_path):
    formats = ["butd_tsv", "oscar", "mmf", "ban_hdf5", "uniter"]
    out = tmp_path / "out"
    args = tool_args(model, coco_set, out, *DETECTIONS, formats=formats)
    part = out / "parts" / "oscar.0-of-1"
    assert run_and_kill(args, lambda: part.exists() and part.stat().st_size > 0), "ended before the kill"
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    with open(part, "ab") as f:
        f.write(b"\x07torn frame")  # a half-written journal frame
    result = run_tool(*tool_args(model, coco_set, out, "--resume", *DETECTIONS, formats=formats))
    assert result.returncode == 0, result.stderr
    assert_same_layouts(out, detections.out, formats)

    # a conversion killed half-way resumes to the same files
    converted = tmp_path / "converted"
    part = converted / "parts" / "butd_tsv.0-of-1"
    args = [sys.executable, str(CONVERT), str(detections.out), "--format", "butd_tsv,visualbert,oscar",
            "--output", str(converted)]
    run_and_kill(args, lambda: part.exists() and part.stat().st_size > 0)
    result = convert(detections.out, "--format", "butd_tsv,visualbert,oscar", "--output", converted, "--resume")
    assert result.returncode == 0, result.stderr
    assert_same_layouts(converted, detections.out, ["butd_tsv", "visualbert", "oscar"])


def test_ids(model, coco_set, tmp_path, tool_main, capsys):
    folder = tmp_path / "plain"
    for name in ("cat", "dog7"):
        save_bgr(folder / f"{name}.png", generated(1, 64, 64))
    out = tmp_path / "out"
    # --id int on a stem without digits: one line, before anything is written
    code, err = error_of(tool_main, capsys, tool_args(model, folder, out, "--id", "int", formats=["npz"]))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--id int: {folder / 'cat.png'}: image id 'cat' does not end in digits" in err
    # a layout with integer ids, by default
    code, err = error_of(tool_main, capsys, tool_args(model, folder, out, formats=["npz", "butd_tsv"]))
    assert code == 2 and "--format butd_tsv: image id 'cat' does not end in digits" in err
    # two inputs with the same id: as integers, or in a layout
    save_bgr(folder / "x" / "dog07.png", generated(1, 64, 64))
    (folder / "cat.png").unlink()
    code, err = error_of(tool_main, capsys, tool_args(model, folder, out, "--id", "int", formats=["npz"]))
    assert code == 2 and "two inputs get image id '7'" in err
    code, err = error_of(tool_main, capsys, tool_args(model, folder, out, formats=["vilbert"]))
    assert code == 2 and "vilbert: images 'dog7' and 'x/dog07' both get id '7'" in err
    code, err = error_of(tool_main, capsys, tool_args(model, folder, out, formats=["visualbert"]))
    assert code == 2 and "visualbert: its files lie in one folder, and image id 'x/dog07' holds a '/'" in err
    code, err = error_of(tool_main, capsys, tool_args(model, folder, out, *REGIONS[:2], "MODEL.REGION_FEATURES.SELECTION",
                                                      "detections", formats=["uniter"]))
    assert code == 2 and "--format uniter needs class probabilities" in err
    assert not out.exists()


def test_ids_of_every_input_kind(coco_set, tmp_path):
    names = sorted(p.name for p in coco_set.iterdir())
    coco = {"images": [{"id": 100 + i, "file_name": name} for i, name in enumerate(names)]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    (tmp_path / "list.txt").write_text("".join(f"{coco_set / n}\n" for n in names))
    DatasetCatalog.register("formats_test_set", lambda: [
        {"file_name": str(coco_set / n), "image_id": 100 + i} for i, n in enumerate(names)])
    stems = [n[: -len(".png")] for n in names]
    try:
        for source in (coco_set, str(coco_set / "*.png"), tmp_path / "list.txt"):
            assert [i.image_id for i in list_inputs(str(source), id_mode="stem")] == stems
            assert [i.image_id for i in list_inputs(str(source), id_mode="int")] == ["1", "2", "3", "9"]
        for source in (str(tmp_path / "coco.json"), "formats_test_set"):
            assert [i.image_id for i in list_inputs(source, image_root=str(coco_set))] == ["100", "101", "102", "103"]
            assert [i.image_id for i in list_inputs(source, str(coco_set), id_mode="int")] == ["100", "101", "102", "103"]
            assert [i.image_id for i in list_inputs(source, str(coco_set), id_mode="stem")] == stems
    finally:
        DatasetCatalog.remove("formats_test_set")


class Payload:
    """A pickle that, when loaded, creates a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_reading_never_unpickles(detections, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(detections.out, out)
    marker = tmp_path / "pickle-ran"
    evil = pickle.dumps(Payload(marker))
    (out / "ban" / "features_imgid2idx.pkl").write_bytes(evil)
    info = np.array(Payload(marker), dtype=object)
    np.save(out / "mmf" / "COCO_val2014_000000000001_info.npy", info, allow_pickle=True)
    np.save(out / "vilbert" / "1.npy", info, allow_pickle=True)
    np.save(out / "visualbert" / "COCO_val2014_000000000001.npy", info, allow_pickle=True)

    assert len(list(read_features(str(out), "ban_hdf5"))) == 3
    for fmt in ("mmf", "vilbert"):
        with pytest.raises(WriteOnlyLayoutError):
            list(read_features(str(out), fmt))
    with pytest.raises(ValueError, match="allow_pickle"):
        list(read_features(str(out), "visualbert"))
    assert not marker.exists()
    # the payload does run when a consumer loads it
    with open(out / "ban" / "features_imgid2idx.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_records_carry_attributes(tmp_path):
    """The extractor copies the attribute head's outputs; the layouts store them."""
    instances = Instances((20, 30))
    instances.pred_boxes = Boxes(torch.tensor([[1.0, 2.0, 10.0, 12.0], [0.0, 0.0, 5.0, 5.0]]))
    instances.scores = torch.tensor([0.9, 0.4])
    instances.pred_classes = torch.tensor([2, 0])
    instances.box_features = torch.arange(6.0).view(2, 3)
    instances.class_probs = torch.tensor([[0.0, 0.05, 0.9, 0.05], [0.4, 0.3, 0.2, 0.1]])
    instances.attr_probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]])
    instances.attrs_id = torch.tensor([1, 0])
    instances.attrs_conf = torch.tensor([0.7, 0.5])
    extractor = BatchExtractor.__new__(BatchExtractor)
    extractor.fp16 = False
    item = SimpleNamespace(image_id="COCO_val2014_000000000005", path="x.png")
    record = extractor._record({"item": item, "height": 20, "width": 30}, instances)
    assert record["attrs_id"].dtype == np.int64 and record["attrs_conf"].dtype == np.float32
    np.testing.assert_array_equal(record["attr_prob"], instances.attr_probs.numpy())

    outputs = RankFiles(str(tmp_path), ["npz", "tsv", "hdf5", "lmdb"], 0, 1)
    outputs.store([record])
    outputs.close()
    merge_outputs(str(tmp_path), ["npz", "tsv", "hdf5", "lmdb"], 1)
    for fmt in ("npz", "hdf5", "lmdb"):
        (got,) = read_features(str(tmp_path / LAYOUTS[fmt].output_name), fmt)
        assert_same_records({1: got}, {1: record})
    _, (row,) = consumers.lxmert(tmp_path / "features.tsv")
    np.testing.assert_array_equal(row["attrs_id"], [1, 0])
    np.testing.assert_array_equal(row["attrs_conf"], np.float32([0.7, 0.5]))


def synthetic_record(index, n, dim=8, classes=3):
    rng = np.random.default_rng(index)
    xy = rng.uniform(0, 50, size=(n, 2)).astype(np.float32)
    probs = rng.dirichlet(np.ones(classes + 1), size=n).astype(np.float32)
    return {
        "image_id": f"COCO_val2014_{index:012d}", "image_h": 80, "image_w": 90, "num_bbox": n,
        "x": rng.normal(size=(n, dim)).astype(np.float32),
        "bbox": np.concatenate([xy, xy + rng.uniform(1, 30, size=(n, 2)).astype(np.float32)], axis=1),
        "objects_id": probs[:, :-1].argmax(1).astype(np.int64), "objects_conf": probs[:, :-1].max(1),
        "cls_prob": probs,
    }


def write_ranks(out, records, world_size):
    out.mkdir()
    share = -(-len(records) // world_size)
    for rank in range(world_size):
        outputs = RankFiles(str(out), ALL, rank, world_size)
        outputs.store(records[rank * share: (rank + 1) * share])
        outputs.close()
    return merge_outputs(str(out), ALL, world_size, Vocabularies(["disc", "star", "square"]))


def test_rank_parts_merge_as_one_process(tmp_path):
    """Every layout: two ranks' parts merge into what one process writes; MIN_REGIONS is checked."""
    records = [synthetic_record(i, n) for i, n in enumerate([3, 0, 5, 2, 4], start=1)]
    one, two = tmp_path / "one", tmp_path / "two"
    counts = write_ranks(one, records, 1)
    assert counts == write_ranks(two, records, 2) == {
        "failed": 0, "no_regions": 1, "left_out": {f: 1 for f in CONSUMER}}
    assert_same_layouts(two, one, ALL)
    assert sorted(os.listdir(one / "ban")) == ["features.hdf5", "features_imgid2idx.pkl"]
    for image_id, (*_, od_labels) in consumers.oscar(str(one / "oscar")).items():
        record = by_id(records)[image_id]
        assert od_labels.split() == [["disc", "star", "square"][c] for c in record["objects_id"]]
    for fmt in ("npz", "hdf5", "lmdb"):
        assert_same_records(by_id(read_features(str(one / LAYOUTS[fmt].output_name), fmt)),
                            {r["image_id"]: r for r in records})

    cfg = make_cfg("fpn", MIN_REGIONS=-1)
    with pytest.raises(ValueError, match="MODEL.REGION_FEATURES.MIN_REGIONS must be >= 0"):
        region_features_node(cfg)


def test_min_regions_raises_the_regions_mode_minimum(model):
    """SELECTION regions: MIN_REGIONS above MIN_BOXES/MAX_BOXES (3/8) gives that many regions."""
    predictor = model.predictor.model.roi_heads.box_predictor
    bgr = generated(*IMAGES["COCO_val2014_000000000001"])
    assert 3 <= len(model.predictor(bgr)["instances"]) <= 8
    predictor.min_regions = 12
    try:
        instances = model.predictor(bgr)["instances"]
    finally:
        predictor.min_regions = 0
    assert len(instances) == 12 and instances.has("class_probs")


@pytest.mark.parametrize("counts", [[3, 0, 5, 2, 4], [4, 4, 4]], ids=["adaptive", "fixed"])
def test_hdf5_layouts_merge_the_same_in_small_slabs(counts, tmp_path, monkeypatch):
    """The HDF5 merges append in slabs; a slab a record gives the same records."""
    records = [synthetic_record(i, n) for i, n in enumerate(counts, start=1)]
    write_ranks(tmp_path / "one_slab", records, 1)
    for fmt in ("hdf5", "ban_hdf5"):
        monkeypatch.setattr(LAYOUTS[fmt], "slab_bytes", 1)
    write_ranks(tmp_path / "slabs", records, 1)
    for fmt in ("hdf5", "ban_hdf5"):
        name = LAYOUTS[fmt].output_name
        got = list(read_features(str(tmp_path / "slabs" / name), fmt))
        want = list(read_features(str(tmp_path / "one_slab" / name), fmt))
        assert [r["image_id"] for r in got] == [r["image_id"] for r in want]
        assert [len(r["x"]) for r in got] == [n for n in counts if n or LAYOUTS[fmt].keeps_empty]
        assert_same_records(by_id(got), by_id(want))
    assert os.listdir(tmp_path / "slabs" / "ban") == os.listdir(tmp_path / "one_slab" / "ban")
