"""
The Ray Data engine (``tools/extract_net.py --engine ray``), run by the tool in this process on
one local Ray of 2 CPUs for the module: three input shards (a corrupt member, a truncated tar)
give the default engine's output shards byte for byte, its summary and exit status; a shard
that fails once is retried by Ray, one that keeps failing is tried 1 + 3 times, then recorded
lost as the default engine records it, and the tool exits 1 once the others are done. The Ray
tests are skipped without Ray (the ``ray`` extra); the refusals run without it.
"""
import os
import sys

import pytest

from d2_regionfeat.extraction.ray_engine import RAY_HINT, SHARD_INPUTS_ONLY
from d2_regionfeat.io import ShardFolder

from test_extract_net import error_of, generated, save_bgr, tool_args, tool_main  # noqa: F401
from test_shards import SHARDS, files, shard_args, shards  # noqa: F401

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e .[ray]): Ray engine not tested")
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def summary(capsys, out):
    """The shard summary the tool printed (less its wall time), its output folder named OUT."""
    lines = capsys.readouterr().out.splitlines()
    return [line.replace(str(out), "OUT") for line in lines if line.startswith(("Shards:", "  lost"))]


def mtimes(out):
    return {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out)}


def test_engine_ray_writes_the_default_engines_shards(ray_session, model, shards, tool_main, capsys, tmp_path):
    default, ray = tmp_path / "default", tmp_path / "ray"
    assert tool_main(shard_args(model, shards, default)[2:]) == 0
    want = summary(capsys, default)
    assert tool_main(shard_args(model, shards, ray, "--engine", "ray")[2:]) == 0
    assert summary(capsys, ray) == want == [
        "Shards: 3 of this worker, 0 already complete; 6 images extracted, 2 failed (in <shard>.failures.jsonl) in OUT"]
    assert sorted(files(ray)) == sorted(f"{n}{s}" for n in SHARDS for s in (".tar", ".jsonl", ".failures.jsonl")) + [
        "shards.json"]
    assert files(ray) == files(default)  # tars (npz, json, txt members), index rows, failures, shards.json
    before = mtimes(ray)
    assert tool_main(shard_args(model, shards, ray, "--engine", "ray")[2:]) == 0
    assert summary(capsys, ray)[0].startswith("Shards: 3 of this worker, 3 already complete; 0 images extracted")
    assert mtimes(ray) == before  # a finished rerun rewrites nothing


def test_a_failing_shard_is_retried_by_ray_then_recorded_lost(ray_session, model, shards, tool_main, capsys,
                                                              tmp_path):
    # 00002 fails on its first try only; 00000 on every try (counted in tries)
    flaky = f"pipe:test -e {tmp_path}/tried || (touch {tmp_path}/tried; exit 1) && cat {shards}/00002.tar"
    broken = f"pipe:echo try >> {tmp_path}/tries; exit 1; cat {shards}/00000.tar"
    source = f"{{{flaky},{broken}}}"
    ray, default = tmp_path / "ray", tmp_path / "default"
    assert tool_main(tool_args(model, source, ray, "--engine", "ray", formats=["npz"])[2:]) == 1
    assert (tmp_path / "tries").read_text().splitlines() == ["try"] * 4  # 1 + Ray's 3 retries
    got = summary(capsys, ray)
    [lost] = ShardFolder(str(ray)).lost()
    assert (lost["shard"], lost["id"], lost["member"]) == ("00000", None, broken)
    assert ShardFolder(str(ray)).names == ["00002"]  # done, beside the lost one
    # the default engine on the same input (00002 now read at its first try)
    assert tool_main(tool_args(model, source, default, formats=["npz"])[2:]) == 1
    assert got == summary(capsys, default) and got[1].startswith("  lost       1 input shards could not be read (00000;")
    assert files(ray) == files(default)


def test_refusals_name_the_setting(model, shards, tool_main, capsys, tmp_path, monkeypatch):
    save_bgr(tmp_path / "images" / "a.png", generated(1, 64, 64))
    out = tmp_path / "out"
    cases = {
        SHARD_INPUTS_ONLY: tool_args(model, tmp_path / "images", out, "--engine", "ray", formats=["npz"]),
        "--ray-address is for --engine ray": shard_args(model, shards, out, "--ray-address", "auto"),
        "--engine ray places its actors on the Ray cluster's machines: drop --num-machines": shard_args(
            model, shards, out, "--engine", "ray", "--num-machines", "2"),
    }
    for message, argv in cases.items():
        code, err = error_of(tool_main, capsys, argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.strip().endswith(f"error: {message}"), err
    monkeypatch.setitem(sys.modules, "ray", None)  # as without the extra
    code, err = error_of(tool_main, capsys, shard_args(model, shards, out, "--engine", "ray"))
    assert code == 2 and err.strip().splitlines() == [err.strip()] and err.strip().endswith(RAY_HINT), err
    assert not out.exists()  # refused before the output folder is claimed
