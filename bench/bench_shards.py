#!/usr/bin/env python
"""
Shards: the shard path (tar shards in, output shards out) against the folder path on the same
images, the bytes on disk per image of each layout, and what both make of a web-scale corpus
(the cost model of bench/README.md).

1. Throughput: --images synthetic-shapes JPEGs, as a folder and as tar shards of --shard-size
   images in img2dataset's layout (``<key>.jpg`` + ``<key>.json`` + ``<key>.txt``, keys
   ``<shard:05d><sample:04d>``, written with webdataset's ``TarWriter`` as img2dataset writes
   them). ``tools/extract_net.py`` with the shipped model over each (the folder run writes
   ``npz``, the members of the output shards), each in a fresh process, alternately --repeats
   times; both decode in --num-workers DataLoader workers. Medians of images/s after start-up,
   the median of the pairs' ratios (shards / folder, target >= 0.95), busy fractions.
2. Bytes at the model's regions: the timed runs' npz and output shards, and the folder's
   images extracted once more (untimed) into the other layouts of --formats, per image.
3. Bytes at --regions (two counts, 36 and 100) of --dim (2048): --records synthetic records
   shaped as the BUTD Visual Genome model's (``configs/VG``: 1600 classes, 400 attributes, so
   ``cls_prob`` (N, 1601) and ``attr_prob`` (N, 401) besides the features), written through
   every layout of --formats and as output shards (each carrying an img2dataset json and
   caption), with float32 features and with ``--fp16``'s float16 ones. Per image, and the
   per-image and per-region parts solved from the two counts (bytes = a + b N).
4. Cost: seconds per image and bytes per image turned into worker-hours and TB for CC3M
   (3.3M images) and 100M images: the shard run's measured rate, the R101-C4 rate measured by
   ``bench_large.py`` (--large-results, when there) and an assumed GPU rate (--gpu-img-s).

    python bench/bench_shards.py [--images 400] [--shard-size 50] [--repeats 3] [--records 50]
"""
import hashlib
import io
import json
import os
import shutil
import statistics
import tempfile

import numpy as np
from PIL import Image

from bench_writers import bench_layout
from common import RESULTS, alternating_runs, disk_bytes, parser, print_table, report, run_child, \
    shipped_model, write_images
from d2_regionfeat.formats import LAYOUT_PATHS, REGION_FORMATS, ShardFolder
from d2_regionfeat.formats.feature_shards import SHARDS, FeatureShardWriter
from d2_regionfeat.formats.records import REGION_SPEC
from d2_regionfeat.io import read_features
from records import RecordMaker

# Corpora of the cost model: name -> images.
CORPORA = {"CC3M": 3.3e6, "100M": 1e8}
# The BUTD Visual Genome model's classes and attributes (configs/VG), for the synthetic records.
VG_CLASSES, VG_ATTRIBUTES = 1600, 400
# The assumed GPU rate's source (see bench/README.md, "Cost model").
GPU_SOURCE = (
    "assumed: LXMERT's Caffe BUTD R101 extractor, 107,292 NLVR2 images in 5-6 h on one GPU "
    "(github.com/ChenRocks/UNITER/issues/60), i.e. 5.0-6.0 img/s"
)


def img2dataset_members(key, index, width, height, sha256):
    """The json (img2dataset's metadata) and txt (caption) members of sample ``key``."""
    caption = f"a synthetic picture of coloured shapes, number {index}"
    meta = {
        "url": f"https://example.com/images/{key}.jpg", "caption": caption, "key": key,
        "status": "success", "error_message": None, "width": width, "height": height,
        "original_width": width, "original_height": height, "exif": "{}", "sha256": sha256,
    }
    return {"json": json.dumps(meta).encode(), "txt": caption.encode()}


def write_input_shards(images, folder, shard_size):
    """
    The JPEGs of the folder ``images`` (in name order) as img2dataset's tar shards
    ``folder/00000.tar``, ... of ``shard_size`` samples, written with webdataset's
    ``TarWriter``. Returns their brace pattern.
    """
    import webdataset as wds

    os.makedirs(folder, exist_ok=True)
    names = sorted(os.listdir(images))
    shards = range((len(names) + shard_size - 1) // shard_size)
    for shard in shards:
        with wds.TarWriter(os.path.join(folder, f"{shard:05d}.tar")) as tar:
            for i, name in enumerate(names[shard * shard_size: (shard + 1) * shard_size]):
                with open(os.path.join(images, name), "rb") as f:
                    jpeg = f.read()
                key = f"{shard:05d}{i:04d}"
                width, height = Image.open(io.BytesIO(jpeg)).size
                members = img2dataset_members(key, shard * shard_size + i, width, height,
                                              hashlib.sha256(jpeg).hexdigest())
                tar.write({"__key__": key, "jpg": jpeg, **members})
    return os.path.join(folder, f"{{00000..{len(shards) - 1:05d}}}.tar")


def throughput(args, work, config, images, pattern):
    """The folder run and the shard run, alternately; returns the row and the two output folders."""
    outputs = {"folder": os.path.join(work, "out-folder"), "shards": os.path.join(work, "out-shards")}

    def run(path, source):
        def arguments():
            shutil.rmtree(outputs[path], ignore_errors=True)
            return ["extract_runs.py", "extract", "--config", config, "--images", source,
                    "--output", outputs[path], "--device", args.device, "--batch-size", args.batch_size,
                    "--num-workers", args.num_workers]
        return arguments

    runs = alternating_runs({"folder": run("folder", images), "shards": run("shards", pattern)},
                            args.repeats, args.threads)
    for path in runs:
        if any(r["images"] != args.images for r in runs[path]):
            raise AssertionError(f"the {path} run extracted {[r['images'] for r in runs[path]]} of {args.images}")

    def median(path, key):
        return statistics.median(r[key] for r in runs[path])

    row = {
        "images": args.images, "shards": len(os.listdir(os.path.dirname(pattern))),
        "folder_img_s": median("folder", "images_per_s"), "shards_img_s": median("shards", "images_per_s"),
        "ratio": statistics.median(s["images_per_s"] / f["images_per_s"]
                                   for s, f in zip(runs["shards"], runs["folder"])),
        "folder_busy": median("folder", "busy"), "shards_busy": median("shards", "busy"),
        "folder_startup_s": median("folder", "startup_s"), "shards_startup_s": median("shards", "startup_s"),
        "folder_writers_frac": median("folder", "writer_s") / median("folder", "run_s"),
        "shards_writers_frac": median("shards", "writer_s") / median("shards", "run_s"),
        "runs": runs,
    }
    return row, outputs


def model_bytes(args, work, config, images, outputs):
    """
    Rows of bytes per image at the shipped model's regions: the timed runs' npz and output
    shards (``outputs``), and the other layouts of ``args.formats`` from one more run.
    """
    records = list(read_features(outputs["folder"], "npz"))
    regions = float(np.mean([r["num_bbox"] for r in records]))
    dim = int(records[0]["x"].shape[1])
    others = [name for name in args.formats.split(",") if name != "npz"]
    out = os.path.join(work, "out-layouts")
    if others:
        run_child(["extract_runs.py", "extract", "--config", config, "--images", images, "--output", out,
                   "--device", args.device, "--num-workers", args.num_workers, "--formats", ",".join(others)],
                  threads=args.threads)
    sizes = {name: disk_bytes(os.path.join(outputs["folder"] if name == "npz" else out, LAYOUT_PATHS[name]))
             for name in args.formats.split(",")}
    sizes[SHARDS] = disk_bytes(outputs["shards"])
    if len(ShardFolder(outputs["shards"])) != len(records):
        raise AssertionError(f"{len(ShardFolder(outputs['shards']))} records in the shards, {len(records)} in npz")
    return [{"format": name, "images": len(records), "regions": regions, "dim": dim,
             "bytes_per_image": size / len(records)} for name, size in sizes.items()]


def as_fp16(record):
    """``record`` as ``--fp16`` makes it: its keys stored as float16 that way (the features)."""
    spec = {key.name: key for key in REGION_SPEC}
    return {k: v.astype(spec[k].numpy_dtype(True)) if k in spec and spec[k].fp16 else v
            for k, v in record.items()}


def shard_bytes(maker, count, folder, carried):
    """Write ``count`` records of ``maker`` as one output shard in ``folder``, each carrying ``carried``."""
    os.makedirs(folder)
    writer = FeatureShardWriter(folder, "00000")
    for i in range(count):
        record = maker(i)
        writer.add(record, record["image_id"], carried)
    writer.close()
    if len(ShardFolder(folder)) != count:
        raise AssertionError(f"the shard of {count} records reads back {len(ShardFolder(folder))}")


def synthetic_bytes(args, work):
    """
    Rows of bytes per image of each layout (and shards), float32 and fp16, at each of
    ``args.regions``: the growth from ``args.records`` records to twice as many, per record,
    so that what a file holds once (headers, HDF5's last chunk of each dataset) stays out;
    that part is each row's ``fixed_bytes``.
    """
    carried = img2dataset_members("000000000", 0, 640, 480, hashlib.sha256(b"").hexdigest())
    rows = []
    for dtype in ("float32", "float16"):
        for regions in args.regions:
            maker = RecordMaker(regions, args.dim, VG_CLASSES, attributes=VG_ATTRIBUTES)
            make = maker if dtype == "float32" else (lambda i, maker=maker: as_fp16(maker(i)))
            for name in args.formats.split(",") + [SHARDS]:
                sizes = []
                for count in (args.records, 2 * args.records):
                    folder = os.path.join(work, f"{name}-{dtype}-{regions}-{count}")
                    if name == SHARDS:
                        shard_bytes(make, count, folder, carried)
                    else:
                        bench_layout(name, make, count, folder)  # written, merged, read back
                    sizes.append(disk_bytes(folder))
                    shutil.rmtree(folder)
                rows.append({"format": name, "features": dtype, "regions": regions, "dim": args.dim,
                             "bytes_per_image": (sizes[1] - sizes[0]) / args.records,
                             "fixed_bytes": 2 * sizes[0] - sizes[1]})
    return rows


def per_region_parts(rows, regions):
    """Per (format, features): bytes per image = per_image + per_region * N, solved from the two counts."""
    low, high = regions
    by = {(r["format"], r["features"], r["regions"]): r["bytes_per_image"] for r in rows}
    parts = []
    for name, dtype in dict.fromkeys((r["format"], r["features"]) for r in rows):
        per_region = (by[name, dtype, high] - by[name, dtype, low]) / (high - low)
        parts.append({"format": name, "features": dtype, "per_region": per_region,
                      "per_image": by[name, dtype, low] - low * per_region})
    return parts


def costs(rates, rows, regions):
    """Worker-hours of each rate and TB of each layout for :data:`CORPORA`."""
    hours = [{"rate": name, "img_s": rate, "source": source,
              **{f"{corpus}_hours": images / rate / 3600 for corpus, images in CORPORA.items()}}
             for name, (rate, source) in rates.items()]
    by = {(r["format"], r["features"], r["regions"]): r["bytes_per_image"] for r in rows}
    tb = [{"format": name, "features": dtype,
           **{f"MB_{n}": by[name, dtype, n] / 1e6 for n in regions},
           **{f"{corpus}_{n}_TB": images * by[name, dtype, n] / 1e12
              for corpus, images in CORPORA.items() for n in regions}}
          for name, dtype in dict.fromkeys((r["format"], r["features"]) for r in rows)]
    return hours, tb


def main():
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=400, help="images of the throughput runs")
    p.add_argument("--shard-size", type=int, default=50, help="images per input shard")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each path (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--formats", default=",".join(REGION_FORMATS), help="layouts whose bytes are measured")
    p.add_argument("--records", type=int, default=50,
                   help="synthetic records: this many, then twice as many, per layout and region count")
    p.add_argument("--regions", default="36,100", help="the two region counts of the synthetic records")
    p.add_argument("--dim", type=int, default=2048, help="feature size of the synthetic records")
    p.add_argument("--gpu-img-s", type=float, default=5.0, help="the assumed GPU rate of the cost model")
    p.add_argument("--large-results", default=os.path.join(RESULTS, "large.json"),
                   help="bench_large.py's JSON: its R101-C4 600 px rate goes into the cost model")
    p.add_argument("--work", help="folder for images, shards and outputs (default: a temporary one)")
    args = p.parse_args()
    args.regions = [int(n) for n in args.regions.split(",")]
    if len(args.regions) != 2 or args.regions[0] >= args.regions[1]:
        p.error(f"--regions takes two increasing region counts, not {args.regions}")

    with tempfile.TemporaryDirectory(dir=args.work) as work:
        config = shipped_model(work)
        images = write_images(os.path.join(work, "shapes"), args.images)
        pattern = write_input_shards(images, os.path.join(work, "input-shards"), args.shard_size)
        row, outputs = throughput(args, work, config, images, pattern)
        at_model = model_bytes(args, work, config, images, outputs)
        synthetic = synthetic_bytes(args, work)
    parts = per_region_parts(synthetic, args.regions)
    rates = {"shipped shapes Mask R-CNN, shard path, this CPU (measured)":
             (row["shards_img_s"], f"this run, {args.threads} thread(s), {args.num_workers} workers")}
    if os.path.isfile(args.large_results):
        with open(args.large_results) as f:
            large = {r["model"]: r for r in json.load(f)["rows"]}
        if "R101-C4 600px" in large:
            rates["R101-C4 600 px, 300 proposals, this CPU (measured)"] = (
                large["R101-C4 600px"]["extract_img_s"], f"bench_large.py, {os.path.relpath(args.large_results)}")
    rates["BUTD R101-C4 600 px, 1 GPU (assumed)"] = (args.gpu_img_s, GPU_SOURCE)
    hours, tb = costs(rates, synthetic, args.regions)

    print(f"\nbytes per image at the shipped model's regions ({at_model[0]['regions']:.1f} on average, "
          f"{at_model[0]['dim']}-d)")
    print_table(at_model, ["format", "images", "regions", "dim", "bytes_per_image"])
    print(f"\nbytes per image, synthetic BUTD VG records ({args.records} per layout), parts of a + b N")
    print_table(parts, ["format", "features", "per_image", "per_region"])
    print("\ncost: worker-hours")
    print_table(hours, ["rate", "img_s"] + [f"{c}_hours" for c in CORPORA])
    print("\ncost: TB")
    print_table(tb, ["format", "features"] + [k for k in tb[0] if k.endswith("TB") or k.startswith("MB")])
    print(f"\nshard path vs folder path, shipped model, {args.device}, {args.threads} thread(s) per process, "
          f"{args.num_workers} workers, {args.images} images, median of {args.repeats}")
    report(
        "shards", [row],
        ["images", "shards", "folder_img_s", "shards_img_s", "ratio", "folder_busy", "shards_busy",
         "folder_writers_frac", "shards_writers_frac"],
        {"device": args.device, "threads": args.threads, "repeats": args.repeats, "batch_size": args.batch_size,
         "num_workers": args.num_workers, "shard_size": args.shard_size, "model": "shipped shapes Mask R-CNN",
         "bytes_at_model": at_model, "synthetic_records": args.records,
         "synthetic_record": {"dim": args.dim, "classes": VG_CLASSES, "attributes": VG_ATTRIBUTES},
         "bytes_synthetic": synthetic, "bytes_parts": parts, "corpora": CORPORA,
         "cost_hours": hours, "cost_tb": tb},
        args.results,
    )


if __name__ == "__main__":
    main()
