"""
The benchmarks of bench/ keep working: each script runs on a tiny setting (a few images,
one repeat) and writes its JSON; no timing is asserted. The memory benchmark's merge check
is a real one: the TSV and HDF5 parts, larger than an address-space cap, merge under it.
"""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from d2_regionfeat.formats import REGION_FORMATS

BENCH = Path(__file__).resolve().parents[1] / "bench"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def run_bench(tmp_path, monkeypatch):
    """Run bench/<script> in this process with ``args``; returns the JSON it wrote, by name."""
    monkeypatch.syspath_prepend(str(BENCH))
    threads = torch.get_num_threads()

    def run(script, *args):
        results = tmp_path / "results"
        monkeypatch.setattr(sys, "argv", [str(BENCH / script), "--device", "cpu",
                                          "--results", str(results), *map(str, args)])
        try:
            runpy.run_path(str(BENCH / script), run_name="__main__")
        finally:
            torch.set_num_threads(threads)
        return {p.stem: json.loads(p.read_text()) for p in results.glob("*.json")}

    return run


def test_heads(run_bench):
    rows = run_bench("bench_heads.py", "--repeats", 1, "--size", 128, "--depth", 18, "--proposals", 50,
                    "--detections", 5)["heads"]["rows"]
    assert rows[0]["variant"] == "plain" and len(rows) == 8


def test_extract(run_bench):
    results = run_bench("bench_extract.py", "--images", 4, "--fpn-images", 0, "--num-workers", 1)
    (row,) = results["extract"]["rows"]
    assert row["images"] == 4 and 0 < row["extract_busy"] <= 1 and 0 < row["loop_busy"] <= 1
    assert row["runs"]["extract"][0]["images"] == 4 and row["extract_startup_s"] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_memory_and_merges_under_a_cap(run_bench):
    result = run_bench(
        "bench_memory.py", "--counts", "2,4", "--part-mb", 52, "--cap-mb", 48,
        "--slab-mb", 4,
    )["memory"]
    assert [r["count"] for r in result["rows"]] == [2, 4, 2, 4]
    assert [r["images"] for r in result["rows"]] == ["distinct"] * 2 + ["first 2 repeated"] * 2
    cap = result["merge_under_cap"]
    assert cap["part_mb"] > cap["cap_mb"] and cap["whole_part_read"] == "MemoryError"
    assert (cap["tsv"], cap["hdf5"], cap["read_back"]) == ("ok", "ok", True)


def test_writers(run_bench):
    args = ["--records", 6, "--regions", 3, "--dim", 8]
    rows = run_bench("bench_writers.py", *args, "--share-images", 0)["writers"]["rows"]
    assert [r["format"] for r in rows] == REGION_FORMATS and all(r["records"] == 6 for r in rows)
    shares = run_bench("bench_writers.py", *args, "--formats", "npz,ban_hdf5", "--share-images", 2)
    shares = shares["writer_shares"]["rows"]
    assert [r["format"] for r in shares] == ["npz", "ban_hdf5"]
    assert all(r["images"] == 2 and 0 < r["share"] < 1 and 0 < r["busy"] <= 1 for r in shares)


def test_amp(run_bench):
    args = ["--images", 2, "--fpn-images", 1, "--fpn-size", 128, "--repeats", 1]
    rows = run_bench("bench_amp.py", *args)["amp"]["rows"]
    assert [r["model"] for r in rows] == ["shipped", "shipped, POOL_AT final", "R50-FPN 128px"]
    assert rows[0]["dets_fp32"] > 0 and rows[0]["matched"] > 0.5
    assert all(0 < r["backbone_cos"] <= 1 + 1e-9 for r in rows)


def test_large(run_bench):
    results = run_bench(
        "bench_large.py", "--sizes", 128, "--images", 0, "--profile-images", 1, "--depth", 50, "--classes", 8,
        "--proposals", 20,
    )
    stages = {r["stage"]: r for r in results["large_stages"]["rows"]}
    expected = {"backbone", "rpn", "roi head (res5)", "box predictor", "selection", "writers", "other"}
    assert expected <= set(stages)
    assert stages["backbone"]["s_per_img"] > 0 and stages["selection"]["s_per_img"] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_streaming(run_bench):
    rows = run_bench("bench_streaming.py", "--list-counts", 300, "--folder-counts", 1000, "--written", 5,
                     "--inputs", "list,list-shards,nested")["streaming"]["rows"]
    assert [(r["input"], r["way"], r["count"], r["skipped"], r["todo"]) for r in rows] == [
        ("list file", "streamed", 300, 5, 296), ("list file", "shards", 300, 0, 300),
        ("nested folder", "streamed", 1000, 5, 996)]  # todo: the images of batches to do
    assert all(r["peak_rss_mb"] >= r["base_rss_mb"] > 0 for r in rows)


def test_vinvl(run_bench):
    args = ["--sizes", 64, "--max-size", 96, "--depth", 50, "--narrow", "--classes", 8, "--proposals", 20,
            "--repeats", 1]
    rows = run_bench("bench_vinvl.py", *args)["vinvl"]["rows"]
    assert [(r["model"], r["size"]) for r in rows] == [
        ("vinvl_x152c4", "64x96"), ("butd_r101c4", "64x96"), ("ratio vinvl/butd", "64x96")]
    assert all(0 < r["selection_share"] < 1 for r in rows[:2]) and all(r["s_per_image"] > 0 for r in rows)
    assert rows[2]["s_per_image"] == rows[0]["s_per_image"] / rows[1]["s_per_image"]


def test_shards(run_bench):
    result = run_bench(
        "bench_shards.py", "--images", 6, "--shard-size", 3, "--repeats", 1, "--num-workers", 1,
        "--formats", "npz", "--records", 2, "--regions", "3,5", "--dim", 8, "--gpu-img-s", 4,
    )["shards"]
    (row,) = result["rows"]
    assert (row["images"], row["shards"]) == (6, 2) and row["ratio"] > 0
    assert all(0 < row[k] <= 1 for k in ("folder_busy", "shards_busy"))
    at_model = {r["format"]: r for r in result["bytes_at_model"]}
    assert list(at_model) == ["npz", "shards"] and at_model["npz"]["images"] == 6
    # a member of the shards is the npz file's bytes, with its tar header, json and txt beside
    assert 0 < at_model["npz"]["bytes_per_image"] < at_model["shards"]["bytes_per_image"]
    # per image: what one more record adds, the npz file of a record exactly
    from d2_regionfeat.formats.records import encode_npz
    from records import RecordMaker

    by = {(r["format"], r["features"], r["regions"]): r["bytes_per_image"] for r in result["bytes_synthetic"]}
    for regions in (3, 5):
        record = RecordMaker(regions, 8, 1600, attributes=400)(0)
        assert by["npz", "float32", regions] == len(encode_npz(record))
        assert by["npz", "float32", regions] - by["npz", "float16", regions] == regions * 8 * 2
        assert by["shards", "float32", regions] > by["npz", "float32", regions]
    parts = {(r["format"], r["features"]): r for r in result["bytes_parts"]}
    assert parts["npz", "float32"]["per_region"] == (by["npz", "float32", 5] - by["npz", "float32", 3]) / 2
    hours = {r["rate"]: r for r in result["cost_hours"]}
    assert hours["BUTD R101-C4 600 px, 1 GPU (assumed)"]["100M_hours"] == pytest.approx(1e8 / 4 / 3600)
    tb = {(r["format"], r["features"]): r for r in result["cost_tb"]}
    assert tb["npz", "float32"]["CC3M_5_TB"] == pytest.approx(3.3e6 * by["npz", "float32", 5] / 1e12)
