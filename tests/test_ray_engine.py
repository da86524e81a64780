"""
The Ray Data engine (``tools/extract_net.py --engine ray``), run by the tool in this process on
one local Ray of 2 CPUs for the module, over the test shards (a corrupt member, a truncated tar)
and two pipe shards, one failing once, one always: the default engine's output shards byte for
byte, its summary and exit status; the first shard retried by Ray, the second tried 1 + 1 times
then recorded lost as the default engine records it, the tool exiting 1 once the others are
done; a finished rerun rewrites nothing. Skipped without Ray (the ``ray`` extra); the refusals
run without it.
"""
import contextlib
import io
import os
import sys
from types import SimpleNamespace

import pytest

from d2_regionfeat.extraction.ray_engine import RAY_HINT, SHARD_INPUTS_ONLY
from d2_regionfeat.formats.feature_shards import read_lines
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


def printed(run, out):
    """The exit status of ``run()`` and the shard summary it printed (less its wall time), ``out`` named OUT."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = run()
    lines = [line.replace(str(out), "OUT") for line in stdout.getvalue().splitlines()]
    return status, [line for line in lines if line.startswith(("Shards:", "  in folder", "  regions", "  lost"))]


def on_ray(tool_main, argv):
    """The tool with --engine ray, the default engine's processes (launch) out of reach."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(tool_main.__globals__, "launch", None)
        return tool_main(argv + ["--engine", "ray", "--ray-retries", "1"])


@pytest.fixture(scope="module")
def runs(ray_session, model, shards, tool_main, tmp_path_factory):
    """
    The tool with --engine ray, then with the default engine, over the test shards and two
    pipe shards: 00002 that fails on its first try only, 99999 on every try (counted in tries).
    Their output folders, exit statuses and summaries; the tries before the default run.
    """
    folder = tmp_path_factory.mktemp("runs")
    flaky = f"pipe:test -e {folder}/tried || (touch {folder}/tried; exit 1) && cat {shards}/00002.tar"
    broken = f"pipe:echo try >> {folder}/tries; exit 1; cat {shards}/99999.tar"
    source = f"{{{shards}/00000.tar,{shards}/00001.tar,{flaky},{broken}}}"
    out = {"ray": folder / "ray", "default": folder / "default"}
    ray = printed(lambda: on_ray(tool_main, tool_args(model, source, out["ray"], formats=["npz"])[2:]), out["ray"])
    tries = (folder / "tries").read_text().splitlines()
    default = printed(lambda: tool_main(tool_args(model, source, out["default"], formats=["npz"])[2:]),
                      out["default"])
    return SimpleNamespace(out=out, ray=ray, default=default, tries=tries, broken=broken)


def test_engine_ray_writes_the_default_engines_shards(runs):
    complete = [f"{n}{s}" for n in SHARDS for s in (".tar", ".jsonl", ".failures.jsonl", ".counts.json")]
    assert sorted(files(runs.out["ray"])) == sorted(complete) + ["99999.failures.jsonl", "shards.json"]
    # tars (npz, json and txt members), index rows, failures, lost record, shards.json
    assert files(runs.out["ray"]) == files(runs.out["default"])
    regions = [row["num_bbox"] for n in SHARDS for row in read_lines(runs.out["ray"] / f"{n}.jsonl")]
    assert runs.ray == runs.default == (1, [
        "Shards: 4 of this worker, 0 already complete; 6 images extracted, 2 failed (in <shard>.failures.jsonl) in OUT",
        f"  in folder  3 complete shards of 8 images: 6 extracted, 2 failed, {regions.count(0)} with no region",
        f"  regions    per image min {min(regions)}, mean {sum(regions) / 6:.1f}, max {max(regions)}",
        "  lost       1 input shards could not be read (99999; reasons in <shard>.failures.jsonl): rerun to retry them",
    ])


def test_a_failing_shard_is_retried_by_ray_then_recorded_lost(runs):
    assert runs.tries == ["try"] * 2  # 1 + --ray-retries 1; 00002 read at its second try
    [lost] = ShardFolder(str(runs.out["ray"])).lost()
    assert (lost["shard"], lost["id"], lost["member"]) == ("99999", None, runs.broken)
    assert ShardFolder(str(runs.out["ray"])).names == sorted(SHARDS)  # done, beside the lost one (exit 1)


def test_a_finished_rerun_rewrites_nothing(runs, model, shards, tool_main):
    out = runs.out["ray"]
    before = {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out)}
    status, lines = printed(lambda: on_ray(tool_main, shard_args(model, shards, out)[2:]), out)
    assert status == 0 and lines[0].startswith("Shards: 3 of this worker, 3 already complete; 0 images extracted")
    assert {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out)} == before


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
