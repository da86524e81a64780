"""Shared pieces of the benchmarks: timing side by side, and result tables/JSON."""
import json
import os
import platform
import statistics
import sys
import time

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS = os.path.join(BENCH_DIR, "results")
sys.path.insert(0, os.path.join(REPO, "tests"))  # random-init model helpers


def interleaved_medians(variants, repeats, warmup=1):
    """
    Time each ``variants[name]()`` ``repeats`` times, interleaving the variants so that
    machine noise hits all of them alike. Returns {name: median seconds}.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine():
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def report(name, rows, columns, extra=None):
    """Print ``rows`` (list of dicts) as a table and write bench/results/<name>.json."""
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(widths[c]) for c in columns))
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine(), "rows": rows, **(extra or {})}, f, indent=1)
    print(f"written {path}")


def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)
