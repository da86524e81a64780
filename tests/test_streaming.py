"""
Streamed inputs (issue 26 item 2): a folder or list file read lazily in the order of today's
list, the manifest's inputs_sha256 unchanged, ids checked without a set of them, the rank
split and a resume over the stream as before.
"""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from d2_regionfeat.extraction.inputs import ImageItem, InputError, Inputs, Repeats, first_repeat
from d2_regionfeat.extraction.job import prepare_job
from d2_regionfeat.extraction.pipeline import extract, plan_rank, rank_range
from d2_regionfeat.extraction.run import check_ids
from d2_regionfeat.formats import LayoutIdError
from detectron2.data.samplers import InferenceSampler
from test_extract_net import folder_bytes


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_a_folder_streams_in_the_order_of_its_sorted_paths(tmp_path):
    """The order of the list of every path sorted (what inputs_sha256 was computed over), read
    lazily: a file made after the first item was read, in a folder not yet reached, is listed."""
    names = ["a.jpg", "a-b.jpg", "a/x.jpg", "a b/y.png", "a/b/c.JPG", "ab.png", "a.b/z.jpg", "A.jpg",
             "_/q.jpg", "z/notes.txt", "a/b.jpg", "dir.jpg/in.png", "z/last.png"]
    for name in names:
        touch(tmp_path / name)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    expected = sorted(os.path.join(d, f) for d, _, files in os.walk(tmp_path, followlinks=True)
                      for f in files if not f.endswith(".txt"))
    inputs = Inputs(str(tmp_path))
    assert [i.path for i in inputs] == expected  # read again: the same
    # a folder sorts as its name and "/": "a.b/" before "a.jpg" before "a/"; "a/b.jpg" before "a/b/"
    assert [i.image_id for i in inputs][:8] == ["A", "_/q", "a b/y", "a-b", "a.b/z", "a", "a/b", "a/b/c"]
    stream = iter(inputs)
    assert next(stream).image_id == "A"
    touch(tmp_path / "z" / "made_later.png")
    assert [i.image_id for i in stream][-2:] == ["z/last", "z/made_later"]


def test_a_list_file_is_read_no_further_than_the_limit(tmp_path):
    """Text that is no UTF-8 after 4000 lines: --limit 3 never reads it (a list read whole did)."""
    lines = "".join(f"img/{i:05d}.png\n" for i in range(4000))
    (tmp_path / "list.txt").write_bytes(lines.encode() + b"\xff\xfe garbage\n")
    count, _ = Inputs(str(tmp_path / "list.txt"), limit=3).check()
    assert count == 3
    assert [i.image_id for i in Inputs(str(tmp_path / "list.txt"), limit=3)] == ["00000", "00001", "00002"]
    with pytest.raises(InputError, match="neither an image nor a text file of image paths"):
        Inputs(str(tmp_path / "list.txt")).check()


def test_inputs_sha256_is_the_digest_of_the_lines(tmp_path):
    """The manifest's inputs_sha256 is sha256 of "id<TAB>path" lines joined by newlines, as
    the list-based listing hashed it: an existing run still resumes."""
    (tmp_path / "list.txt").write_text("b.png\n\nsub/a.png\n")
    _, sha256 = Inputs(str(tmp_path / "list.txt")).check()
    text = f"b\t{tmp_path}/b.png\na\t{tmp_path}/sub/a.png"
    assert sha256 == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_repeated_ids_are_found_from_hashes_and_made_sure_of(tmp_path):
    class SameHash(str):
        def __hash__(self):
            return 7

    repeats = Repeats()
    for key in ("a", "b", "c"):
        repeats.add(SameHash(key))
    assert repeats.candidates() == {7}
    # every hash the same, no key twice: no repeat
    assert first_repeat(((SameHash(k), k) for k in "abc"), {7}) is None
    assert first_repeat(((SameHash(k), n) for n, k in enumerate("abcb")), {7}) == ("b", 1, 3)

    (tmp_path / "list.txt").write_text("x/1.png\ny/2.png\nz/1.png\n")
    with pytest.raises(InputError, match=f"two inputs get image id '1': {tmp_path}/x/1.png and {tmp_path}/z/1.png"):
        Inputs(str(tmp_path / "list.txt")).check()


def test_layout_ids_are_checked_in_order(tmp_path):
    """butd_tsv keys ids by their integer: two ids of one integer, an id without one; the first
    problem of the first layout is the one named, as when the ids were a list."""
    def listing(*names):
        (tmp_path / "list.txt").write_text("".join(f"{n}.png\n" for n in names))
        return Inputs(str(tmp_path / "list.txt")).usable_ids()

    with pytest.raises(LayoutIdError, match="butd_tsv: images 'COCO_1' and 'img_01' both get id '1'"):
        check_ids(["npz", "butd_tsv"], listing("COCO_1", "x_2", "img_01", "none"))
    with pytest.raises(LayoutIdError, match="^butd_tsv: .*'none'"):
        check_ids(["npz", "butd_tsv"], listing("COCO_1", "none", "img_01"))
    check_ids(["npz", "butd_tsv"], listing("COCO_1", "COCO_2"))


@pytest.mark.parametrize("count,batch_size,world_size", [(0, 4, 2), (5, 2, 1), (9, 2, 3), (10, 4, 4), (17, 3, 2)])
def test_the_rank_split_is_the_batches_shared_as_inference_sampler_shares(count, batch_size, world_size):
    batches = [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]
    for rank in range(world_size):
        local = InferenceSampler._get_local_indices(len(batches), world_size, rank)
        assert list(rank_range(count, batch_size, rank, world_size)) == [i for b in local for i in batches[b]]


def test_plan_rank_skips_whole_recorded_batches():
    items = [ImageItem(str(i), f"{i}.png") for i in range(7)]
    skipped, batches = plan_rank(items, range(1, 7), 2, {"1", "2", "4"})
    assert skipped == 3
    assert [[i.image_id for i in b] for b in batches] == [["3", "4"], ["5", "6"]]


def stand_in(inputs):
    """An extractor's records, made from the decoded image (the model skipped); "d" has no region."""
    records = []
    for x in inputs:
        n = 0 if x["item"].image_id == "d" else 2
        value = float(x["image"].mean())
        records.append({
            "image_id": x["item"].image_id, "image_h": x["height"], "image_w": x["width"], "num_bbox": n,
            "x": np.full((n, 4), value, np.float32), "bbox": np.tile(np.float32([1, 2, 5, 6]), (n, 1)),
            "objects_id": np.arange(n, dtype=np.int64), "objects_conf": np.full(n, 0.5, np.float32),
        })
    return records


def test_resume_over_a_streamed_list_is_one_run(model, tmp_path):
    """Killed after two batches (of 2), then resumed: the same files as one run; the images
    already written are skipped; the image without regions is logged with its file."""
    names = ["e", "a", "sub/c", "d", "b"]
    for seed, name in enumerate(names):
        path = tmp_path / "images" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(path)
    source = tmp_path / "images" / "list.txt"
    source.write_text("".join(f"{n}.png\n" for n in names))
    settings = dict(batch_size=2, num_workers=0)

    once = tmp_path / "once"
    extract(prepare_job(model.cfg, str(source), str(once), ["npz", "tsv"], 1, **settings), stand_in)

    calls = []

    def killed(inputs):
        calls.append(len(inputs))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return stand_in(inputs)

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        extract(prepare_job(model.cfg, str(source), str(resumed), ["npz", "tsv"], 1, **settings), killed)
    (stats,) = extract(prepare_job(model.cfg, str(source), str(resumed), ["npz", "tsv"], 1, resume=True,
                                   **settings), stand_in)
    assert (stats["skipped"], stats["done"]) == (4, 1)
    assert folder_bytes(resumed) == folder_bytes(once)
    (entry,) = [json.loads(line) for line in (once / "no_regions.jsonl").read_text().splitlines()]
    assert entry["image_id"] == "d" and entry["path"] == str(tmp_path / "images" / "d.png")
    lines = "\n".join(f"{os.path.basename(n)}\t{tmp_path}/images/{n}.png" for n in names)
    assert json.loads((once / "manifest.json").read_text())["inputs_sha256"] == hashlib.sha256(lines.encode()).hexdigest()
