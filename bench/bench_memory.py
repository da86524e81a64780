#!/usr/bin/env python
"""
Memory: peak resident memory of ``tools/extract_net.py`` (the process, and its largest
DataLoader worker) with the shipped model at --counts images, every format at once; it must
be flat (<= +5 % from the fewest images to the most). Measured over two image sets: distinct
images (each run the first N of one set), where the peak also follows the image with the
largest forward (the mask head's activations grow with the detections), and the first
--counts[0] images repeated up to N, where any growth is memory held from image to image.
Then the TSV and HDF5 parts of a 2-process run, each larger than a memory cap, are recovered
and merged under that cap (``RLIMIT_AS`` in a child process; Linux): neither may load a
whole part.

    python bench/bench_memory.py [--counts 50,200,500] [--part-mb 256 --cap-mb 200]
"""
import os
import shutil
import tempfile

from common import parser, report, run_child, shipped_model, write_images
from d2_regionfeat.formats import REGION_FORMATS
from d2_regionfeat.formats.hdf5 import Hdf5Layout
from d2_regionfeat.formats.tsv import TsvLayout
from d2_regionfeat.io import read_features
from records import RecordMaker, write_records

FLAT = 1.05


def repeated_images(folder, images, first, count):
    """``folder`` with ``count`` links to the ``first`` files of ``images``, over and over."""
    os.makedirs(folder, exist_ok=True)
    names = sorted(os.listdir(images))[:first]
    for i in range(count):
        link = os.path.join(folder, f"repeat_{i:06d}.jpg")
        if not os.path.exists(link):
            os.link(os.path.join(images, names[i % first]), link)
    return folder


def peak_rss(args, work):
    """Rows of peak RSS by image set and number of images."""
    counts = [int(c) for c in args.counts.split(",")]
    config = shipped_model(work)
    distinct = write_images(os.path.join(work, "shapes"), max(counts))
    image_sets = {
        "distinct": distinct,
        f"first {counts[0]} repeated": repeated_images(
            os.path.join(work, "repeated"), distinct, counts[0], max(counts)
        ),
    }
    rows = []
    for image_set, images in image_sets.items():
        first = None
        for count in counts:
            out = os.path.join(work, "out")
            shutil.rmtree(out, ignore_errors=True)
            run = run_child(
                ["extract_runs.py", "extract", "--config", config, "--images", images, "--output", out,
                 "--device", args.device, "--limit", count, "--formats", ",".join(REGION_FORMATS)],
                threads=args.threads,
            )
            first = first or run["rss_mb"]
            rows.append({"images": image_set, "count": count, "rss_mb": run["rss_mb"],
                         "worker_rss_mb": run["children_rss_mb"], "growth": run["rss_mb"] / first,
                         "ok": run["rss_mb"] / first <= FLAT})
            shutil.rmtree(out)
    return rows


def merge_under_cap(work, part_mb, cap_mb, slab_mb=None, regions=36, dim=2048):
    """
    Write TSV and HDF5 parts of 2 ranks, each over ``part_mb``, then recover and merge them
    under ``cap_mb`` in a child; check the merged files. Returns the child's figures with
    ``records`` and ``read_back`` (the merged files hold every record).
    """
    out = os.path.join(work, "capped")
    shutil.rmtree(out, ignore_errors=True)
    maker = RecordMaker(regions, dim)
    per_part = int(part_mb * 2**20 / RecordMaker.payload_bytes(maker(0))) + 1
    for rank in range(2):
        writers = [TsvLayout(out, rank, 2), Hdf5Layout(out, rank, 2)]
        for writer in writers:
            write_records(writer, maker, rank * per_part, (rank + 1) * per_part)
            writer.close()
    args = ["merge_under_cap.py", "--output", out, "--world-size", 2, "--cap-mb", cap_mb]
    result = run_child(args + (["--slab-mb", slab_mb] if slab_mb else []))
    result["records"] = 2 * per_part
    counts = {
        name: sum(1 for _ in read_features(os.path.join(out, file), name))
        for name, file in (("tsv", "features.tsv"), ("hdf5", "features.h5"))
        if result[name] == "ok"
    }
    result["read_back"] = counts == {"tsv": 2 * per_part, "hdf5": 2 * per_part}
    shutil.rmtree(out)
    return result


def main():
    p = parser(__doc__)
    p.add_argument("--counts", default="50,200,500", help="numbers of images ('' to skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--part-mb", type=float, default=256, help="size of each part (MB of features)")
    p.add_argument("--cap-mb", type=float, default=200, help="memory the merge may add (0 to skip)")
    p.add_argument("--slab-mb", type=float, help="HDF5 merge slab (default: the writer's own)")
    p.add_argument("--work", help="folder to work in (default: a temporary one)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        rows = peak_rss(args, work) if args.counts else []
        cap = merge_under_cap(work, args.part_mb, args.cap_mb, args.slab_mb) if args.cap_mb else None
    if rows:
        print(f"peak resident memory of extract_net (shipped model, formats {','.join(REGION_FORMATS)}), "
              f"flat: <= {FLAT:.2f}x")
        report("memory", rows, ["images", "count", "rss_mb", "worker_rss_mb", "growth", "ok"],
               {"merge_under_cap": cap}, args.results)
    if cap:
        print(f"merge under a cap: parts of {cap['part_mb']:.0f} MB, cap {cap['cap_mb']:.0f} MB above "
              f"{cap['base_vm_mb']:.0f} MB of address space; reading a whole part: "
              f"{cap['whole_part_read']}; tsv: {cap['tsv']} ({cap['tsv_s']:.1f} s), hdf5: {cap['hdf5']} "
              f"({cap['hdf5_s']:.1f} s); every record read back: {cap['read_back']}")
        if not rows:
            report("memory", [], [], {"merge_under_cap": cap}, args.results)


if __name__ == "__main__":
    main()
