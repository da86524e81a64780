"""
The Ray Data engine (``--engine ray``): three input shards (a corrupt member, a truncated tar)
through an actor pool on a local Ray of 2 CPUs give the default engine's output shards byte for
byte; a shard that fails is retried by Ray, and one that keeps failing is recorded lost as the
default engine records it. One Ray session for the module. Skipped without Ray (the ``ray`` extra).
"""
import sys

import pytest

from d2_regionfeat.extraction import ExtractionError, prepare_job
from d2_regionfeat.extraction.pipeline import extract_shards

from test_extract_net import generated, save_bgr, tool_args, tool_main  # noqa: F401
from test_shards import SHARDS, StandIn, extract_here, extractor, files, shards, tool_cfg  # noqa: F401

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e .[ray])")
from d2_regionfeat.extraction.ray_engine import RAY_HINT, extract_with_ray  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def default_run(tool_cfg, shards, extractor, tmp_path_factory):
    """The default engine's output folder of the three shards, and its counts."""
    out = tmp_path_factory.mktemp("default") / "out"
    return out, extract_here(tool_cfg, shards, out, extractor)


def ray_job(cfg, source, out):
    return prepare_job(cfg, source, str(out), ["npz"], 1, batch_size=2, num_workers=0)


def test_ray_engine_writes_the_default_engines_shards(ray_session, tool_cfg, shards, default_run, tmp_path):
    out, counts = default_run
    job = ray_job(tool_cfg, f"{shards}/{{00000..00002}}.tar", tmp_path / "out")
    assert extract_with_ray(job, num_actors=2) == counts
    assert sorted(files(out)) == sorted(f"{n}{s}" for n in SHARDS for s in (".tar", ".jsonl", ".failures.jsonl")) + [
        "shards.json"]
    assert files(tmp_path / "out") == files(out)  # members, index rows, failures and shards.json
    assert extract_with_ray(job)["skipped"] == 3  # a rerun rewrites nothing


def test_a_failed_shard_is_retried_then_recorded_lost(ray_session, tool_cfg, shards, default_run, tmp_path):
    out, _ = default_run
    # fails on its first try only: Ray's retry gives the default engine's shard
    flaky = f"pipe:[ -e {tmp_path}/tried ] || {{ touch {tmp_path}/tried; exit 1; }}; cat {shards}/00002.tar"
    assert extract_with_ray(ray_job(tool_cfg, flaky, tmp_path / "flaky"), max_retries=1)["lost"] == []
    assert {k: v for k, v in files(tmp_path / "flaky").items() if k.startswith("00002")} == {
        k: v for k, v in files(out).items() if k.startswith("00002")}
    # fails every time: tried 1 + max_retries times, then recorded as the default engine records it
    broken = f"pipe:echo try >> {tmp_path}/tries; exit 1; cat {shards}/00002.tar"
    counts = extract_with_ray(ray_job(tool_cfg, broken, tmp_path / "broken"), max_retries=1)
    assert counts["lost"] == ["00002"] and counts["done"] == 0
    assert (tmp_path / "tries").read_text().splitlines() == ["try"] * 2
    extract_shards(tool_cfg, broken, str(tmp_path / "default_broken"), extractor=StandIn())
    assert files(tmp_path / "broken")["00002.failures.jsonl"] == files(tmp_path / "default_broken")[
        "00002.failures.jsonl"]
    assert sorted(files(tmp_path / "broken")) == ["00002.failures.jsonl", "shards.json"]


def test_ray_engine_refusals(tool_cfg, shards, tmp_path, monkeypatch):
    save_bgr(tmp_path / "images" / "a.png", generated(1, 64, 64))
    folder_job = prepare_job(tool_cfg, str(tmp_path / "images"), str(tmp_path / "folder"), ["npz"], 1, claim=False)
    with pytest.raises(ExtractionError, match="--engine ray runs shard inputs"):
        extract_with_ray(folder_job)
    monkeypatch.setitem(sys.modules, "ray", None)  # as without the extra
    with pytest.raises(ExtractionError, match=r"pip install -e \.\[ray\]") as error:
        extract_with_ray(ray_job(tool_cfg, f"{shards}/00002.tar", tmp_path / "out"))
    assert str(error.value) == RAY_HINT
