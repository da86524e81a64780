#!/usr/bin/env python
"""
Child of ``bench_memory.py``: reopen (recover) and merge the TSV and HDF5 parts of an output
folder, with the address space capped (``RLIMIT_AS``) at what the process holds after its
imports plus --cap-mb. First checks that the cap bites: reading a whole part must fail.
Prints one JSON line.

    python bench/merge_under_cap.py LAUNCHED --output DIR --world-size 2 --cap-mb 32 [--slab-mb 4]
"""
import argparse
import json
import os
import resource
import sys
import time
import traceback

sys.argv.pop(1)  # launch time (see common.run_child); unused
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2_regionfeat.formats.hdf5 import Hdf5Layout  # noqa: E402
from d2_regionfeat.formats.tsv import TsvLayout  # noqa: E402


def vm_size_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--cap-mb", type=float, required=True)
    parser.add_argument("--slab-mb", type=float, help="Hdf5Layout.slab_bytes (default: its own)")
    args = parser.parse_args()
    if args.slab_mb:
        Hdf5Layout.slab_bytes = int(args.slab_mb * 2**20)
    import h5py  # noqa: F401  (loaded before the cap is measured, as the merge loads it)

    base = vm_size_bytes()
    cap = base + int(args.cap_mb * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
    result = {"base_vm_mb": base / 2**20, "cap_mb": args.cap_mb}
    part = TsvLayout.parts(args.output, args.world_size)[0]
    result["part_mb"] = os.path.getsize(part) / 2**20
    try:
        with open(part, "rb") as f:
            f.read()
        result["whole_part_read"] = "succeeded (the cap does not bite)"
    except MemoryError:
        result["whole_part_read"] = "MemoryError"
    for cls in (TsvLayout, Hdf5Layout):
        start = time.perf_counter()
        try:
            for rank in range(args.world_size):  # what --resume does: recover each part
                cls(args.output, rank, args.world_size).close()
            cls.merge(args.output, args.world_size)
            result[cls.name] = "ok"
        except MemoryError:
            result[cls.name] = "MemoryError: " + " <- ".join(
                f"{frame.name} ({os.path.basename(frame.filename)}:{frame.lineno})"
                for frame in reversed(traceback.extract_tb(sys.exc_info()[2])[-3:])
            )
        result[cls.name + "_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


if __name__ == "__main__":
    main()
