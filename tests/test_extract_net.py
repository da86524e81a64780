"""
tools/extract_net.py end to end, on a small random-init model: every format read back and
equal to DefaultPredictor, LXMERT's TSV reader, SIGKILL + --resume, bad images, bad
settings, and a 2-process gloo run.
"""
import base64
import csv
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from d2_regionfeat.extraction.inputs import ImageItem, InputError, list_inputs
from d2_regionfeat.formats.npz import NpzLayout
from d2_regionfeat.formats.safety import LineLog, RecordJournal
from d2_regionfeat.io import TSV_FIELDNAMES, read_features
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image

from helpers import image

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "extract_net.py"
FORMATS = ["npz", "tsv", "hdf5", "lmdb"]
# (seed, height, width) of the image set: sizes that pad to different shapes, one nested.
IMAGES = {"a": (1, 120, 170), "b": (2, 150, 110), "sub/c": (3, 125, 165), "d": (4, 100, 190), "e": (5, 131, 160)}

pytestmark = pytest.mark.timeout(600)


def tool_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # the same threads per process in every run: CPU convolutions then agree to the bit
    env["OMP_NUM_THREADS"] = "1"
    return env


def tool_args(model, source, out, *more, formats=FORMATS):
    return [
        sys.executable, str(TOOL), "--config-file", str(model.yaml), "--input", str(source),
        "--output", str(out), "--format", ",".join(formats), "--batch-size", "2",
        "--num-workers", "1", *more,
    ]


def run_tool(*args, **kwargs):
    return subprocess.run(args, env=tool_env(), capture_output=True, text=True, timeout=400, **kwargs)


def save_bgr(path, bgr, **save_args):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])).save(path, **save_args)


def generated(seed, height, width):
    """(H, W, 3) uint8 BGR image."""
    return image(seed, height, width).permute(1, 2, 0).numpy().astype(np.uint8)


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for name, spec in IMAGES.items():
        save_bgr(folder / f"{name}.png", generated(*spec))
    return folder


@pytest.fixture(scope="module")
def reference(model, image_set, tmp_path_factory):
    """An uninterrupted 1-process run over the image set, every format."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = run_tool(*tool_args(model, image_set, out))
    assert result.returncode == 0, result.stderr
    return SimpleNamespace(out=out, stdout=result.stdout)


def by_id(records):
    return {r["image_id"]: r for r in records}


def assert_record_is_prediction(record, predictor, bgr):
    """``record`` holds what DefaultPredictor gives on the BGR image."""
    instances = predictor(bgr)["instances"].to("cpu")
    assert (record["image_h"], record["image_w"]) == bgr.shape[:2]
    assert record["num_bbox"] == len(instances) == len(record["x"])
    np.testing.assert_array_equal(record["objects_id"], instances.pred_classes.numpy())
    np.testing.assert_allclose(record["objects_conf"], instances.scores.numpy(), rtol=1e-4, atol=1e-5)
    # batched convolutions differ from single-image ones by float noise only
    np.testing.assert_allclose(record["bbox"], instances.pred_boxes.tensor.numpy(), rtol=1e-4, atol=1e-2)
    features = instances.box_features.numpy()
    atol = 1e-3 * max(1.0, float(np.abs(features).max()))
    np.testing.assert_allclose(record["x"].astype(np.float32), features, rtol=1e-4, atol=atol)
    if "cls_prob" in record:
        np.testing.assert_allclose(record["cls_prob"], instances.class_probs.numpy(), rtol=1e-4, atol=1e-5)


def assert_same_records(left, right):
    assert left.keys() == right.keys()
    for image_id, record in left.items():
        other = right[image_id]
        for key in record.keys() & other.keys():
            np.testing.assert_array_equal(record[key], other[key], err_msg=f"{image_id} {key}")


def test_every_format_reads_back_as_default_predictor(model, image_set, reference):
    records = {fmt: by_id(read_features(str(reference.out), fmt)) for fmt in FORMATS}
    for fmt, got in records.items():
        assert sorted(got) == sorted(IMAGES), fmt
    for name, spec in IMAGES.items():
        bgr = read_image(str(image_set / f"{name}.png"), "BGR")
        np.testing.assert_array_equal(bgr, generated(*spec))
        assert_record_is_prediction(records["npz"][name], model.predictor, bgr)
        assert set(records["npz"][name]) >= {"x", "bbox", "num_bbox", "image_h", "image_w", "cls_prob"}
    for fmt in ("tsv", "hdf5", "lmdb"):
        assert_same_records(records["npz"], records[fmt])
    # the TSV keeps the input order; attributes are zeros
    assert [r["image_id"] for r in read_features(str(reference.out / "features.tsv"))] == sorted(IMAGES)
    for r in records["tsv"].values():
        assert not r["attrs_id"].any() and not r["attrs_conf"].any()
    # npz files load without pickles
    with np.load(reference.out / "npz" / "sub" / "c.npz") as npz:
        assert npz["x"].dtype == np.float32 and int(npz["num_bbox"]) == len(npz["bbox"])
    manifest = json.loads((reference.out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"] == {
        "inputs": 5, "written": 5, "failed": 0, "no_regions": 0, "left_out": {"tsv": 0}}
    assert manifest["feature_dim"] == records["npz"]["a"]["x"].shape[1] == 1024
    assert manifest["formats"] == FORMATS and set(manifest["format_versions"]) == set(FORMATS)
    assert manifest["weights_sha256"] == hashlib.sha256(Path(model.cfg.MODEL.WEIGHTS).read_bytes()).hexdigest()
    assert manifest["versions"]["torch"] and manifest["versions"]["detectron2"]
    assert not (reference.out / "parts").exists()
    assert (reference.out / "failures.jsonl").read_text() == ""
    assert "done 5, skipped 0" in reference.stdout and "regions    per image min" in reference.stdout


def load_obj_tsv(fname):
    """LXMERT's reader (src/utils.py), as it is."""
    data = []
    csv.field_size_limit(sys.maxsize)
    with open(fname) as f:
        reader = csv.DictReader(f, TSV_FIELDNAMES, delimiter="\t")
        for item in reader:
            for key in ["img_h", "img_w", "num_boxes"]:
                item[key] = int(item[key])
            boxes = item["num_boxes"]
            decode_config = [
                ("objects_id", (boxes,), np.int64),
                ("objects_conf", (boxes,), np.float32),
                ("attrs_id", (boxes,), np.int64),
                ("attrs_conf", (boxes,), np.float32),
                ("boxes", (boxes, 4), np.float32),
                ("features", (boxes, -1), np.float32),
            ]
            for key, shape, dtype in decode_config:
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype)
                item[key] = item[key].reshape(shape)
                item[key].setflags(write=False)
            data.append(item)
    return data


def test_lxmert_reader_reads_the_tsv(reference):
    assert TSV_FIELDNAMES == [
        "img_id", "img_h", "img_w", "objects_id", "objects_conf",
        "attrs_id", "attrs_conf", "num_boxes", "boxes", "features",
    ]
    records = by_id(read_features(str(reference.out), "npz"))
    items = load_obj_tsv(reference.out / "features.tsv")
    assert [item["img_id"] for item in items] == sorted(IMAGES)
    for item in items:
        record = records[item["img_id"]]
        assert (item["img_h"], item["img_w"], item["num_boxes"]) == (
            record["image_h"], record["image_w"], record["num_bbox"])
        np.testing.assert_array_equal(item["features"], record["x"])
        np.testing.assert_array_equal(item["boxes"], record["bbox"])
        np.testing.assert_array_equal(item["objects_id"], record["objects_id"])
        np.testing.assert_array_equal(item["objects_conf"], record["objects_conf"])
        assert item["attrs_id"].shape == (item["num_boxes"],) and not item["attrs_id"].any()


def folder_bytes(folder):
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix not in (".h5", ".mdb")
    }


def assert_same_output(out, reference_out):
    """Same files (npz, tsv, failures, manifest), the same hdf5/lmdb records in the same order."""
    assert folder_bytes(out) == folder_bytes(reference_out)
    for fmt in ("hdf5", "lmdb"):
        got, want = list(read_features(str(out), fmt)), list(read_features(str(reference_out), fmt))
        assert [r["image_id"] for r in got] == [r["image_id"] for r in want]
        assert_same_records(by_id(got), by_id(want))


def run_and_kill(args, condition):
    """Run the tool; SIGKILL it and its decoding workers once ``condition()`` holds.
    Returns whether it was killed (False: it had finished first)."""
    proc = subprocess.Popen(
        args, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not condition():
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed


def test_sigkill_then_resume_gives_identical_outputs(model, image_set, reference, tmp_path):
    out = tmp_path / "out"
    tsv_part = out / "parts" / "tsv.0-of-1"

    def npz_count():
        return len(list((out / "npz").rglob("*.npz"))) if (out / "npz").exists() else 0

    # first kill: once a batch is in the TSV part (the formats after it may lack it)
    killed = run_and_kill(tool_args(model, image_set, out), lambda: tsv_part.exists() and tsv_part.stat().st_size)
    assert killed, "the run ended before it could be killed"
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and tsv_part.read_text().count("\n") >= 1
    # without --resume the folder is refused and left as it is
    before = folder_bytes(out)
    result = run_tool(*tool_args(model, image_set, out))
    assert result.returncode == 2 and "--resume" in result.stderr
    assert folder_bytes(out) == before

    # second kill: in the resumed run, as soon as it has written another npz file
    first = npz_count()
    run_and_kill(tool_args(model, image_set, out, "--resume"), lambda: npz_count() > first)
    result = run_tool(*tool_args(model, image_set, out, "--resume"))
    assert result.returncode == 0, result.stderr
    assert_same_output(out, reference.out)
    # resuming a finished run does nothing and changes nothing
    result = run_tool(*tool_args(model, image_set, out, "--resume"))
    assert result.returncode == 0 and "done 0, skipped 5" in result.stdout
    assert_same_output(out, reference.out)


def test_inputs_checksum_is_the_listing_joined(image_set, reference):
    """The manifest's inputs_sha256 (hashed line by line) is the digest of the listing's text, so
    that folders written before resume as they did."""
    text = "\n".join(f"{i.image_id}\t{i.path}" for i in list_inputs(str(image_set)))
    manifest = json.loads((reference.out / "manifest.json").read_text())
    assert manifest["inputs_sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_torn_records_are_cut_off_on_recovery(tmp_path):
    log = LineLog(str(tmp_path / "log"), lambda line: line.split("\t")[0])
    log.append([b"a\t1\n", b"b\t2\n"])
    log.close()
    with open(tmp_path / "log", "a") as f:
        f.write("c\t3")  # killed mid-line
    assert LineLog(str(tmp_path / "log"), lambda line: line.split("\t")[0]).ids == {"a", "b"}
    assert (tmp_path / "log").read_text() == "a\t1\n" "b\t2\n"

    record = {"image_id": "x", "image_h": 5, "image_w": 6, "num_bbox": 1, "x": np.ones((1, 3), np.float32),
              "bbox": np.zeros((1, 4), np.float32), "objects_id": np.zeros(1, np.int64),
              "objects_conf": np.ones(1, np.float32)}
    journal = RecordJournal(str(tmp_path / "journal"))
    journal.append([("x", b"payload"), ("y", b"more")])
    journal.close()
    whole = (tmp_path / "journal").read_bytes()
    for torn in (whole[:-1], whole[:-3] + b"XYZ"):  # cut short; last frame corrupted
        (tmp_path / "journal").write_bytes(torn)
        assert RecordJournal(str(tmp_path / "journal")).ids == {"x"}
        assert (tmp_path / "journal").read_bytes() == whole[: len(whole) - len(b"more") - 17]

    writer = NpzLayout(str(tmp_path / "out"), 0, 1)
    writer.write([record])
    (tmp_path / "out" / "npz" / "y.npz.0.tmp").write_bytes(b"half")
    assert NpzLayout(str(tmp_path / "out"), 0, 1).written() == {"x"}
    assert sorted(p.name for p in (tmp_path / "out" / "npz").iterdir()) == ["x.npz"]


def test_every_kind_of_input_source_is_listed(tmp_path):
    for name in ("x/1.jpg", "x/2.png", "x/deep/3.JPG", "x/notes.txt", "y/1.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    x = tmp_path / "x"
    folder = list_inputs(str(x))
    assert [(i.image_id, i.path) for i in folder] == [
        ("1", str(x / "1.jpg")), ("2", str(x / "2.png")), ("deep/3", str(x / "deep" / "3.JPG"))]
    assert [i.image_id for i in list_inputs(str(x / "**" / "*.*g"))] == ["1", "2"]
    assert list_inputs(str(x), limit=2) == folder[:2]

    (tmp_path / "list.txt").write_text("x/2.png\n\ny/1.png\n")
    listed = list_inputs(str(tmp_path / "list.txt"))
    assert [(i.image_id, i.error) for i in listed] == [("2", None), ("1", None)]
    assert list_inputs(str(x / "2.png")) == [ImageItem("2", str(x / "2.png"))]
    # two inputs with the same id: an error before any work
    (tmp_path / "list.txt").write_text("x/2.png\ny/1.png\nx/1.jpg\n")
    with pytest.raises(InputError, match=f"two inputs get image id '1': {tmp_path / 'y' / '1.png'} and {x / '1.jpg'}"):
        list_inputs(str(tmp_path / "list.txt"))

    coco = {"images": [{"id": 42, "file_name": "1.jpg"}, {"id": 7, "file_name": "deep/3.JPG"}]}
    (x / "instances.json").write_text(json.dumps(coco))
    assert list_inputs(str(x / "instances.json")) == [
        ImageItem("42", str(x / "1.jpg")), ImageItem("7", str(x / "deep" / "3.JPG"))]
    assert list_inputs(str(x / "instances.json"), image_root="/data")[0].path == "/data/1.jpg"

    DatasetCatalog.register("extract_net_test_set", lambda: [{"file_name": str(x / "2.png"), "image_id": 5}])
    try:
        assert list_inputs("extract_net_test_set") == [ImageItem("5", str(x / "2.png"))]
    finally:
        DatasetCatalog.remove("extract_net_test_set")


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory):
    """Images in every awkward encoding, and files that are no images."""
    folder = tmp_path_factory.mktemp("bad")
    rgb = generated(7, 110, 150)[:, :, ::-1]
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    rgba = Image.fromarray(rgb).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png", transparency=0)
    gray8 = np.asarray(Image.fromarray(rgb).convert("L"))
    Image.fromarray(gray8.astype(np.uint16) * 257).save(folder / "gray16.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated by 90 degrees
    Image.fromarray(rgb).save(folder / "exif.jpg", exif=exif, quality=95)
    Image.fromarray(rgb).save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    os.symlink(folder / "missing.png", folder / "dangling.png")
    return SimpleNamespace(folder=folder, gray8=gray8)


def test_bad_inputs_are_processed_or_recorded(model, bad_set, tmp_path):
    out = tmp_path / "out"
    result = run_tool(*tool_args(model, bad_set.folder, out, "--fp16", formats=["npz", "tsv"]))
    assert result.returncode == 0, result.stderr
    failures = {f["id"]: f["reason"] for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert sorted(failures) == ["dangling", "empty", "text", "truncated"]
    assert "FileNotFoundError" in failures["dangling"]
    assert failures["empty"] == "ValueError: empty file"
    assert "cannot identify image file" in failures["text"]
    assert "truncated" in failures["truncated"]
    assert all("\n" not in reason for reason in failures.values())

    records = by_id(read_features(str(out), "npz"))
    assert sorted(records) == ["cmyk", "exif", "gray", "gray16", "palette", "rgba"]
    # --fp16 stores float16 features; the TSV keeps float32 for its readers
    assert {r["x"].dtype for r in records.values()} == {np.dtype(np.float16)}
    for r in read_features(str(out), "tsv"):
        np.testing.assert_array_equal(r["x"], records[r["image_id"]]["x"].astype(np.float32))
    for name in ("cmyk", "exif", "gray", "palette", "rgba"):
        path = next(bad_set.folder.glob(name + ".*"))
        assert_record_is_prediction(records[name], model.predictor, read_image(str(path), "BGR"))
    assert (records["exif"]["image_h"], records["exif"]["image_w"]) == (150, 110)
    gray16_as_bgr = np.repeat(bad_set.gray8[:, :, None], 3, axis=2)
    assert_record_is_prediction(records["gray16"], model.predictor, gray16_as_bgr)
    assert "failed 4" in result.stdout

    # --strict turns failures into exit status 1 (nothing left to do on resume)
    result = run_tool(*tool_args(model, bad_set.folder, out, "--resume", "--strict", "--fp16", formats=["npz", "tsv"]))
    assert result.returncode == 1 and "done 0, skipped 10" in result.stdout


def test_nothing_extracted_is_an_error(model, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    result = run_tool(*tool_args(model, tmp_path / "in", tmp_path / "out", formats=["tsv"]))
    assert result.returncode == 1
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["written"] == 0


@pytest.fixture(scope="module")
def tool_main():
    spec = importlib.util.spec_from_file_location("extract_net", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def error_of(tool_main, capsys, argv):
    """The exit status and the stderr of the tool run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        tool_main(argv[2:])
    return exit_info.value.code, capsys.readouterr().err


def test_bad_settings_give_one_error_line(model, image_set, reference, tmp_path, tool_main, capsys):
    out = tmp_path / "out"
    args = tool_args(model, image_set, out)
    # detectron2's own flags and --opts are parsed as in train_net
    code, err = error_of(tool_main, capsys, args + ["--batch-size", "0"])
    assert code == 2 and err.strip().splitlines()[-1].endswith("--batch-size: must be >= 1, got 0")
    cases = [  # (message, argv): a list, as two cases share a message
        ("weights file /no/such/model.pth not found", args + ["MODEL.WEIGHTS", "/no/such/model.pth"]),
        ("config options MODEL.NO_SUCH_KEY 1: Non-existent key: MODEL.NO_SUCH_KEY", args + ["--opts", "MODEL.NO_SUCH_KEY", "1"]),
        ("--format must be among npz, tsv, lmdb, hdf5", args + ["--format", "csv"]),
        ("MODEL.META_ARCHITECTURE RetinaNet has no ROI heads", args + ["MODEL.META_ARCHITECTURE", "RetinaNet"]),
        ("--format must be among npz, tsv, lmdb, hdf5", args + ["--format", "npz", "csv"]),
        ("no folder, file, glob or registered dataset", [*args[:5], str(tmp_path / "none"), *args[6:]]),
        ("--eval-only is tools/train_net.py's (evaluation)", args + ["--eval-only"]),
    ]
    for message, argv in cases:
        code, err = error_of(tool_main, capsys, argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()

    # a folder written by another config is refused, and left as it is
    shutil.copytree(reference.out, out)
    before = folder_bytes(out)
    code, err = error_of(tool_main, capsys, args + ["--resume", "MODEL.REGION_FEATURES.MAX_BOXES", "9"])
    assert code == 2 and "written by another run (its config, config overrides differ" in err and len(err.splitlines()) == 1
    code, err = error_of(tool_main, capsys, args + ["--resume", "--limit", "2"])
    assert code == 2 and "inputs (--input, --limit)" in err
    assert folder_bytes(out) == before

    # the same, as a process: one line on stderr, no traceback
    result = run_tool(*args, "--resume", "MODEL.REGION_FEATURES.MAX_BOXES", "9")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_plain_heads_are_enabled(model, image_set, reference, tmp_path, tool_main):
    """
    The tools' model with its plain StandardROIHeads named: enabled (the INFO line is
    tests/test_model_config.py's), the same features.
    """
    out = tmp_path / "out"
    argv = tool_args(model, image_set, out, "--limit", "2", "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
                     formats=["npz"])
    assert tool_main(argv[2:]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config_overrides"][-2:] == ["MODEL.ROI_HEADS.NAME", "StandardROIHeads"]
    assert "NAME: FeatureROIHeads" in manifest["config"] and "BASE_ROI_HEADS: StandardROIHeads" in manifest["config"]
    got = by_id(read_features(str(out), "npz"))
    want = by_id(read_features(str(reference.out), "npz"))
    assert sorted(got) == ["a", "b"]
    assert_same_records(got, {i: want[i] for i in got})


def test_two_processes_equal_one(model, image_set, reference, tmp_path):
    out = tmp_path / "out"
    result = run_tool(*tool_args(model, image_set, out, "--num-gpus", "2", "--device", "cpu", "--dist-url", "auto"))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["counts"]["written"] == 5
    assert not (out / "parts").exists()
    (out / "manifest.json").write_text(json.dumps(dict(manifest, world_size=1), indent=2, sort_keys=True) + "\n")
    assert_same_output(out, reference.out)


def test_class_names_file_reaches_the_manifest_and_oscar(model, image_set, tmp_path):
    """MODEL.REGION_FEATURES.CLASS_NAMES_FILE: the names are in manifest.json and the oscar labels."""
    vocab = tmp_path / "objects_vocab.txt"
    vocab.write_text("red ball,ball\ntable, desk\nsky\n")
    out = tmp_path / "out"
    result = run_tool(*tool_args(
        model, image_set, out, "--limit", "2", "MODEL.REGION_FEATURES.CLASS_NAMES_FILE", str(vocab),
        "DATASETS.TEST", "('mydata',)", formats=["oscar", "npz"],
    ))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    names = ["red ball", "table", "sky"]
    assert manifest["class_names"] == names and "class_names_missing" not in manifest
    assert manifest["region_fields"]["class_probs"] == "(M, 4)"
    npz = by_id(read_features(str(out), "npz"))
    for line in (out / "oscar" / "labels.tsv").read_text().splitlines():
        image_id, labels = line.split("\t")
        assert [label["class"] for label in json.loads(labels)] == [
            names[c] for c in npz[image_id]["objects_id"]]


def test_butd_selection_feeds_uniter_without_class_probs_key(model, image_set, tmp_path):
    """SELECTION butd gives class probabilities (its model says so) even with CLASS_PROBS False;
    only "detections" without CLASS_PROBS is refused, and a model without names says so."""
    out = tmp_path / "out"
    result = run_tool(*tool_args(
        model, image_set, out, "--limit", "2", "MODEL.REGION_FEATURES.SELECTION", "butd",
        "MODEL.REGION_FEATURES.CLASS_PROBS", "False", "MODEL.META_ARCHITECTURE", "RegionFeatureRCNN", formats=["uniter", "oscar", "npz"],
    ))
    assert result.returncode == 0, result.stderr
    npz = by_id(read_features(str(out), "npz"))
    uniter = by_id(read_features(str(out), "uniter"))
    assert sorted(uniter) == sorted(i for i, r in npz.items() if r["num_bbox"])
    for image_id, record in uniter.items():
        np.testing.assert_array_equal(record["cls_prob"], npz[image_id]["cls_prob"].astype(np.float16))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["class_names"] is None and "CLASS_NAMES_FILE" in manifest["class_names_missing"]
    for line in (out / "oscar" / "labels.tsv").read_text().splitlines():
        image_id, labels = line.split("\t")
        assert [label["class"] for label in json.loads(labels)] == [
            f"class_{c}" for c in npz[image_id]["objects_id"]]

    refused = run_tool(*tool_args(
        model, image_set, tmp_path / "refused", "MODEL.REGION_FEATURES.SELECTION", "detections",
        formats=["uniter"],
    ))
    assert refused.returncode == 2 and "--format uniter needs class probabilities" in refused.stderr
