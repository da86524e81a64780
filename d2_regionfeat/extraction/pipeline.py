"""
The pipeline of an extraction, what every process (rank) runs (:func:`extract`), and its one
loop (:func:`run_batches`): batches decoded in DataLoader workers go to the model (with
:class:`.model_call.OutOfMemoryFallback`) and their records to a sink (:mod:`.sinks`) in a
thread beside it. A folder run's rank extracts its contiguous run of input batches (split as
detectron2's ``InferenceSampler`` splits), read from the stream of inputs as it goes, into its
parts of the outputs, and rank 0 then merges the parts, completes the manifest and prints a
summary; a shard run's rank extracts every world-size-th of the worker's input shards that is
not complete (:func:`extract_input_shards`, which the actors of :mod:`.ray_engine` run too).
Outputs and their crash safety are described in :mod:`d2_regionfeat.formats`.
"""
import itertools
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, Iterator, List, Tuple

import torch
from tqdm import tqdm

from detectron2.data.samplers import InferenceSampler
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..formats.feature_shards import is_complete
from .inputs import ImageItem
from .job import ExtractionJob, finish, prepare_job, shard_summary, summary
from .manifest import read_manifest
from .model_call import OutOfMemoryFallback
from .run import RunFolder
from .input_shards import InputShard, ShardDataset
from .sinks import FolderSink, ShardSink

# How many batches the writer thread may lag behind the model.
WRITE_AHEAD = 2


def _as_list(batch):
    return batch


def _timed(function, *args):
    """The seconds ``function(*args)`` takes."""
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def _read_ahead(loader, thread):
    """
    The batches of ``loader``, each next one received in ``thread`` while this one is used:
    receiving a batch from a DataLoader worker waits on that process (its tensors' shared
    memory is handed over through it), which the model need not do.
    """
    done = object()
    upcoming = thread.submit(next, loader, done)
    while True:
        batch = upcoming.result()
        if batch is done:
            return
        upcoming = thread.submit(next, loader, done)
        yield batch


def _new_stats(skipped):
    """
    A rank's counts for the summary: images, regions (images with regions, their sum, min and
    max: counts, not a list per image), seconds in model/writers.
    """
    return {"skipped": skipped, "done": 0, "failed": 0, "model_s": 0.0, "write_s": 0.0,
            "regions": {"images": 0, "sum": 0, "min": math.inf, "max": 0}}


def _count_regions(regions: Dict, numbers):
    """Add the images of ``numbers`` (regions per image) to the ``regions`` counts of a rank's stats."""
    if numbers:
        regions.update(images=regions["images"] + len(numbers), sum=regions["sum"] + sum(numbers),
                       min=min(regions["min"], *numbers), max=max(regions["max"], *numbers))


def run_batches(loader, extractor, sink, stats: Dict, skip=frozenset(), bar=None):
    """
    The loop of every run: each batch of ``loader`` (lists of :class:`.inputs.ImageDataset`
    entries, less those whose id is in ``skip``) through ``extractor`` (retried by
    :class:`.model_call.OutOfMemoryFallback`), then to ``sink.store`` (see :mod:`.sinks`).

    Batches are received one ahead, in a thread, and stored in another (in order, at most
    :data:`WRITE_AHEAD` batches behind the model), so that the model waits for neither.
    ``sink`` is closed at the end, also when the loop stops on an error.
    """
    run = OutOfMemoryFallback(extractor)
    try:
        with ThreadPoolExecutor(max_workers=1) as write_thread, \
                ThreadPoolExecutor(max_workers=1) as read_thread:
            pending = deque()
            for batch in _read_ahead(iter(loader), read_thread):
                batch = [x for x in batch if "item" not in x or x["item"].image_id not in skip]
                inputs = [x for x in batch if "image" in x]
                start = time.perf_counter()
                records = run(inputs, lambda x, reason: x.update(error=reason)) if inputs else []
                stats["model_s"] += time.perf_counter() - start
                for x, record in zip(inputs, records):
                    del x["image"]
                    if record is not None:
                        x["record"] = record
                pending.append(write_thread.submit(_timed, sink.store, batch))
                while len(pending) > WRITE_AHEAD:
                    stats["write_s"] += pending.popleft().result()
                stats["done"] += sum("record" in x for x in batch)
                stats["failed"] += sum("error" in x for x in batch)
                _count_regions(stats["regions"], [x["record"]["num_bbox"] for x in batch if "num_bbox" in x.get("record", {})])
                if bar is not None:
                    bar.update(sum("item" in x for x in batch))
            while pending:
                stats["write_s"] += pending.popleft().result()
    finally:
        sink.close()


def _progress(total, initial):
    return tqdm(
        total=total, initial=initial, unit="img", dynamic_ncols=True,
        disable=not comm.is_main_process(), desc=f"extract (rank 0 of {comm.get_world_size()})",
        mininterval=1.0,  # each redraw costs the model thread a GIL hand-over
    )


def rank_range(count: int, batch_size: int, rank: int, world_size: int) -> range:
    """
    The positions of a rank's inputs among ``count``: its contiguous run of the batches of
    ``batch_size`` (as detectron2's ``InferenceSampler`` shares images out), so that every
    image is batched with the same others whatever the number of processes, or of resumes.
    """
    batches = InferenceSampler._get_local_indices(-(-count // batch_size), world_size, rank)
    return range(batches.start * batch_size, min(batches.stop * batch_size, count))


def plan_rank(items: Iterable[ImageItem], mine: range, batch_size: int, recorded) -> Tuple[int, Iterator]:
    """
    A rank's work over the stream ``items``, ``mine`` its positions (:func:`rank_range`):
    how many of its images are ``in recorded`` (:attr:`.run.RankFiles.recorded`: read through
    once now), and its batches to do (lists of items, read again as they are taken), less
    those whose every image is recorded.
    """
    recorded_count = sum(i.image_id in recorded for i in itertools.islice(items, mine.start, mine.stop))

    def batches():
        batch = []
        for item in itertools.islice(items, mine.start, mine.stop):
            batch.append(item)
            if len(batch) == batch_size:
                if any(i.image_id not in recorded for i in batch):
                    yield batch
                batch = []
        if any(i.image_id not in recorded for i in batch):
            yield batch

    return recorded_count, batches()


def _extract_batches(job: ExtractionJob, mine: range, extractor=None) -> Dict:
    """
    Extract this rank's inputs (``mine``: their positions in ``job.items``) into its parts,
    its batches to do (:func:`plan_rank`) handed to the DataLoader workers as they are read.
    """
    outputs = RunFolder(job.output_dir, job.formats).outputs(comm.get_rank(), comm.get_world_size())
    skipped, todo = plan_rank(job.items, mine, job.batch_size, outputs.recorded)
    stats = _new_stats(skipped)
    if skipped == len(mine):
        outputs.close()
        return stats
    # started first: the workers decode the first batches while the model is built
    loader = iter(torch.utils.data.DataLoader(
        job.images([]), batch_sampler=todo, num_workers=job.num_workers, collate_fn=_as_list
    ))
    extractor = extractor or job.extractor()
    with _progress(len(mine), skipped) as bar:
        run_batches(loader, extractor, FolderSink(outputs), stats, skip=outputs.recorded, bar=bar)
    return stats


def extract_input_shards(job: ExtractionJob, shards: List[InputShard], extractor=None) -> Dict:
    """
    The default engine's work on ``shards`` (of ``job.shards``): each one not yet complete is
    read and decoded in DataLoader workers (up to ``job.num_workers``, a shard each) and goes
    through :func:`run_batches` into its output shard (:class:`.sinks.ShardSink`). What a rank
    of :func:`extract` runs on its share, and a Ray actor on each of its shards
    (:mod:`.ray_engine`). ``extractor``: in place of the job's.

    Returns:
        counts ``{"shards", "complete" (already), "lost" (names of those that could not be
        read)}`` and the loop's (``"done"``, ``"failed"``, ...), for :func:`.job.shard_summary`.
    """
    todo = [s for s in shards if not is_complete(job.output_dir, s.name)]
    stats = dict(_new_stats(skipped=0), shards=len(shards), complete=len(shards) - len(todo), lost=[])
    if not todo:
        return stats
    dataset = ShardDataset(todo, job.images([]), job.batch_size, job.id_field, job.limit)
    loader = iter(torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=min(job.num_workers, len(todo)), collate_fn=_as_list
    ))
    sink = ShardSink(job.output_dir)
    run_batches(loader, extractor or job.extractor(), sink, stats)
    stats["lost"] = sink.lost
    return stats


def shard_counts(stats: Dict) -> Dict:
    """The counts a shard run returns of :func:`extract_input_shards`'s ``stats``."""
    return {"shards": stats["shards"], "skipped": stats["complete"], "done": stats["done"],
            "failed": stats["failed"], "lost": stats["lost"]}


def extract(job: ExtractionJob, extractor=None):
    """
    What each rank runs: its part of the inputs (:func:`rank_range`), then (rank 0) the
    merge and summary. ``extractor``: in place of the job's :class:`.model_call.BatchExtractor`.
    """
    start = time.perf_counter()
    rank, world_size = comm.get_rank(), comm.get_world_size()
    # detectron2's logs (checkpoint loading, incompatible keys) of rank 0, as train_net's
    setup_logger(distributed_rank=rank, name="fvcore")
    setup_logger(distributed_rank=rank)
    if job.shards is not None:
        stats = comm.gather(extract_input_shards(job, job.shards[rank::world_size], extractor), dst=0)
        if comm.is_main_process():
            print(shard_summary(job.output_dir, stats, time.perf_counter() - start))
        comm.synchronize()
        return stats
    mine = rank_range(job.count, job.batch_size, rank, world_size)
    if job.complete:
        stats = _new_stats(skipped=len(mine))
    else:
        stats = _extract_batches(job, mine, extractor)
    stats = comm.gather(stats, dst=0)
    if comm.is_main_process():
        if not job.complete:
            finish(job, world_size)
        seconds = time.perf_counter() - start
        print(summary(job.output_dir, read_manifest(job.output_dir), stats, seconds))
    comm.synchronize()
    return stats


def extract_shards(cfg, source: str, output_dir: str, extractor=None, **settings) -> Dict:
    """
    A shard run in this process (one rank): :func:`.job.prepare_job` of ``source`` (tar
    shards, or ``shard_size=N``) and ``settings``, then :func:`extract`.

    Returns:
        counts ``{"shards", "skipped" (already complete), "done", "failed", "lost" (names)}``.
    """
    job = prepare_job(cfg, source, output_dir, ["npz"], 1, **settings)
    return shard_counts(extract(job, extractor)[0])
