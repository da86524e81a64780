"""
The pipeline of an extraction, what every process (rank) runs (:func:`extract`): it extracts
its contiguous run of input batches (split as detectron2's ``InferenceSampler`` splits) into
its parts of the outputs, images decoded in DataLoader workers and records written in a
thread beside the model; rank 0 then merges the parts, completes the manifest and prints a
summary. Outputs and their crash safety are described in :mod:`d2_regionfeat.formats`.
"""
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import torch
from tqdm import tqdm

from detectron2.data.samplers import InferenceSampler
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .inputs import ImageDataset
from .job import ExtractionJob, finish, summary
from .manifest import read_manifest
from .model_call import BatchExtractor
from .run import RunFolder, RunOutputs

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
    """A rank's counts for the summary: images, regions per image, seconds in model/writers."""
    return {"skipped": skipped, "done": 0, "failed": 0, "regions": [], "model_s": 0.0, "write_s": 0.0}


def _rank_outputs(job: ExtractionJob) -> RunOutputs:
    """This rank's writers and logs, over the run's images."""
    usable = [i for i in job.items if not i.error]
    return RunFolder(job.output_dir, job.formats).outputs(
        comm.get_rank(), comm.get_world_size(),
        [i.image_id for i in usable], {i.image_id: i.path for i in usable},
    )


def _extract_batches(job: ExtractionJob, batches: List[List[int]]) -> Dict:
    """
    Extract this rank's ``batches`` (of indices into ``job.items``) into its parts.

    Images are decoded in DataLoader workers (received one batch ahead, in a thread), and
    written in a thread (in order, at most :data:`WRITE_AHEAD` batches behind the model), so
    that the model waits for neither.
    """
    outputs = _rank_outputs(job)
    recorded = outputs.recorded
    todo = [b for b in batches if any(job.items[i].image_id not in recorded for i in b)]
    stats = _new_stats(skipped=sum(job.items[i].image_id in recorded for b in batches for i in b))
    if todo:
        config = job.model_config
        dataset = ImageDataset(job.items, config.input_format, config.min_size_test, config.max_size_test)
        # started first: the workers decode the first batches while the model is built
        loader = iter(torch.utils.data.DataLoader(
            dataset, batch_sampler=todo, num_workers=job.num_workers, collate_fn=_as_list
        ))
        extractor = BatchExtractor(job.model_config, job.fp16, job.amp)
        bar = tqdm(
            total=sum(map(len, batches)), initial=stats["skipped"], unit="img", dynamic_ncols=True,
            disable=not comm.is_main_process(), desc=f"extract (rank 0 of {comm.get_world_size()})",
            mininterval=1.0,  # each redraw costs the model thread a GIL hand-over
        )
        with bar, ThreadPoolExecutor(max_workers=1) as write_thread, \
                ThreadPoolExecutor(max_workers=1) as read_thread:
            pending = deque()
            for batch in _read_ahead(loader, read_thread):
                batch = [x for x in batch if x["item"].image_id not in recorded]
                failed = [x for x in batch if "error" in x]
                start = time.perf_counter()
                records = extractor([x for x in batch if "error" not in x])
                stats["model_s"] += time.perf_counter() - start
                failed = [
                    {"image_id": x["item"].image_id, "path": x["item"].path, "reason": x["error"]}
                    for x in failed
                ]
                pending.append(write_thread.submit(_timed, outputs.store, records, failed))
                while len(pending) > WRITE_AHEAD:
                    stats["write_s"] += pending.popleft().result()
                stats["done"] += len(records)
                stats["failed"] += len(failed)
                stats["regions"] += [r["num_bbox"] for r in records if "num_bbox" in r]
                bar.update(len(batch))
            while pending:
                stats["write_s"] += pending.popleft().result()
    outputs.close()
    return stats


def extract(job: ExtractionJob):
    """
    What each rank runs: its shard, then (rank 0) the merge and summary.

    The inputs are cut into batches of ``job.batch_size`` first, and the batches shared out
    in contiguous runs (as ``InferenceSampler`` shares images): every image is batched with
    the same others whatever the number of processes, or of resumes.
    """
    start = time.perf_counter()
    rank, world_size = comm.get_rank(), comm.get_world_size()
    # detectron2's logs (checkpoint loading, incompatible keys) of rank 0, as train_net's
    setup_logger(distributed_rank=rank, name="fvcore")
    setup_logger(distributed_rank=rank)
    step, size = job.batch_size, len(job.items)
    batches = [list(range(i, min(i + step, size))) for i in range(0, size, step)]
    batches = [batches[b] for b in InferenceSampler._get_local_indices(len(batches), world_size, rank)]
    if job.complete:
        stats = _new_stats(skipped=sum(map(len, batches)))
    else:
        stats = _extract_batches(job, batches)
    stats = comm.gather(stats, dst=0)
    if comm.is_main_process():
        if not job.complete:
            finish(job, world_size)
        seconds = time.perf_counter() - start
        print(summary(job.output_dir, read_manifest(job.output_dir), stats, seconds))
    comm.synchronize()
