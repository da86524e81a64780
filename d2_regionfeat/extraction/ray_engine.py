"""
The Ray Data engine of a shard run (``tools/extract_net.py --engine ray [--ray-address ADDR]``,
``pip install -e .[ray]``): the job's input shards that are not complete become a Ray dataset,
one row per shard, mapped by ``map_batches`` over a pool of actors (:class:`ShardActor`), each of
which builds the model once and runs whole shards through the default engine's work
(:func:`.pipeline.extract_input_shards`: a DataLoader worker decoding, the run's loop, a
:class:`.sinks.ShardSink`): one task is one input shard and gives one atomic output shard, byte
for byte what the default engine writes. An actor takes one CPU and ``num_gpus`` GPUs.

A task whose shard cannot be read (or whose loop raises) leaves the shard's lost record (its
``<shard>.failures.jsonl`` and no index, as the default engine leaves it) and raises
:class:`ShardFailedError`, which Ray Data retries (``max_retries`` times, in the same actor; a
retry starts the shard afresh; an actor that dies is restarted and its task retried as often).
A shard still failing after them stays recorded as lost, the run goes on with the others and
ends as the default engine's does: the next run retries it.
"""
import os
import time
import warnings
from typing import Dict, Optional

from ..formats.feature_shards import is_complete, read_lines, shard_paths
from .inputs import one_line
from .job import ExtractionError, ExtractionJob, shard_summary
from .pipeline import extract_input_shards, shard_counts
from .sinks import ShardSink

RAY_HINT = "--engine ray needs Ray Data: pip install -e .[ray]"
SHARD_INPUTS_ONLY = ("--engine ray runs shard inputs (tar shards, or --shard-size N for a folder or list); "
                     "drop --engine for a folder run")


class ShardFailedError(RuntimeError):
    """A shard that a task could not extract (its lost record is written): Ray retries the task."""


def require_ray(shard_run: bool):
    """
    Ray, for a run of shard inputs (``shard_run``).

    Raises:
        ExtractionError: not a shard run, or Ray Data is not installed (one line).
    """
    if not shard_run:
        raise ExtractionError(SHARD_INPUTS_ONLY)
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ExtractionError(RAY_HINT)
    return ray


def _lost_reason(output_dir, name) -> Optional[str]:
    """Why shard ``name`` was recorded lost, or None when it has no such record."""
    path = shard_paths(output_dir, name)["failures"]
    if is_complete(output_dir, name) or not os.path.isfile(path):
        return None
    return read_lines(path)[0]["reason"]


class ShardActor:
    """
    A Ray actor of the pool: the model built once (:meth:`.ExtractionJob.extractor`), then
    per call a batch of rows ``{"shard": (n,) indices into job.shards}`` extracted shard by
    shard, returning their counts ``{"done": (n,), "failed": (n,)}``.
    """

    def __init__(self, job: ExtractionJob):
        self.job = job
        self.extractor = job.extractor()

    def __call__(self, batch: Dict) -> Dict:
        import numpy as np

        rows = {"done": [], "failed": []}
        for index in batch["shard"]:
            shard = self.job.shards[int(index)]
            try:
                stats = extract_input_shards(self.job, [shard], self.extractor)
            except Exception as e:  # the shard's loop broke: recorded, and the task retried
                ShardSink(self.job.output_dir).lose(shard.name, shard.url or shard.name,
                                                    f"the shard's task failed: {one_line(e)}")
                raise ShardFailedError(f"shard {shard.name}: {one_line(e)}") from e
            if stats["lost"]:
                raise ShardFailedError(f"shard {shard.name}: {_lost_reason(self.job.output_dir, shard.name)}")
            for key in rows:
                rows[key].append(stats[key])
        return {k: np.asarray(v) for k, v in rows.items()}


def extract_with_ray(job: ExtractionJob, address: Optional[str] = None, num_gpus: float = 0,
                     max_retries: int = 3, num_actors: Optional[int] = None) -> Dict:
    """
    Extract ``job``'s shards that are not complete with Ray Data (see the module docstring),
    showing Ray's progress and then printing the default engine's summary.

    Args:
        job: a shard run's job, from :func:`.job.prepare_job` (its output folder claimed).
        address: the Ray cluster to join (``ray.init(address=...)``: ``auto``, or
            ``ray://host:10001``); None: the Ray this process already runs, else a local one
            on this machine's CPUs (and GPUs; inside ``ray job submit``, the job's cluster),
            shut down at the end.
        num_gpus: GPUs per actor (0: the model on the CPU).
        max_retries: Ray's retries of a failed shard task.
        num_actors: the pool's size (all started at once; fewer when some cannot start);
            None: as many as the cluster fits (GPUs over ``num_gpus``, else CPUs, one an
            actor), at most one a shard.

    Returns:
        counts ``{"shards", "skipped" (already complete), "done", "failed", "lost" (names)}``,
        as :func:`.pipeline.extract_shards`'s.

    Raises:
        ExtractionError: see :func:`require_ray`, or no Ray cluster at ``address`` (one line).
    """
    ray = require_ray(job.shards is not None)
    start = time.perf_counter()
    todo = [i for i, s in enumerate(job.shards) if not is_complete(job.output_dir, s.name)]
    stats = {"shards": len(job.shards), "complete": len(job.shards) - len(todo), "done": 0, "failed": 0,
             "lost": []}
    if todo:
        started = not ray.is_initialized()
        if started:
            try:
                ray.init(address=address)
            except ConnectionError as e:  # no cluster there
                raise ExtractionError(f"--ray-address {address}: {one_line(e)}")
        try:
            rows = _run(ray, job, todo, num_gpus, max_retries, num_actors)
        finally:
            if started:
                ray.shutdown()
        stats["done"], stats["failed"] = int(sum(rows["done"])), int(sum(rows["failed"]))
        for i in todo:
            shard = job.shards[i]
            if is_complete(job.output_dir, shard.name):
                continue
            if _lost_reason(job.output_dir, shard.name) is None:  # every try's actor died
                ShardSink(job.output_dir).lose(shard.name, shard.url or shard.name,
                                               f"the shard's task died {max_retries + 1} times (Ray's logs)")
            stats["lost"].append(shard.name)
    print(shard_summary(job.output_dir, [stats], time.perf_counter() - start))
    return shard_counts(stats)


def _run(ray, job, todo, num_gpus, max_retries, num_actors) -> Dict:
    """The rows of the shards of ``todo`` (indices into ``job.shards``) that Ray extracted."""
    if num_actors is None:
        resources = ray.cluster_resources()
        fits = resources.get("GPU", 0) // num_gpus if num_gpus else resources.get("CPU", 1)
        num_actors = max(1, min(len(todo), int(fits)))
    context = ray.data.DataContext.get_current()
    settings = {  # a failed shard is retried, then dropped from the dataset (not failing the others)
        "retried_map_errors": [ShardFailedError.__name__], "max_map_retries": max_retries,
        "max_errored_blocks": -1,
    }
    saved = {key: getattr(context, key) for key in settings}
    for key, value in settings.items():
        setattr(context, key, value)
    try:
        dataset = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
        with warnings.catch_warnings():
            # max_task_retries (an actor's task retried when the actor died; Ray Data's default is
            # forever) has no named parameter of map_batches in Ray 2.60, which warns of the others
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            dataset = dataset.map_batches(
                ShardActor, fn_constructor_kwargs={"job": job}, batch_size=1, batch_format="numpy",
                # all actors started at once, each given one shard at a time
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors, initial_size=num_actors,
                                                   max_tasks_in_flight_per_actor=1),
                num_cpus=1, num_gpus=num_gpus, max_task_retries=max_retries,
            )
        rows = {"done": [], "failed": []}
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for key in rows:
                rows[key] += batch[key].tolist()
        return rows
    finally:
        for key, value in saved.items():
            setattr(context, key, value)
