#!/usr/bin/env python
"""
Streaming: peak resident memory of listing an input, checking its ids for the layouts and
planning a resumed rank's work (the run's path before the model, which is skipped:
bench/streaming_child.py, one process per measurement) for a list file of --list-counts
paths, and for folders of --folder-counts images, nested (1000 a folder) and flat (all in
one folder). It must be flat (<= +10 % from the fewest paths to the most) for the list file
and the nested folder; a flat folder's sorted entries are held whole (its order is that of
the sorted paths), so it grows with the largest folder. The same list files read into one
list (``list_inputs``: the whole listing held, as every run did before) are measured beside,
and as a ``--shard-size 1000`` run reads them (``list-shards``: the shards planned, each
shard's images read, the model skipped); that must be flat too.

Every path exists: hard links of 20 tiny images (a file takes at most 65000 links on ext4).
The output folder holds the first --written images in every layout (npz files as links of
one file, hdf5 journal frames), so resuming skips them.

    python bench/bench_streaming.py [--list-counts 10000,1000000] [--folder-counts 10000,100000]
"""
import os
import tempfile

import numpy as np
from PIL import Image

from common import parser, report, run_child
from d2_regionfeat.formats import LAYOUTS
from d2_regionfeat.formats.base import JournalLayout
from d2_regionfeat.formats.safety import RecordJournal, new_part

FLAT = 1.10
PER_FOLDER = 1000
SOURCES = 20


def image_tree(root, count):
    """``root/s<k>/<i>.png`` for i < count, PER_FOLDER a folder, as links of SOURCES tiny images."""
    rng = np.random.default_rng(0)
    sources = []
    for s in range(SOURCES):
        sources.append(os.path.join(root, f"source_{s}.png"))
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(sources[-1])
    for i in range(count):
        folder = os.path.join(root, "tree", f"s{i // PER_FOLDER:04d}")
        if i % PER_FOLDER == 0:
            os.makedirs(folder)
        os.link(sources[i % SOURCES], os.path.join(folder, f"{i:07d}.png"))
    return sources


def list_file(root, count):
    path = os.path.join(root, f"list_{count}.txt")
    with open(path, "w") as f:
        f.writelines(f"tree/s{i // PER_FOLDER:04d}/{i:07d}.png\n" for i in range(count))
    return path


def nested_folder(root, count):
    """A folder of the tree's first ``count`` images: links to its first folders."""
    folder = os.path.join(root, f"nested_{count}")
    os.makedirs(folder)
    for k in range(-(-count // PER_FOLDER)):
        os.symlink(os.path.join(root, "tree", f"s{k:04d}"), os.path.join(folder, f"s{k:04d}"))
    return folder


def flat_folder(root, count, sources):
    folder = os.path.join(root, f"flat_{count}")
    os.makedirs(folder)
    for i in range(count):
        os.link(sources[i % SOURCES], os.path.join(folder, f"{i:07d}.png"))
    return folder


def resumed_output(root, name, image_ids, formats):
    """An output folder of a 1-process run holding ``image_ids`` in every layout of ``formats``."""
    out = os.path.join(root, f"out_{name}")
    for fmt in formats:
        layout = LAYOUTS[fmt]
        keys = [layout.key(i) for i in image_ids]
        if fmt == "npz":
            folder = os.path.join(out, layout.output_name)
            os.makedirs(folder)
            np.savez(os.path.join(folder, "first.npz"), x=np.zeros((1, 1), np.float32))
            for key in keys:
                os.makedirs(os.path.dirname(os.path.join(folder, key)), exist_ok=True)
                os.link(os.path.join(folder, "first.npz"), os.path.join(folder, key + ".npz"))
        elif issubclass(layout, JournalLayout):  # frames of (key, payload)
            journal = RecordJournal(new_part(out, fmt, 0, 1))
            journal.append((key, b"") for key in keys)
            journal.close()
        else:
            raise ValueError(f"--formats: {fmt} is neither npz nor a journal layout")
    return out


def inputs_of(name, root, list_counts, folder_counts, sources):
    """(input kind, way of reading, its output folder's name, the inputs) of ``--inputs`` ``name``."""
    if name in ("list", "list-read-whole", "list-shards"):
        way = {"list": "streamed", "list-read-whole": "list", "list-shards": "shards"}[name]
        return "list file", way, "list", [list_file(root, c) for c in list_counts]
    if name == "nested":
        return "nested folder", "streamed", "nested", [nested_folder(root, c) for c in folder_counts]
    if name == "flat":
        return "flat folder", "streamed", "list", [flat_folder(root, c, sources) for c in folder_counts]
    raise ValueError(f"--inputs: unknown {name!r}")


def measure(source, out, formats, way):
    return run_child(["streaming_child.py", "--input", source, "--output", out, "--formats", ",".join(formats),
                      "--way", way])


def main():
    p = parser(__doc__)
    p.add_argument("--list-counts", default="10000,1000000", help="paths of the list files")
    p.add_argument("--folder-counts", default="10000,100000", help="images of the folders")
    p.add_argument("--formats", default="npz,ban_hdf5", help="layouts (npz, and journal ones)")
    p.add_argument("--written", type=int, default=1000, help="images already in the output folder")
    p.add_argument("--inputs", default="list,list-read-whole,list-shards,nested,flat",
                   help="what to measure: list (streamed), list-read-whole, list-shards, nested, flat (folders)")
    p.add_argument("--work", help="folder to work in (default: a temporary one)")
    args = p.parse_args()
    list_counts = [int(c) for c in args.list_counts.split(",")]
    # a nested folder is whole folders of PER_FOLDER
    folder_counts = [int(c) for c in args.folder_counts.split(",")]
    formats = args.formats.split(",")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as root:
        sources = image_tree(root, max(list_counts + folder_counts))
        ids = [f"{i:07d}" for i in range(args.written)]
        outputs = {
            "list": resumed_output(root, "list", ids, formats),
            "nested": resumed_output(root, "nested", [f"s{int(i) // PER_FOLDER:04d}/{i}" for i in ids], formats),
        }
        for name in args.inputs.split(","):
            kind, way, out, paths = inputs_of(name, root, list_counts, folder_counts, sources)
            runs = [measure(path, outputs[out], formats, way) for path in paths]
            first = runs[0]
            for run in runs:
                more = run["count"] - first["count"]
                rows.append(dict(
                    input=kind, way=way, **run, growth=run["peak_rss_mb"] / first["peak_rss_mb"],
                    growth_mb=run["peak_rss_mb"] - first["peak_rss_mb"],
                    # what each path more than the fewest adds to the peak
                    per_path_bytes=(run["peak_rss_mb"] - first["peak_rss_mb"]) * 2**20 / more if more else None,
                ))
                rows[-1]["ok"] = rows[-1]["growth"] <= FLAT
    print(f"peak resident memory of listing + id checks + resume planning ({','.join(formats)}; "
          f"{args.written} images already written), flat: <= {FLAT:.2f}x")
    report("streaming", rows, ["input", "way", "count", "skipped", "todo", "base_rss_mb", "peak_rss_mb",
                               "growth", "growth_mb", "per_path_bytes", "list_check_s", "plan_s", "ok"],
           {"flat": FLAT, "formats": formats, "written": args.written}, args.results)


if __name__ == "__main__":
    main()
