#!/usr/bin/env python
"""
Writers: --records records (N = --regions, D = --dim, float32) written through every layout
of ``d2_regionfeat.formats.LAYOUTS`` (write, close, merge, as a 1-process extract_net run
does), then read back with ``d2_regionfeat.io.read_features``; MB/s (of the records' arrays)
and records/s of each, and the size on disk. The full setting is the issue's: 10 000 records,
N = 36, D = 2048 (3 GB of features per layout, one layout on disk at a time).

Then each layout's share of an extraction: ``extract_net`` with the shipped model over
--share-images images, one layout at a time; seconds in the writers (write in their thread,
close and merge at the end) over the wall time after start-up, and the model's busy
fraction (targets: < 5 % and >= 0.95).

    python bench/bench_writers.py [--records 10000] [--regions 36] [--dim 2048] [--share-images 200]
"""
import os
import shutil
import tempfile
import time

import numpy as np

from common import disk_bytes, parser, report, run_child, shipped_model, write_images
from d2_regionfeat.extraction.manifest import write_manifest
from d2_regionfeat.formats import REGION_FORMATS, LAYOUTS, WriteOnlyLayoutError
from d2_regionfeat.io import read_features
from records import RecordMaker, write_records


def bench_layout(name, maker, count, folder):
    """Write ``count`` records as ``name`` into ``folder``, read them back; returns a row."""
    os.makedirs(folder)
    write_manifest(folder, {"formats": [name]})  # as a run does before writing (oscar reads it)
    start = time.perf_counter()
    writer = LAYOUTS[name](folder, 0, 1)
    write_records(writer, maker, 0, count)
    writer.close()
    LAYOUTS[name].merge(folder, 1)
    shutil.rmtree(os.path.join(folder, "parts"), ignore_errors=True)  # as a finished run does
    write_s = time.perf_counter() - start
    mb = count * RecordMaker.payload_bytes(maker(0)) / 1e6
    row = {
        "format": name, "records": count, "write_s": write_s, "write_MB_s": mb / write_s,
        "write_rec_s": count / write_s, "read_s": None, "read_MB_s": None, "read_rec_s": None,
        "disk_MB": disk_bytes(folder) / 1e6,
    }
    start = time.perf_counter()
    seen = 0
    try:
        for record in read_features(folder, name):
            expected = maker(int(record["image_id"]))
            if record["x"].shape != expected["x"].shape:
                raise AssertionError(f"{name}: record {record['image_id']} read back as {record['x'].shape}")
            seen += 1
    except WriteOnlyLayoutError:  # pickled by its readers' design: never read back here
        return row
    read_s = time.perf_counter() - start
    # as stored: some layouts keep float16 (uniter)
    if seen != count or not np.array_equal(record["x"], expected["x"].astype(record["x"].dtype)):
        raise AssertionError(f"{name}: {seen} of {count} records read back, or the last differs")
    row.update(read_s=read_s, read_MB_s=mb / read_s, read_rec_s=count / read_s)
    return row


def extraction_shares(formats, count, work, device):
    """Rows of each layout's share of an extract_net run over ``count`` images."""
    config = shipped_model(work)
    images = write_images(os.path.join(work, "shapes"), count)
    rows = []
    for name in formats:
        out = os.path.join(work, "out")
        run = run_child(["extract_runs.py", "extract", "--config", config, "--images", images,
                         "--output", out, "--device", device, "--formats", name])
        shutil.rmtree(out)
        rows.append({"format": name, "images": run["images"], "writers_s": run["writer_s"],
                     "run_s": run["run_s"], "share": run["writer_s"] / run["run_s"], "busy": run["busy"]})
    return rows


def main():
    p = parser(__doc__)
    p.add_argument("--records", type=int, default=1000)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument(
        "--classes", type=int, default=80, help="K: records hold cls_prob (N, K+1), which uniter needs"
    )
    p.add_argument("--formats", default=",".join(REGION_FORMATS), help="layouts (default: every region layout)")
    p.add_argument("--share-images", type=int, default=200, help="images for the shares (0: skip)")
    p.add_argument("--work", help="folder to write in (default: a temporary one)")
    args = p.parse_args()
    maker = RecordMaker(args.regions, args.dim, args.classes)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        for name in args.formats.split(","):
            folder = os.path.join(work, name)
            rows.append(bench_layout(name, maker, args.records, folder))
            shutil.rmtree(folder)
        shares = extraction_shares(args.formats.split(","), args.share_images, work, args.device) \
            if args.share_images else []
    megabytes = args.records * RecordMaker.payload_bytes(maker(0)) / 1e6
    print(f"writers, {args.records} records of {args.regions} x {args.dim} float32 ({megabytes:.0f} MB), "
          "write + merge, then read back")
    report(
        "writers", rows,
        ["format", "records", "write_s", "write_MB_s", "write_rec_s", "read_s", "read_MB_s", "read_rec_s",
         "disk_MB"],
        {"regions": args.regions, "dim": args.dim, "classes": args.classes}, args.results,
    )
    if shares:
        print(f"writers' share of extract_net's wall time after start-up, shipped model, "
              f"{args.share_images} images, one layout a run (target < 5 %; busy >= 0.95)")
        report("writer_shares", shares, ["format", "images", "writers_s", "run_s", "share", "busy"],
               {"device": args.device}, args.results)


if __name__ == "__main__":
    main()
