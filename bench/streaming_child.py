"""
One measurement of bench_streaming.py, in its own process (so that its peak is its own):
list an input, check its ids for the layouts, and plan rank 0's work of a 1-process run over
an output folder (what ``prepare_job`` and a rank do before the model, which is skipped); or
(``--way shards``) plan a ``--shard-size`` run of it and read every shard's images, as a
worker's :class:`ShardDataset` does before decoding; prints the process's peak resident
memory (``VmHWM``) and that after the imports, as JSON.

    python bench/streaming_child.py LAUNCHED --input SRC --output OUT --formats npz,hdf5 --way streamed|list|shards
"""
import argparse
import json
import sys
import time

import common  # noqa: F401  (this checkout's package first on sys.path)
from d2_regionfeat.extraction.input_shards import plan_shards, shard_items
from d2_regionfeat.extraction.inputs import Inputs, list_inputs
from d2_regionfeat.extraction.pipeline import plan_rank, rank_range
from d2_regionfeat.extraction.run import RunFolder, check_ids

BATCH_SIZE = 4
SHARD_SIZE = 1000


def status_mb(key):
    """``VmRSS`` or ``VmHWM`` (peak) of this process, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("launched")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--formats", required=True)
    p.add_argument("--way", choices=("streamed", "list", "shards"), required=True)
    args = p.parse_args()
    formats = args.formats.split(",")
    base = status_mb("VmRSS")
    start = time.perf_counter()
    if args.way == "shards":
        shards, _ = plan_shards(args.input, SHARD_SIZE)
        listed = time.perf_counter()
        count = sum(1 for shard in shards for _ in shard_items(shard))
        print(json.dumps({
            "count": count, "skipped": 0, "todo": count, "base_rss_mb": base, "peak_rss_mb": status_mb("VmHWM"),
            "list_check_s": listed - start, "plan_s": time.perf_counter() - listed,
        }))
        return
    if args.way == "streamed":  # as prepare_job and pipeline do
        items = Inputs(args.input)
        count, _ = items.check()
        check_ids(formats, items.usable_ids())
    else:  # the listing held as one list, its ids checked from a list
        items = list_inputs(args.input)
        count = len(items)
        check_ids(formats, [i.image_id for i in items if not i.error])
    listed = time.perf_counter()
    outputs = RunFolder(args.output, formats).outputs(0, 1)
    skipped, batches = plan_rank(items, rank_range(count, BATCH_SIZE, 0, 1), BATCH_SIZE, outputs.recorded)
    todo = sum(len(b) for b in batches)
    outputs.close()
    print(json.dumps({
        "count": count, "skipped": skipped, "todo": todo, "base_rss_mb": base,
        "peak_rss_mb": status_mb("VmHWM"), "list_check_s": listed - start,
        "plan_s": time.perf_counter() - listed,
    }))


if __name__ == "__main__":
    sys.exit(main())
