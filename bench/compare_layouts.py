"""
Layout bytes of two checkouts, side by side: the same small random-init model extracts the
same images into every region layout (a folder run), into output shards (a tar-shard run),
and converts the folder run to every layout; each file of this checkout's outputs must be
byte for byte the one the ``--base`` commit makes.

    python bench/compare_layouts.py [--base main] [--keep DIR]

Both runs are on this machine, one thread each, so float features agree to the bit; only
``manifest.json`` and ``shards.json`` (versions, paths, keys added since) are compared by
what says what made the output.
Exit status 0 when every file is the same, else 1 with the differing paths.
"""
import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile

from common import REPO, save_model, write_images

# manifest entries that say what made the output (not where, nor with which versions)
MANIFEST_KEYS = ("config_sha256", "weights_sha256", "formats", "class_names", "counts", "feature_dim")
SHARDS_KEYS = ("config_sha256", "weights_sha256", "fp16", "amp", "id", "id_field", "shard_size")


def export(commit, folder):
    """The tree of ``commit`` of this repository, in ``folder``."""
    archive = subprocess.run(["git", "-C", REPO, "archive", commit], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder)
    return folder


def tool(checkout, name, *args):
    env = dict(os.environ, PYTHONPATH=checkout, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.join(checkout, "tools", name), *map(str, args)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{checkout}: {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def write_shard(images, path):
    with tarfile.open(path, "w") as tar:
        for name in sorted(os.listdir(images)):
            tar.add(os.path.join(images, name), arcname=name)


def outputs(checkout, model, images, shards, out):
    """The files the checkout's tools write (relative path -> bytes)."""
    formats = ",".join(json.loads(subprocess.run(
        [sys.executable, "-c", "import json, d2_regionfeat.formats as f; print(json.dumps(f.REGION_FORMATS))"],
        env=dict(os.environ, PYTHONPATH=checkout), check=True, capture_output=True, text=True).stdout))
    common = ["--config-file", model, "--batch-size", "2", "--num-workers", "1"]
    tool(checkout, "extract_net.py", *common, "--input", images, "--output", f"{out}/run", "--format", formats)
    tool(checkout, "convert_features.py", f"{out}/run", "--format", formats, "--output", f"{out}/converted")
    tool(checkout, "extract_net.py", *common, "--input", shards, "--output", f"{out}/shards")
    found = {}
    for root, _, files in os.walk(out):
        for f in files:
            path = os.path.join(root, f)
            found[os.path.relpath(path, out)] = open(path, "rb").read()
    return found


def identity(name, data):
    keys = {"manifest.json": MANIFEST_KEYS, "shards.json": SHARDS_KEYS}.get(os.path.basename(name))
    if keys is None:
        return data
    manifest = json.loads(data)
    return {k: manifest.get(k) for k in keys}


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--base", default="main", help="commit to compare this checkout with")
    parser.add_argument("--keep", help="folder for the outputs (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="compare_layouts_")
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from helpers import make_cfg

    cfg = make_cfg("fpn", SELECTION="regions", MIN_BOXES=3, MAX_BOXES=8, CLASS_PROBS=True)
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.MASK_ON = False
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 128, 192
    model = save_model(cfg, os.path.join(work, "model"), "model")
    images = write_images(os.path.join(work, "images"), 3)
    write_shard(images, os.path.join(work, "00000.tar"))
    shards = os.path.join(work, "00000.tar")
    base = outputs(export(args.base, os.path.join(work, "base")), model, images, shards, os.path.join(work, "out_base"))
    this = outputs(REPO, model, images, shards, os.path.join(work, "out_this"))
    differ = sorted(k for k in base.keys() | this.keys()
                    if k not in base or k not in this or identity(k, base[k]) != identity(k, this[k]))
    print(f"{len(this)} files of this checkout against {len(base)} of {args.base}: "
          + (f"{len(differ)} differ: {', '.join(differ)}" if differ else "all the same"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
