#!/usr/bin/env python
"""
Extract region features of a whole image set with a d2_regionfeat model.

    python tools/extract_net.py --config-file CFG --input SRC --output OUT \\
        [--format npz tsv ...] [--id stem|int] [--min-regions N] [--batch-size 4] \\
        [--num-workers 2] [--fp16] [--amp] [--resume] [--limit N] [--strict] [--num-gpus N ...] \\
        [--weights W] [--device D] [--engine ray [--ray-address ADDR] [--ray-retries N]] [OVERRIDES ...]

``CFG`` is the config you trained with, as it is: a yacs YAML (``_BASE_`` chains, the model
zoo's files) with ``KEY VALUE`` overrides, or a LazyConfig ``.py`` (or the ``.yaml`` of
``LazyConfig.save``) with ``key=value`` overrides; plain ROI heads are switched to their
region-feature version (one INFO line says what changed). Region-feature settings are
``MODEL.REGION_FEATURES.*`` keys (yacs) or ``region_features.*`` keys (LazyConfig; see
:mod:`d2_regionfeat.extraction.model_config`).

``--input`` is a folder, a glob, a text file of paths, a COCO-format json or a registered
detectron2 dataset (:mod:`d2_regionfeat.extraction.inputs`). ``OUT`` gets ``manifest.json``,
``failures.jsonl``, ``no_regions.jsonl`` and one output per ``--format``. Our own layouts:

* ``npz``: ``OUT/npz/<image_id>.npz``, keys ``x`` (N, D) features, ``bbox`` (N, 4) x1 y1 x2 y2
  in original pixels, ``num_bbox``, ``image_h``, ``image_w``, ``image_id``, ``objects_id``
  (N,) classes, ``objects_conf`` (N,) scores and, when the model gives them, ``cls_prob``
  (N, K+1); no pickles (``np.load`` with ``allow_pickle=False`` reads them).
* ``tsv``: ``OUT/features.tsv``, the 10-column bottom-up-attention TSV that LXMERT's
  ``load_obj_tsv`` reads: ``img_id, img_h, img_w, objects_id, objects_conf, attrs_id,
  attrs_conf, num_boxes, boxes, features``; the arrays are base64 of raw bytes: objects_id
  int64 (N,) classes, objects_conf float32 (N,) scores, attrs_id int64 (N,) and attrs_conf
  float32 (N,) the attribute head's (zeros without it), boxes float32 (N, 4) x1 y1 x2
  y2 in original pixels, features float32 (N, D) (float32 even with ``--fp16``).
* ``hdf5``: ``OUT/features.h5``, flat arrays ``x``, ``bbox``, ``objects_id``,
  ``objects_conf``, ``cls_prob`` over all regions, per image ``image_id``, ``image_h``,
  ``image_w``, ``num_bbox`` and ``offsets`` (image i: rows offsets[i]:offsets[i+1]).
* ``lmdb``: ``OUT/features.lmdb``, key the image id, value the npz bytes of the image.

Layouts that other codebases' loaders read unchanged (d2_regionfeat/formats/<name>.py):
``butd_tsv`` (original 6-column TSV, int ids), ``openvqa`` / ``openvqa_gqa`` (OpenVQA, MCAN),
``uniter`` (needs class probabilities), ``mmf``, ``vilbert``, ``ban_hdf5`` (BAN,
bottom-up-attention-vqa), ``oscar`` (Oscar/VinVL captioning), ``visualbert``. PICKLES: only
``mmf``, ``vilbert`` and ``ban_hdf5`` write pickle files, because their readers load them;
nothing here ever reads a pickle back. Images with no region (``detections`` mode) stay in
npz/hdf5/lmdb and are left out of every other layout, listed in ``no_regions.jsonl``;
``--min-regions N`` gives every image at least N regions (the top-N by score).

Read any layout but mmf and vilbert with ``d2_regionfeat.io.read_features(OUT, fmt)``; convert
a finished run to other layouts with ``tools/convert_features.py``. A killed run continues
with ``--resume`` to the outputs an uninterrupted run gives. Tar shards in can be run by Ray
Data instead of this command's processes (``--engine ray``, README "Web scale"). Exit status: 0; 1 when no image
was extracted, or with ``--strict`` when any failed; 2 for bad settings (one-line error).
"""
import argparse
import os
import sys
import warnings

# Deprecation notices that torch and detectron2 print on import, not meant for users.
warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

import torch  # noqa: E402

import d2_regionfeat  # noqa: F401,E402  (registers the heads, adds MODEL.REGION_FEATURES)
from d2_regionfeat.extraction.inputs import ID_MODES, InputError  # noqa: E402
from d2_regionfeat.extraction.launch import launch  # noqa: E402
from d2_regionfeat.extraction.manifest import OutputFolderError, read_manifest  # noqa: E402
from d2_regionfeat.extraction.job import ExtractionError, prepare_job  # noqa: E402
from d2_regionfeat.extraction.model_config import (  # noqa: E402
    add_config_arguments,
    model_config_from_args,
    split_overrides,
)
from d2_regionfeat.extraction.pipeline import extract  # noqa: E402
from d2_regionfeat.extraction.ray_engine import extract_with_ray, require_ray  # noqa: E402
from d2_regionfeat.extraction.run import format_names  # noqa: E402
from d2_regionfeat.extraction.input_shards import is_shard_source  # noqa: E402
from d2_regionfeat.formats.feature_shards import ShardFolder  # noqa: E402
from d2_regionfeat.formats import LAYOUTS  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402


def get_parser():
    parser = add_config_arguments(default_argument_parser(epilog=__doc__))
    parser.add_argument("--input", required=True, help="folder, glob, list file, COCO json or dataset name")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--format", action="append", nargs="+", metavar="F",
        help=f"output formats, space- or comma-separated, repeatable: {', '.join(LAYOUTS)} (default npz); "
        "mmf, vilbert and ban_hdf5 write pickles (their readers' design)",
    )
    parser.add_argument(
        "--id", choices=ID_MODES, dest="id_mode",
        help="image ids: 'stem' (file name without extension) or 'int' (COCO id, or the digits "
        "ending the stem); default: the input's ids, as integers for butd_tsv, vilbert, ban_hdf5",
    )
    parser.add_argument(
        "--min-regions", type=_non_negative, default=0, metavar="N",
        help="at least N regions per image: below N detections, the top-N regions by score "
        "(MODEL.REGION_FEATURES.MIN_REGIONS)",
    )
    parser.add_argument("--image-root", help="folder the file names of a COCO json are relative to")
    parser.add_argument(
        "--batch-size", type=_positive, default=4, help="images per batch (on CPU, a model call per image)"
    )
    parser.add_argument("--num-workers", type=_non_negative, default=2, help="image decoding workers")
    parser.add_argument("--fp16", action="store_true", help="store features as float16")
    parser.add_argument(
        "--amp", action="store_true",
        help="run the backbone, RPN and mask head under autocast (bfloat16 on CPU, float16 on CUDA; "
        "the box path stays float32); see bench/README.md",
    )
    parser.add_argument("--limit", type=_non_negative, default=0, help="only the first N inputs")
    parser.add_argument("--strict", action="store_true", help="exit with 1 when any image failed")
    shards = parser.add_argument_group("sharded output (README 'Web scale')")
    shards.add_argument(
        "--shard-size", type=_non_negative, default=0, metavar="N",
        help="write OUT/<shard>.tar of npz members + .jsonl index, N images a shard (on by default, "
        "one output shard per input shard, for --input 'shards/{00000..00099}.tar')",
    )
    shards.add_argument("--id-field", help="tar input: the sample json's field to use as image id (default __key__)")
    shards.add_argument("--shard-index", type=_non_negative, help="this worker: every --num-shards-th shard from this")
    shards.add_argument("--num-shards", type=_positive, help="number of workers (default: SLURM array or torchrun env)")
    shards.add_argument(
        "--engine", choices=("default", "ray"), default="default",
        help="what runs the shards: this command's processes ('default', --num-gpus of them) or Ray Data's "
        "pool of model-holding actors ('ray', pip install -e .[ray]; --num-gpus is then GPUs per actor)",
    )
    shards.add_argument(
        "--ray-address", metavar="ADDR",
        help="--engine ray: the Ray cluster to join ('auto', ray://HOST:10001); default: a local Ray on this "
        "machine's CPUs (inside 'ray job submit', the job's cluster)",
    )
    shards.add_argument(
        "--ray-retries", type=_non_negative, default=3, metavar="N",
        help="--engine ray: a failed shard's task is retried N times, then its shard recorded lost",
    )
    parser.add_argument(
        "--opts", dest="more_opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
        help="config overrides, as the positional ones",
    )
    for action in parser._actions:
        if action.dest == "resume":
            action.help = "continue the run that made --output (same settings)"
        elif action.dest == "eval_only":  # detectron2's parser has it; refused in main
            action.help = argparse.SUPPRESS
    return parser


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def load_config(args, overrides):
    """The model's config, with the command line's overrides and --min-regions."""
    return model_config_from_args(
        args, overrides + args.more_opts, min_regions=args.min_regions or None
    )


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.eval_only:
        parser.exit(2, f"{parser.prog}: error: --eval-only is tools/train_net.py's (evaluation); "
                       "extract_net extracts features: drop it\n")
    words, overrides = split_overrides([w for value in args.format or [["npz"]] for w in value])
    formats = format_names(words)
    setup_logger(name="d2_regionfeat")  # the INFO line of what enabling the heads changed
    shard_run = bool(args.shard_size) or is_shard_source(args.input)
    try:
        if shard_run and "LOCAL_RANK" in os.environ and not args.device and torch.cuda.is_available():
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun: one GPU a process
        if args.engine == "ray":
            _check_ray_settings(args, shard_run)
        elif args.ray_address:
            raise ExtractionError("--ray-address is for --engine ray")
        config = load_config(args, overrides)
        job = prepare_job(
            config, args.input, args.output, formats, args.num_gpus * args.num_machines,
            resume=args.resume, image_root=args.image_root, limit=args.limit, claim=args.machine_rank == 0,
            id_mode=args.id_mode, shard_size=args.shard_size, id_field=args.id_field,
            shard_index=args.shard_index, num_shards=args.num_shards,
            batch_size=args.batch_size, num_workers=args.num_workers, fp16=args.fp16, amp=args.amp,
        )
    except (ExtractionError, InputError, OutputFolderError, ValueError, OSError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if args.engine == "ray":
        try:
            # on CUDA, --num-gpus is each actor's share; on the CPU, none
            extract_with_ray(job, args.ray_address, num_gpus=args.num_gpus if config.device.startswith("cuda") else 0,
                             max_retries=args.ray_retries)
        except ExtractionError as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
    else:
        launch(
            extract, args.num_gpus, args.num_machines, args.machine_rank, args.dist_url,
            args=(job,), device=config.device,
        )
    if shard_run:
        return _shards_status(job, args.strict)
    manifest = read_manifest(args.output)
    if not (manifest and manifest["complete"]):
        return 1
    counts = manifest["counts"]
    if counts["written"] == 0 or (args.strict and counts["failed"]):
        return 1
    return 0


def _check_ray_settings(args, shard_run):
    """Refuse what --engine ray cannot run, before anything is claimed."""
    if args.num_machines > 1:
        raise ExtractionError("--engine ray places its actors on the Ray cluster's machines: drop --num-machines")
    require_ray(shard_run)


def _shards_status(job, strict):
    """1 when a shard of this worker is not complete (lost), or with ``strict`` holds failures."""
    folder = ShardFolder(job.output_dir)
    mine = {s.name for s in job.shards}
    if not mine <= set(folder.names):
        return 1
    failed = [f for f in folder.failures() if f["shard"] in mine]
    return 1 if strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
