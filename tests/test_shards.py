"""
Web scale: webdataset tar shards in (with a corrupt member and a truncated tar), output shards
out; they equal a folder extraction, survive SIGKILL + rerun, split over independent workers;
ids from the json, carried metadata, reading back by id and as a stream; CUDA out of memory
through a stand-in extractor.
"""
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from d2_regionfeat.extraction import ExtractionError, InputError, extract, prepare_job
import d2_regionfeat.extraction.convert as convert_module
from d2_regionfeat.extraction.convert import convert as convert_features
from d2_regionfeat.extraction.manifest import OutputFolderError
from d2_regionfeat.extraction.model_call import BatchExtractor
from d2_regionfeat.extraction.model_config import ConfigError, load_model_config
from d2_regionfeat.extraction.pipeline import extract_shards
from d2_regionfeat.extraction.input_shards import expand_braces, plan_shards, select_shards, shard_items
from d2_regionfeat.extraction.inputs import Inputs
from d2_regionfeat.formats import LAYOUTS
from d2_regionfeat.formats.feature_shards import DuplicateIdError
from d2_regionfeat.io import ShardFolder, read_features

from test_extract_net import TOOL, generated, save_bgr, tool_args, tool_env, tool_main  # noqa: F401
from test_grid_formats import grid_model  # noqa: F401  (a module fixture)

# shard name -> samples (key, seed, height, width); None: a corrupt image member
SHARDS = {
    "00000": [("000000000", 1, 70, 90), ("000000001", None, 0, 0), ("000000002", 2, 80, 64)],
    "00001": [("000010000", 3, 64, 100), ("000010001", 4, 96, 72), ("000010002", 5, 72, 72)],
    "00002": [("000020000", 6, 90, 70), ("000020001", 7, 64, 64)],
}
TRUNCATED = "000010002"  # the tar of shard 00001 ends inside this sample's image

pytestmark = pytest.mark.timeout(300)


def png_bytes(bgr):
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])).save(buffer, "PNG")
    return buffer.getvalue()


def write_shard(path, samples, truncate_at=None):
    with tarfile.open(path, "w") as tar:
        for key, seed, h, w in samples:
            image = b"not an image" if seed is None else png_bytes(generated(seed, h, w))
            members = {"png": image, "json": json.dumps(sample_json(key, w)).encode(),
                       "txt": f"caption {key}".encode()}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                if key == truncate_at and ext == "png":
                    cut = tar.offset + 512 + len(data) // 2
                tar.addfile(info, io.BytesIO(data))
    if truncate_at:
        with open(path, "r+b") as f:
            f.truncate(cut)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    for name, samples in SHARDS.items():
        write_shard(folder / f"{name}.tar", samples, TRUNCATED if name == "00001" else None)
    return folder


GOOD = [k for samples in SHARDS.values() for k, seed, _, _ in samples if seed is not None and k != TRUNCATED]


def shard_args(model, shards, out, *more):
    return tool_args(model, f"{shards}/{{00000..00002}}.tar", out, *more, formats=["npz"])


def files(folder):
    return {p: (folder / p).read_bytes() for p in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def extractor(model):
    """The model as extract_net builds it, run in this process with the tool's one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield BatchExtractor(model.cfg)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tool_cfg(model):
    """The config as the tool loads it from the model's yaml."""
    return load_model_config(str(model.yaml))


def extract_here(cfg, shards, out, extractor, **options):
    return extract_shards(cfg, f"{shards}/{{00000..00002}}.tar", str(out), batch_size=2, num_workers=0,
                          extractor=extractor, **options)


@pytest.fixture(scope="module")
def clean(model, shards, extractor, tool_main, tmp_path_factory):
    """A one-worker run of the tool (in this process) over the three shards."""
    out = tmp_path_factory.mktemp("clean") / "out"
    assert tool_main(shard_args(model, shards, out)[2:]) == 0
    return out


@pytest.fixture(scope="module")
def folder_run(model, tool_main, tmp_path_factory):
    """A folder run of the tool (in this process) over the images that the shards extract."""
    folder = tmp_path_factory.mktemp("images")
    for samples in SHARDS.values():
        for key, seed, h, w in samples:
            if key in GOOD:
                save_bgr(folder / f"{key}.png", generated(seed, h, w))
    out = tmp_path_factory.mktemp("folder_run") / "out"
    assert tool_main(tool_args(model, folder, out, formats=["npz"])[2:]) == 0
    return out


def test_shards_equal_a_folder_extraction(clean, folder_run):
    out = folder_run
    assert sorted(os.listdir(clean)) == sorted(
        [f"{n}{s}" for n in SHARDS for s in (".tar", ".jsonl", ".failures.jsonl", ".counts.json")] + ["shards.json"]
    )
    members = {}
    for name in SHARDS:
        with tarfile.open(clean / f"{name}.tar") as tar:
            names = tar.getnames()
            good = [k for k, seed, _, _ in SHARDS[name] if k in GOOD]
            assert names == [f"{k}.{ext}" for k in good for ext in ("npz", "json", "txt")]
            for info in tar.getmembers():
                if info.name.endswith(".npz"):
                    members[info.name[: -len(".npz")]] = tar.extractfile(info).read()
    assert sorted(members) == sorted(GOOD)
    for key in GOOD:
        assert members[key] == (out / "npz" / f"{key}.npz").read_bytes(), key
    failures = {f["member"]: f for f in ShardFolder(str(clean)).failures()}
    assert sorted(failures) == ["000000001.png", f"{TRUNCATED}.png"]
    assert failures["000000001.png"]["shard"] == "00000"
    assert failures["000000001.png"]["reason"].startswith(
        "UnidentifiedImageError: cannot identify image file '000000001.png'"
    )
    assert failures[f"{TRUNCATED}.png"]["shard"] == "00001"
    assert "broken tar" in failures[f"{TRUNCATED}.png"]["reason"]


def split_run(clean, tmp_path):
    """The shards of ``clean`` in two folders, ``tmp_path/{a,b}/run``, each with its shards.json."""
    halves = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    for half, names in zip(halves, (["00000"], ["00001", "00002"])):
        half.mkdir(parents=True)
        (half / "shards.json").write_bytes((clean / "shards.json").read_bytes())
        for name in names:
            for suffix in (".tar", ".jsonl", ".failures.jsonl"):
                (half / f"{name}{suffix}").write_bytes((clean / f"{name}{suffix}").read_bytes())
    return halves


def assert_same_record_lists(got, want):
    assert [r["image_id"] for r in got] == [r["image_id"] for r in want]
    for a, b in zip(got, want):
        assert sorted(a) == sorted(b), a["image_id"]
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_one_reader_for_folder_runs_and_shards(clean, folder_run, tmp_path):
    """io.read_features reads a shard folder, several or a glob, as it reads the folder run (bug 8)."""
    want = list(read_features(str(folder_run)))
    assert [r["image_id"] for r in want] == sorted(GOOD)
    assert_same_record_lists(list(read_features(str(clean))), want)
    # the shards of one run in two folders, by list and by glob
    halves = split_run(clean, tmp_path)
    assert_same_record_lists(list(read_features([str(h) for h in halves])), want)
    assert_same_record_lists(list(read_features(f"{tmp_path}/*/run")), want)
    assert sorted(f["member"] for f in ShardFolder(f"{tmp_path}/*/run").failures()) == sorted(
        f["member"] for f in ShardFolder(str(clean)).failures())
    with pytest.raises(ValueError, match="is no folder of output shards"):
        list(read_features(f"{tmp_path}/none/*"))


def test_shard_counts_sum_to_the_folders(clean, folder_run, tmp_path):
    """Each shard's counts file; a folder's counts are their sum (a shard without one: counted from its index)."""
    per_shard = {n: json.loads((clean / f"{n}.counts.json").read_text()) for n in SHARDS}
    assert {n: (c["images"], c["written"], c["failed"]) for n, c in per_shard.items()} == {
        "00000": (3, 2, 1), "00001": (3, 2, 1), "00002": (2, 2, 0)}
    boxes = [len(r["x"]) for r in read_features(str(folder_run))]
    counts = ShardFolder(str(clean)).counts()
    assert counts == {"shards": 3, "images": 8, "written": 6, "failed": 2, "no_regions": boxes.count(0),
                      "regions": {"images": 6, "sum": sum(boxes), "min": min(boxes), "max": max(boxes)}}
    halves = split_run(clean, tmp_path)  # copies of the tars, indices and failures only
    assert not list(tmp_path.glob("*/run/*.counts.json"))
    assert ShardFolder([str(h) for h in halves]).counts() == counts


def test_an_id_in_two_shards_is_refused_naming_both(clean, tmp_path):
    """Two shards holding one id: one line naming both, before any record (bug 8)."""
    other = tmp_path / "other"
    other.mkdir()
    for suffix in (".tar", ".jsonl", ".failures.jsonl"):
        (other / f"00009{suffix}").write_bytes((clean / f"00000{suffix}").read_bytes())
    message = f"image id '000000000' is in two shards: {clean}/00000.tar and {other}/00009.tar"
    for read in (lambda: list(read_features([str(clean), str(other)])),
                 lambda: ShardFolder([str(clean), str(other)])["000000002"]):
        with pytest.raises(DuplicateIdError) as error:
            read()
        assert str(error.value) == message
    # in one folder, and twice in one shard
    same = tmp_path / "same"
    same.mkdir()
    lines = (clean / "00000.jsonl").read_text().splitlines()
    (same / "00000.tar").write_bytes((clean / "00000.tar").read_bytes())
    (same / "00000.jsonl").write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(DuplicateIdError, match=f"image id '000000000' is twice in {same}/00000.tar$"):
        len(ShardFolder(str(same)))


CONVERT = TOOL.parent / "convert_features.py"
CONVERTED = ["butd_tsv", "tsv", "ban_hdf5", "hdf5", "lmdb"]


def layout_rows(out, fmt):
    """A layout's records read back, and for a one-file layout its bytes."""
    path = out / LAYOUTS[fmt].output_name
    return list(read_features(str(path), fmt)), path.read_bytes() if path.suffix == ".tsv" else None


def test_convert_shards_equals_converting_a_folder_run(clean, folder_run, tmp_path, monkeypatch):
    """convert_features over output shards (one folder, a glob, a list): the folder run's rows (issue 26 item 3)."""
    want = tmp_path / "from_folder"
    convert_features(str(folder_run), CONVERTED, str(want), source_format="npz")
    halves = split_run(clean, tmp_path)
    for source in (str(clean), f"{tmp_path}/*/run", [str(h) for h in halves]):
        out = tmp_path / f"from_shards_{len(os.listdir(tmp_path))}"
        manifest = convert_features(source, CONVERTED, str(out))
        assert manifest["converted_from"]["format"] == "shards"
        assert manifest["counts"] == {"inputs": len(GOOD) + 2, "written": len(GOOD), "failed": 2,
                                      "no_regions": 0, "left_out": {f: 0 for f in CONVERTED if f not in ("hdf5", "lmdb")}}
        assert manifest["feature_dim"] == json.loads((want / "manifest.json").read_text())["feature_dim"]
        for fmt in CONVERTED:
            (got, got_bytes), (rows, raw) = layout_rows(out, fmt), layout_rows(want, fmt)
            assert_same_record_lists(got, rows)
            assert got_bytes == raw, fmt
    # killed after three records, then resumed: the same bytes as one conversion
    monkeypatch.setattr(convert_module, "CHUNK", 2)
    stream = ShardFolder.__iter__

    def dies_after_three(folder):
        for n, record in enumerate(stream(folder)):
            if n == 3:
                raise KeyboardInterrupt
            yield record
    monkeypatch.setattr(ShardFolder, "__iter__", dies_after_three)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        convert_features(str(clean), CONVERTED, str(resumed))
    monkeypatch.setattr(ShardFolder, "__iter__", stream)
    convert_features(str(clean), CONVERTED, str(resumed), resume=True)
    once = tmp_path / "once"
    convert_features(str(clean), CONVERTED, str(once))
    def tree(folder):
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file() and p.name != "manifest.json"}
    assert tree(resumed) == tree(once) and "features_butd.tsv" in tree(once)


def test_convert_refuses_an_id_in_two_shards(clean, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("00000.tar", "00000.jsonl", "00000.failures.jsonl", "shards.json"):
        (other / name).write_bytes((clean / name).read_bytes())
    result = subprocess.run(
        [sys.executable, str(CONVERT), "--input", str(clean), str(other), "--format", "butd_tsv",
         "--output", str(tmp_path / "out")], env=tool_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"image id '000000000' is in two shards: {clean}/00000.tar and {other}/00000.tar" in result.stderr
    assert not (tmp_path / "out").exists()


def test_read_back_by_id_and_as_stream(clean):
    folder = ShardFolder(str(clean))
    assert len(folder) == len(GOOD) and "000000001" not in folder
    streamed = {r["image_id"]: r for r in folder}
    assert sorted(streamed) == sorted(GOOD)
    for key in GOOD:
        record = folder[key]
        np.testing.assert_array_equal(record["x"], streamed[key]["x"])
        entry = folder.index(key)
        assert entry["num_bbox"] == record["num_bbox"] == len(record["x"])
        assert (entry["image_h"], entry["image_w"]) == (record["image_h"], record["image_w"])
        assert entry["txt"] == f"caption {key}" and entry["json"]["url"] == f"http://x/{key}.png"


def sample_json(key, w):
    return {"url": f"http://x/{key}.png", "width": w}


def test_webdataset_reads_features_and_caption_together(clean):
    """webdataset's own reader: each sample of an output shard is the npz record with the input's json and txt."""
    wds = pytest.importorskip("webdataset")
    folder = ShardFolder(str(clean))
    widths = {k: w for samples in SHARDS.values() for k, _, _, w in samples}
    urls = [str(clean / f"{name}.tar") for name in SHARDS]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == GOOD
    for sample in samples:
        key = sample["__key__"]
        assert sample["json"] == sample_json(key, widths[key]) and sample["txt"] == f"caption {key}"
        record = folder[key]
        assert sorted(sample["npz"]) == sorted(record)
        for name, value in record.items():
            np.testing.assert_array_equal(sample["npz"][name], value)


def test_hugging_face_datasets_reads_the_shards(clean):
    """``datasets.load_dataset("webdataset", ..., streaming=True)`` decodes the npz members too."""
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is not installed (not a dependency)")
    if not hasattr(datasets, "load_dataset"):  # e.g. the datasets/ folder of a detectron2 checkout on the path
        pytest.skip(f"'datasets' on the path is not Hugging Face datasets ({datasets.__path__})")
    urls = [str(clean / f"{name}.tar") for name in SHARDS]
    stream = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", streaming=True)
    folder = ShardFolder(str(clean))
    keys = []
    for sample in stream:
        key = sample["__key__"]
        keys.append(key)
        assert sample["txt"] == f"caption {key}" and sample["json"]["url"] == f"http://x/{key}.png"
        record = folder[key]
        for name in ("x", "bbox", "objects_id", "objects_conf", "num_bbox", "image_h", "image_w"):
            expected = np.asarray(record[name])
            np.testing.assert_array_equal(np.asarray(sample["npz"][name], expected.dtype), expected)
    assert keys == GOOD


def test_sigkill_mid_shard_then_rerun_equals_clean(model, tool_cfg, shards, clean, extractor, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(shard_args(model, shards, out), env=tool_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # shard 00001's first batch is in the model then
    while not (out / "00000.jsonl").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / "00000.jsonl").exists() and not (out / "00001.jsonl").exists()
    (out / "00001.tar.partial").write_bytes(b"what a killed writer leaves")
    counts = extract_here(tool_cfg, shards, out, extractor)
    assert (counts["skipped"], counts["done"]) == (1, 4)
    assert files(out) == files(clean)


def test_two_workers_equal_one(tool_cfg, shards, clean, extractor, tmp_path):
    out = tmp_path / "out"
    extract_here(tool_cfg, shards, out, extractor, shard_index=0, num_shards=2)
    assert sorted(p for p in os.listdir(out) if p.endswith(".tar")) == ["00000.tar", "00002.tar"]
    extract_here(tool_cfg, shards, out, extractor, shard_index=1, num_shards=2)
    assert files(out) == files(clean)


def test_a_folder_of_other_settings_is_refused(tool_cfg, shards, clean):
    before = files(clean)
    with pytest.raises(OutputFolderError, match="--fp16 differ"):
        extract_here(tool_cfg, shards, clean, StandIn(), fp16=True)
    assert files(clean) == before


def test_worker_selection_and_braces():
    assert expand_braces("s/{008..010}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar"]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert select_shards(list("abcde"), 1, 2) == (["b", "d"], 1, 2)
    assert select_shards(list("abc"), environ={"RANK": "2", "WORLD_SIZE": "3"}) == (["c"], 2, 3)
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "2"}
    assert select_shards(list("abc"), environ=dict(slurm, RANK="0", WORLD_SIZE="1")) == (["b"], 1, 2)
    with pytest.raises(ValueError, match="--shard-index 2"):
        select_shards(list("abc"), 2, 2)


class StandIn:
    """
    An extractor that runs out of CUDA memory: always on ``always``, and on ``on_gpu`` unless
    it is a CPU copy (its model no longer the original one). Records the calls it got.
    """

    def __init__(self, on_gpu=(), always=()):
        self.model = torch.nn.Linear(1, 1)
        self.gpu_model = self.model
        self.on_gpu, self.always, self.calls = set(on_gpu), set(always), []

    def __call__(self, inputs):
        ids = [x["item"].image_id for x in inputs]
        self.calls.append((ids, self.model is self.gpu_model))
        if self.always & set(ids) or (self.model is self.gpu_model and self.on_gpu & set(ids)):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [{"image_id": i, "image_h": x["height"], "image_w": x["width"], "num_bbox": 0,
                 "x": np.zeros((0, 4), np.float32)} for i, x in zip(ids, inputs)]


def test_out_of_memory_retries_alone_then_on_cpu(model, shards, tmp_path):
    stand_in = StandIn(on_gpu={"000020000"}, always={"000020001"})
    counts = extract_shards(model.cfg, str(shards / "00002.tar"), str(tmp_path), batch_size=2,
                            num_workers=0, id_field=None, extractor=stand_in)
    assert counts == {"shards": 1, "skipped": 0, "done": 1, "failed": 1, "lost": []}
    folder = ShardFolder(str(tmp_path))
    assert [r["image_id"] for r in folder] == ["000020000"]
    [failure] = folder.failures()
    assert (failure["id"], failure["shard"], failure["member"]) == ("000020001", "00002", "000020001.png")
    assert failure["reason"].startswith("out of memory on CPU too: ") and "CUDA out of memory" in failure["reason"]
    assert [on_gpu for _, on_gpu in stand_in.calls] == [True, True, False, True, False]


def test_id_field_from_json(model, shards, tmp_path):
    extract_shards(model.cfg, str(shards / "00002.tar"), str(tmp_path), id_field="url", num_workers=0,
                   extractor=StandIn())
    assert sorted(r["image_id"] for r in ShardFolder(str(tmp_path))) == [
        "http://x/000020000.png", "http://x/000020001.png"
    ]


def test_shard_size_for_a_folder(model, tmp_path):
    for i in range(5):
        save_bgr(tmp_path / "in" / f"im{i}.png", generated(i, 64, 64))
    counts = extract_shards(model.cfg, str(tmp_path / "in"), str(tmp_path / "out"), shard_size=2,
                            num_workers=0, extractor=StandIn())
    assert counts["shards"] == 3 and counts["done"] == 5
    assert sorted(os.listdir(tmp_path / "out"))[:4] == ["00000.counts.json", "00000.failures.jsonl", "00000.jsonl",
                                                        "00000.tar"]
    with pytest.raises(OutputFolderError, match="--shard-size differ"):
        extract_shards(model.cfg, str(tmp_path / "in"), str(tmp_path / "out"), shard_size=3, num_workers=0,
                       extractor=StandIn())
    assert ShardFolder(str(tmp_path / "out")).index("im4")["member"] == "im4.npz"


def test_shard_size_streams_a_list(model, tmp_path, monkeypatch):
    """--shard-size over a list file: shards of positions, the list read once for them in order; a changed list is refused."""
    for i in range(7):
        save_bgr(tmp_path / "im" / f"im{i}.png", generated(i, 64, 64))
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"im/im{i}.png\n" for i in range(7)))
    shards, sha256 = plan_shards(str(listing), shard_size=3)
    assert [(s.name, s.start, s.stop) for s in shards] == [("00000", 0, 3), ("00001", 3, 6), ("00002", 6, 7)]
    assert sha256 == Inputs(str(listing)).check()[1]
    reads = []
    iterate = Inputs.__iter__
    monkeypatch.setattr(Inputs, "__iter__", lambda self: reads.append(1) or iterate(self))
    ids = [[i.image_id for i in shard_items(s)] for s in shards]
    assert ids == [["im0", "im1", "im2"], ["im3", "im4", "im5"], ["im6"]] and len(reads) == 1
    assert [i.image_id for i in shard_items(shards[1])] == ["im3", "im4", "im5"] and len(reads) == 2
    # what goes to DataLoader workers and Ray actors: the shards' positions, not their reading
    copy = pickle.loads(pickle.dumps(shards))
    assert copy[2].inputs._stream is None and [i.image_id for i in shard_items(copy[2])] == ["im6"]
    monkeypatch.undo()
    counts = extract_shards(model.cfg, str(listing), str(tmp_path / "out"), shard_size=3, num_workers=0,
                            extractor=StandIn())
    assert (counts["shards"], counts["done"]) == (3, 7)
    listing.write_text("".join(f"im/im{i}.png\n" for i in reversed(range(7))))
    with pytest.raises(OutputFolderError, match="inputs"):
        extract_shards(model.cfg, str(listing), str(tmp_path / "out"), shard_size=3, num_workers=0,
                       extractor=StandIn())


# The bugs of the shard path's own loop (issue 24), each against the one run path.

def test_lost_shard_leaves_no_output_and_is_retried(model, shards, clean, tool_main, tmp_path):
    """An input shard that cannot be opened: no complete output shard, its reason, exit 1; a rerun retries it."""
    source = tmp_path / "in"
    source.mkdir()
    for name in ("00000", "00002"):
        (source / f"{name}.tar").write_bytes((shards / f"{name}.tar").read_bytes())
    out = tmp_path / "out"
    args = tool_args(model, f"{source}/{{00000..00002}}.tar", out, formats=["npz"])[2:]
    assert tool_main(args) == 1
    folder = ShardFolder(str(out))
    assert folder.names == ["00000", "00002"]
    [lost] = folder.lost()
    assert (lost["shard"], lost["id"]) == ("00001", None)
    assert lost["reason"].startswith(f"cannot open {source}/00001.tar: FileNotFoundError")
    (source / "00001.tar").write_bytes((shards / "00001.tar").read_bytes())
    assert tool_main(args) == 0
    assert ShardFolder(str(out)).names == sorted(SHARDS) and ShardFolder(str(out)).lost() == []
    assert {k: v for k, v in files(out).items() if k != "shards.json"} == {
        k: v for k, v in files(clean).items() if k != "shards.json"}


def test_glob_of_tar_shards(model, shards, clean, tool_main, tmp_path):
    out = tmp_path / "out"
    assert tool_main(tool_args(model, f"{shards}/*.tar", out, formats=["npz"])[2:]) == 0
    assert files(out) == files(clean)
    with pytest.raises(InputError, match="no file matches"):
        extract_shards(model.cfg, f"{tmp_path}/none/*.tar", str(tmp_path / "other"), extractor=StandIn())


def test_limit_workers_and_processes(model, shards, clean, tool_main, tmp_path):
    """--limit N: the first N samples of each shard; --num-workers and --num-gpus as a folder run."""
    out = tmp_path / "limited"
    counts = extract_shards(model.cfg, f"{shards}/{{00000..00002}}.tar", str(out), limit=1, num_workers=2,
                            extractor=StandIn())
    assert (counts["done"], counts["failed"]) == (3, 0)
    assert sorted(r["image_id"] for r in ShardFolder(str(out))) == ["000000000", "000010000", "000020000"]
    out = tmp_path / "two_processes"
    result = subprocess.run(shard_args(model, shards, out, "--num-gpus", "2"), env=tool_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert files(out) == files(clean)


def test_a_model_without_roi_heads_is_refused_before_any_shard(model, shards, tmp_path):
    """The shard path checks the model as the folder path does (plain heads are enabled there)."""
    cfg = model.cfg.clone()
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    with pytest.raises(ConfigError, match="MODEL.META_ARCHITECTURE RetinaNet has no ROI heads"):
        extract_shards(cfg, str(shards / "00002.tar"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("only", [False, True])
def test_grid_records_in_shards(grid_model, only, tmp_path):
    cfg, images = grid_model
    cfg = cfg.clone()
    cfg.MODEL.REGION_FEATURES.GRID.ONLY = only
    cfg.freeze()
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name in sorted(os.listdir(images)):
            tar.add(images / name, arcname=name)
    counts = extract_shards(cfg, str(tmp_path / "00000.tar"), str(tmp_path / "out"), num_workers=0)
    assert (counts["done"], counts["failed"]) == (2, 0)
    folder_run = tmp_path / "folder"
    extract(prepare_job(cfg, str(images), str(folder_run), ["grid_npz"], 1, num_workers=0))
    grids = {r["image_id"]: r for r in read_features(str(folder_run), "grid_npz")}
    folder = ShardFolder(str(tmp_path / "out"))
    for record in folder:
        np.testing.assert_array_equal(record["grid"], grids[record["image_id"]]["grid"])
        assert ("x" in record) == (not only) == ("num_bbox" in folder.index(record["image_id"]))


def test_out_of_memory_in_a_folder_run(model, tmp_path):
    """The folder run retries as the shard run does: alone, then on CPU; a final failure is logged."""
    for i in range(3):
        save_bgr(tmp_path / "in" / f"im{i}.png", generated(i, 64, 64))
    job = prepare_job(model.cfg, str(tmp_path / "in"), str(tmp_path / "out"), ["npz"], 1, num_workers=0,
                      batch_size=3)
    extract(job, StandIn(on_gpu={"im0"}, always={"im2"}))
    assert sorted(os.listdir(tmp_path / "out" / "npz")) == ["im0.npz", "im1.npz"]
    [entry] = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert (entry["id"], entry["member"]) == ("im2", str(tmp_path / "in" / "im2.png"))
    assert entry["reason"].startswith("out of memory on CPU too")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["failed"] == 1
