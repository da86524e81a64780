#!/usr/bin/env python
"""
Convert a finished extraction of tools/extract_net.py into other layouts, without the model.

    python tools/convert_features.py IN_DIR --format F [--format G ...] [--id stem|int] \\
        --output OUT_DIR [--resume] [--source-format S]
    python tools/convert_features.py --input 'feats/cc3m_*' [--input MORE ...] --format butd_tsv ...

IN_DIR (or ``--input``): an output folder, or output shards: a folder of them, several, or a
glob of such folders, read shard by shard in folder then name order (an image id in two shards
is refused, naming both). The records are read from the best layout a folder holds (hdf5, lmdb,
npz, then tsv; or ``--source-format``), or from the shards' members, and written as
``tools/extract_net.py --format F`` would have written them: the same files, the same
``no_regions.jsonl`` and ``failures.jsonl``, a manifest with
the source's config and ``converted_from``. Killed, it continues with ``--resume``.
``mmf``, ``vilbert`` and ``ban_hdf5`` write pickles (their readers' design). Exit status: 0;
2 for bad settings or a source that lacks what a layout needs (one-line error).
"""
import argparse
import sys
import warnings

# Deprecation notices that torch and detectron2 print on import, not meant for users.
warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

from d2_regionfeat.extraction.convert import ConversionError, convert  # noqa: E402
from d2_regionfeat.formats import LAYOUTS  # noqa: E402
from d2_regionfeat.extraction.inputs import ID_MODES  # noqa: E402
from d2_regionfeat.extraction.manifest import OutputFolderError  # noqa: E402
from d2_regionfeat.extraction.run import format_names  # noqa: E402


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "input", metavar="IN_DIR", nargs="*",
        help="output folder of a finished extraction, or folder(s) of output shards, or a glob of them",
    )
    parser.add_argument(
        "--input", dest="inputs", action="append", nargs="+", default=[], metavar="IN",
        help="the same as IN_DIR, repeatable (folders of output shards, or globs of them)",
    )
    parser.add_argument(
        "--format", action="append", nargs="+", required=True, metavar="F",
        help=f"layout(s) to write, space- or comma-separated, repeatable: {', '.join(LAYOUTS)}",
    )
    parser.add_argument("--output", required=True, metavar="OUT_DIR", help="new or empty folder")
    parser.add_argument(
        "--id", choices=ID_MODES, dest="id_mode",
        help="'int': ids made integers (the digits ending them); 'stem' or none: the source's ids",
    )
    parser.add_argument("--resume", action="store_true", help="continue the conversion that made OUT_DIR")
    parser.add_argument("--source-format", metavar="S", help="the layout of IN_DIR to read")
    return parser


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    formats = format_names([word for value in args.format for word in value])
    inputs = args.input + [name for value in args.inputs for name in value]
    if not inputs:
        parser.error("give IN_DIR or --input")
    source = inputs[0] if len(inputs) == 1 else inputs
    try:
        manifest = convert(source, formats, args.output, args.id_mode, args.resume, args.source_format)
    except (ConversionError, OutputFolderError, OSError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    counts = manifest["counts"]
    print(
        f"Converted {' '.join(inputs)} -> {args.output} ({', '.join(manifest['formats'])}): "
        f"{counts['written']} images, {counts['no_regions']} without regions "
        f"(left out of {', '.join(counts['left_out']) or 'none'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
