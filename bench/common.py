"""Shared pieces of the benchmarks: timing side by side, test images and models, result tables/JSON."""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS = os.path.join(BENCH_DIR, "results")
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]  # this checkout's package; random-init model helpers


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
        "load_average_1min": os.getloadavg()[0],
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def parser(doc):
    """An argument parser with the options every benchmark has: --device, --results."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", default=RESULTS, help="folder for the JSON results")
    return p


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def write_images(folder, count, kind="shapes"):
    """
    ``count`` JPEG images in ``folder`` (made once, kept): ``shapes``, the synthetic shapes the
    shipped model was trained on (240-320 px), or ``photo``, 480 x 640 blobs on noise, the
    size of a COCO image. Returns ``folder``.
    """
    from d2_regionfeat.data.synthetic import render_image
    from helpers import image

    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        path = os.path.join(folder, f"{kind}_{i:06d}.jpg")
        if os.path.exists(path):
            continue
        if kind == "shapes":
            rgb = render_image([7, i])[0]
        else:
            rgb = image(i, 480, 640).permute(1, 2, 0).numpy().astype(np.uint8)
        Image.fromarray(rgb).save(path + ".tmp.jpg", quality=90)
        os.replace(path + ".tmp.jpg", path)
    return folder


@torch.no_grad()
def calibrate_norms(model, height=240, width=320):
    """
    Set the statistics of every (frozen) batch norm of a random-init ``model`` to those of its
    input on a sample image, in one forward pass, so that activations keep a trained
    network's scale: with the default statistics a deep random ResNet overflows (a random
    ResNet-101 gives no finite proposal).
    """
    from helpers import image

    def calibrate(module, args):
        x = args[0].transpose(0, 1).flatten(1)
        module.running_mean.copy_(x.mean(1))
        module.running_var.copy_(x.var(1))

    norms = [m for m in model.modules() if hasattr(m, "running_mean") and hasattr(m, "running_var")]
    handles = [m.register_forward_pre_hook(calibrate) for m in norms]
    model([{"image": image(54321, height, width)}])
    for handle in handles:
        handle.remove()
    return model


def save_model(cfg, folder, name, seed=0):
    """
    Build ``cfg`` from ``seed`` (random weights, tamed as in the tests) and save it as
    ``folder/<name>.yaml`` + ``.pth``, for tools that take a config file. Returns the yaml path.
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from helpers import build, tame

    os.makedirs(folder, exist_ok=True)
    cfg = cfg.clone()
    cfg.MODEL.DEVICE = "cpu"
    model = tame(calibrate_norms(build(cfg, seed=seed, wild=True)))
    DetectionCheckpointer(model, save_dir=folder).save(name)
    cfg.MODEL.WEIGHTS = os.path.join(folder, name + ".pth")
    path = os.path.join(folder, name + ".yaml")
    with open(path, "w") as f:
        f.write(cfg.dump())
    return path


def shipped_model(folder):
    """The shipped default model's config, with its weights set, as ``folder/shipped.yaml``."""
    from d2_regionfeat.default_model import get_default_model_cfg

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "shipped.yaml")
    with open(path, "w") as f:
        f.write(get_default_model_cfg("cpu").dump())
    return path


def run_child(args, threads=1, timeout=None, env=None):
    """
    Run ``python bench/<args...>`` in a fresh process with ``threads`` torch/OMP threads
    (and the variables ``env``), and the last line it prints parsed as JSON; ``launched``
    (its start, time.time()) is passed as the first argument so that it can tell its
    start-up time.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    script, *rest = args
    command = [sys.executable, os.path.join(BENCH_DIR, script), repr(time.time()), *map(str, rest)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def alternating_runs(variants, repeats, threads=1):
    """
    Run each variant ``repeats`` times with :func:`run_child`, alternating their order from one
    repeat to the next (first to last, then last to first), so that machine noise hits all of
    them alike; ``variants[name]()`` gives the arguments of a run (called just before it, so it
    may clear that run's output). Returns {name: [each run's JSON]}.
    """
    runs = {name: [] for name in variants}
    for r in range(repeats):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            runs[name].append(run_child(variants[name](), threads=threads))
    return runs


def disk_bytes(path):
    """Bytes of the file ``path``, or of every file under the folder ``path``."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def print_table(rows, columns):
    """Print ``rows`` (list of dicts) as a table of ``columns``."""
    widths = {c: max([len(c)] + [len(_fmt(r[c])) for r in rows]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(widths[c]) for c in columns))


def report(name, rows, columns, extra=None, results=RESULTS):
    """Print ``rows`` (list of dicts) as a table and write ``results``/<name>.json."""
    print_table(rows, columns)
    os.makedirs(results, exist_ok=True)
    path = os.path.join(results, f"{name}.json")
    with open(path, "w") as f:
        json.dump(
            {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
             "rows": rows, **(extra or {})},
            f, indent=1,
        )
    print(f"written {path}")


def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)
