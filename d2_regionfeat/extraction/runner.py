"""
Feature extraction at dataset scale: the work of ``tools/extract_net.py``.

:func:`prepare_job` checks everything a run needs (config, weights, inputs, output folder)
before any process starts; :func:`extract` is what every process (rank) runs: it extracts
its contiguous run of input batches (split as detectron2's ``InferenceSampler`` splits)
into its parts of the outputs, and rank 0 then merges the parts, completes the manifest and
prints a summary. Outputs and their crash safety are described in :mod:`d2_regionfeat.formats`.
"""
import os
import shutil
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data.samplers import InferenceSampler
from detectron2.modeling import ROI_HEADS_REGISTRY, build_model
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from ..formats import (
    FAILURES_NAME,
    NO_REGIONS_NAME,
    WRITERS,
    LayoutIdError,
    RunOutputs,
    check_ids,
    merge_outputs,
    read_features,
)
from ..formats.grid import grid_record
from ..modeling.config import grid_node, region_features_node
from ..modeling.heads import RegionFeatureHeadsMixin
from .inputs import ImageDataset, ImageItem, list_inputs, one_line
from .manifest import (
    MANIFEST_VERSION,
    claim_output_folder,
    package_versions,
    read_manifest,
    sha256_file,
    sha256_text,
    write_manifest,
)

# How many batches the writer thread may lag behind the model.
WRITE_AHEAD = 2


class ExtractionError(RuntimeError):
    """A problem with the settings of a run, reported as one line."""


@dataclass
class ExtractionJob:
    """Everything a rank needs; made by :func:`prepare_job`."""

    cfg: CfgNode
    items: List[ImageItem]
    output_dir: str
    formats: List[str]
    batch_size: int = 4
    num_workers: int = 2
    fp16: bool = False
    amp: bool = False
    # The output folder already holds the finished run.
    complete: bool = False


def _local_weights(cfg):
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise ExtractionError("MODEL.WEIGHTS is not set: give the checkpoint to extract with")
    try:
        path = PathManager.get_local_path(weights)
    except Exception as e:  # any handler (http, detectron2://, ...) may fail its own way
        raise ExtractionError(f"weights {weights} cannot be fetched ({one_line(e)})")
    if not os.path.isfile(path):
        raise ExtractionError(f"weights file {weights} not found")
    return path


def _config_sha256(cfg):
    """Checksum of the config, less the keys that do not change the features' meaning."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = ""
    cfg.MODEL.WEIGHTS = ""
    return sha256_text(cfg.dump())


def prepare_job(cfg, source, output_dir, formats, world_size, resume=False, image_root=None,
                limit=0, claim=True, id_mode=None, **options) -> ExtractionJob:
    """
    Check a run's settings, list its inputs and claim its output folder (writing the
    initial manifest there).

    Args:
        cfg: the frozen config of the model.
        source, image_root, limit, id_mode: what to extract and its ids, see
            :func:`inputs.list_inputs`.
        formats: names in :data:`formats.WRITERS`.
        world_size: the number of processes of the run (their parts are named by it).
        resume: continue the run that made ``output_dir``.
        claim: check and claim the output folder (the first machine of a run does; the
            others' processes start only once it has).
        options: the other fields of :class:`ExtractionJob`.

    Raises:
        ExtractionError, InputError, OutputFolderError: with a one-line message.
    """
    region_features_node(cfg)
    try:
        head = ROI_HEADS_REGISTRY.get(cfg.MODEL.ROI_HEADS.NAME)
    except KeyError:
        raise ExtractionError(f"MODEL.ROI_HEADS.NAME {cfg.MODEL.ROI_HEADS.NAME} is not registered")
    if not issubclass(head, RegionFeatureHeadsMixin):
        raise ExtractionError(
            f"MODEL.ROI_HEADS.NAME is {cfg.MODEL.ROI_HEADS.NAME}, which gives no region features; "
            "use a Feature head (merge configs/region_features.yaml)"
        )
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in WRITERS]
    if unknown or not formats:
        raise ExtractionError(f"--format must be among {', '.join(WRITERS)}; got {formats}")
    _check_needs(cfg, formats)
    weights = _local_weights(cfg)
    items = list_inputs(source, image_root, limit, id_mode)
    if not items:
        raise ExtractionError(f"--input {source} holds no images")
    try:
        check_ids(formats, [i.image_id for i in items if not i.error])
    except LayoutIdError as e:
        raise ExtractionError(f"--format {e}")
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "complete": False,
        "config": cfg.dump(),
        "config_sha256": _config_sha256(cfg),
        "weights": cfg.MODEL.WEIGHTS,
        "weights_sha256": sha256_file(weights),
        "formats": formats,
        "format_versions": {f: WRITERS[f].version for f in formats},
        "fp16": bool(options.get("fp16", False)),
        "id": id_mode,
        "class_names": _class_names(cfg),
        "amp": bool(options.get("amp", False)),
        "world_size": world_size,
        "input": source,
        "inputs_sha256": sha256_text("\n".join(f"{i.image_id}\t{i.path}" for i in items)),
        "versions": package_versions(),
    }
    complete = claim and claim_output_folder(output_dir, manifest, resume)["complete"]
    return ExtractionJob(
        cfg=cfg, items=items, output_dir=output_dir, formats=formats, complete=complete, **options
    )


def _class_names(cfg) -> Optional[List[str]]:
    """
    The ``thing_classes`` of the first test dataset that has one name per class of the
    model (None if none does).
    """
    for name in cfg.DATASETS.TEST:
        names = MetadataCatalog.get(name).get("thing_classes")
        if names and len(names) == cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            return list(names)
    return None


def _check_needs(cfg, formats):
    """Refuse layouts that need class probabilities (or the grid) from a config that gives none."""
    node = cfg.MODEL.REGION_FEATURES
    class_probs = node.CLASS_PROBS or node.SELECTION == "regions"
    grid = grid_node(cfg)
    for fmt in formats:
        if "cls_prob" in WRITERS[fmt].needs and not class_probs:
            raise ExtractionError(f"--format {fmt} needs {WRITERS[fmt].needs['cls_prob']}")
        if "grid" in WRITERS[fmt].needs and grid is None:
            raise ExtractionError(f"--format {fmt} needs {WRITERS[fmt].needs['grid']}")
        if grid is not None and grid.ONLY and not WRITERS[fmt].grid:
            raise ExtractionError(
                f"--format {fmt} holds regions, which MODEL.REGION_FEATURES.GRID.ONLY does not make"
            )


class BatchExtractor:
    """
    Runs a region-feature model over decoded images as :class:`DefaultPredictor` does one at
    a time: on CUDA the images of a batch are grouped by their padded size, so that each
    one's detections are those it gets alone (a batch padded to a larger size would add
    anchors); on CPU each image is run alone.

    With ``amp``, the model's forward runs under ``torch.autocast`` (bfloat16 on CPU, float16
    on CUDA), except its box path, which the Feature heads keep in float32; the records are
    float32 (float16 features with ``fp16``) either way.
    """

    def __init__(self, cfg, fp16=False, amp=False):
        self.model = build_model(cfg).eval()
        DetectionCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.divisibility = max(1, self.model.backbone.size_divisibility)
        self.fp16 = fp16
        device = self.model.device.type
        self.autocast = torch.autocast(
            device, dtype=torch.bfloat16 if device == "cpu" else torch.float16, enabled=amp
        )

    def _padded_size(self, image):
        d = self.divisibility
        return tuple(-(-s // d) * d for s in image.shape[-2:])

    @torch.no_grad()
    def __call__(self, inputs: List[Dict]) -> List[Dict]:
        """
        Args:
            inputs: :class:`inputs.ImageDataset` items ("item", "image", "height", "width").

        Returns:
            the records (see :mod:`d2_regionfeat.io`) of ``inputs``, in order.
        """
        if self.model.device.type == "cpu":
            # a batched forward saves nothing on CPU, and its larger activations cost
            # 10-30 % at 800 px (bench/README.md): one image a call
            groups = [[index] for index in range(len(inputs))]
        else:
            by_size = defaultdict(list)
            for index, x in enumerate(inputs):
                by_size[self._padded_size(x["image"])].append(index)
            groups = list(by_size.values())
        records = [None] * len(inputs)
        for indices in groups:
            batch = [{k: inputs[i][k] for k in ("image", "height", "width")} for i in indices]
            with self.autocast:
                outputs = self.model(batch)
            for i, output in zip(indices, outputs):
                # its grid, if any, and its regions (none in grid-only mode)
                records[i] = self._grid_record(inputs[i], output.get("grid"))
                if "instances" in output:
                    records[i].update(self._record(inputs[i], output["instances"].to("cpu")))
        return records

    def _grid_record(self, x, grid):
        if grid is None:
            return {}
        return grid_record(x["item"].image_id, x["height"], x["width"], grid, self.fp16)

    def _record(self, x, instances):
        record = {
            "image_id": x["item"].image_id,
            "image_h": x["height"],
            "image_w": x["width"],
            "num_bbox": len(instances),
            "x": _numpy(instances.box_features, np.float16 if self.fp16 else np.float32),
            "bbox": _numpy(instances.pred_boxes.tensor, np.float32),
            "objects_id": _numpy(instances.pred_classes, np.int64),
            "objects_conf": _numpy(instances.scores, np.float32),
        }
        if instances.has("class_probs"):
            record["cls_prob"] = _numpy(instances.class_probs, np.float32)
        if instances.has("attr_probs"):
            record["attrs_id"] = _numpy(instances.attrs_id, np.int64)
            record["attrs_conf"] = _numpy(instances.attrs_conf, np.float32)
            record["attr_prob"] = _numpy(instances.attr_probs, np.float32)
        return record


def _numpy(tensor, dtype):
    """A CPU tensor as an ndarray of ``dtype`` (bfloat16, which numpy lacks, via float32)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy().astype(dtype)


def _as_list(batch):
    return batch


def _timed(function, *args):
    """The seconds ``function(*args)`` takes."""
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def _read_ahead(loader, thread):
    """
    The batches of ``loader``, each next one received in ``thread`` while this one is used:
    receiving a batch from a DataLoader worker waits on that process (its tensors' shared
    memory is handed over through it), which the model need not do.
    """
    done = object()
    upcoming = thread.submit(next, loader, done)
    while True:
        batch = upcoming.result()
        if batch is done:
            return
        upcoming = thread.submit(next, loader, done)
        yield batch


def _new_stats(skipped):
    """A rank's counts for the summary: images, regions per image, seconds in model/writers."""
    return {"skipped": skipped, "done": 0, "failed": 0, "regions": [], "model_s": 0.0, "write_s": 0.0}


def _rank_outputs(job: ExtractionJob) -> RunOutputs:
    """This rank's writers and logs, over the run's images."""
    usable = [i for i in job.items if not i.error]
    return RunOutputs(
        job.output_dir, job.formats, comm.get_rank(), comm.get_world_size(),
        [i.image_id for i in usable], {i.image_id: i.path for i in usable},
    )


def _extract_batches(job: ExtractionJob, batches: List[List[int]]) -> Dict:
    """
    Extract this rank's ``batches`` (of indices into ``job.items``) into its parts.

    Images are decoded in DataLoader workers (received one batch ahead, in a thread), and
    written in a thread (in order, at most :data:`WRITE_AHEAD` batches behind the model), so
    that the model waits for neither.
    """
    outputs = _rank_outputs(job)
    recorded = outputs.recorded
    todo = [b for b in batches if any(job.items[i].image_id not in recorded for i in b)]
    stats = _new_stats(skipped=sum(job.items[i].image_id in recorded for b in batches for i in b))
    if todo:
        dataset = ImageDataset(
            job.items, job.cfg.INPUT.FORMAT, job.cfg.INPUT.MIN_SIZE_TEST, job.cfg.INPUT.MAX_SIZE_TEST
        )
        # started first: the workers decode the first batches while the model is built
        loader = iter(torch.utils.data.DataLoader(
            dataset, batch_sampler=todo, num_workers=job.num_workers, collate_fn=_as_list
        ))
        extractor = BatchExtractor(job.cfg, job.fp16, job.amp)
        bar = tqdm(
            total=sum(map(len, batches)), initial=stats["skipped"], unit="img", dynamic_ncols=True,
            disable=not comm.is_main_process(), desc=f"extract (rank 0 of {comm.get_world_size()})",
            mininterval=1.0,  # each redraw costs the model thread a GIL hand-over
        )
        with bar, ThreadPoolExecutor(max_workers=1) as write_thread, \
                ThreadPoolExecutor(max_workers=1) as read_thread:
            pending = deque()
            for batch in _read_ahead(loader, read_thread):
                batch = [x for x in batch if x["item"].image_id not in recorded]
                failed = [x for x in batch if "error" in x]
                start = time.perf_counter()
                records = extractor([x for x in batch if "error" not in x])
                stats["model_s"] += time.perf_counter() - start
                failed = [
                    {"image_id": x["item"].image_id, "path": x["item"].path, "reason": x["error"]}
                    for x in failed
                ]
                pending.append(write_thread.submit(_timed, outputs.store, records, failed))
                while len(pending) > WRITE_AHEAD:
                    stats["write_s"] += pending.popleft().result()
                stats["done"] += len(records)
                stats["failed"] += len(failed)
                stats["regions"] += [r["num_bbox"] for r in records if "num_bbox" in r]
                bar.update(len(batch))
            while pending:
                stats["write_s"] += pending.popleft().result()
    outputs.close()
    return stats


def _finish(job: ExtractionJob):
    """Rank 0, all ranks done: merge the parts, complete the manifest."""
    counts = merge_outputs(job.output_dir, job.formats, comm.get_world_size())
    manifest = read_manifest(job.output_dir)
    manifest.update(
        complete=True,
        counts=dict(counts, inputs=len(job.items), written=len(job.items) - counts["failed"]),
        feature_dim=feature_dim(job.output_dir, job.formats),
        num_classes=int(job.cfg.MODEL.ROI_HEADS.NUM_CLASSES),
    )
    write_manifest(job.output_dir, manifest)
    shutil.rmtree(os.path.join(job.output_dir, "parts"), ignore_errors=True)


def feature_dim(output_dir, formats) -> Optional[int]:
    """D, from the first record of a layout that reads back (None without one)."""
    # a one-file layout finds its first record at once; a folder would be listed whole
    readable = [f for f in formats if f not in ("mmf", "vilbert") and not WRITERS[f].grid]
    readable.sort(key=lambda f: WRITERS[f].output_name == f)
    for fmt in readable:
        first = next(read_features(output_dir, fmt), None)
        if first is not None:
            return int(first["x"].shape[1])
    return None


def summary(output_dir, manifest, stats: List[Dict], seconds: float) -> str:
    """The end-of-run report: counts of this session and of the folder, regions, time."""
    done = sum(s["done"] for s in stats)
    regions = [n for s in stats for n in s["regions"]]
    counts = manifest["counts"]
    lines = [
        f"Extraction summary: {output_dir} ({', '.join(manifest['formats'])})",
        f"  this run   done {done}, skipped {sum(s['skipped'] for s in stats)} (already there), "
        f"failed {sum(s['failed'] for s in stats)}",
        f"  in folder  {counts['written']} of {counts['inputs']} images, {counts['failed']} failed"
        + (f" (reasons in {FAILURES_NAME})" if counts["failed"] else ""),
    ]
    if counts.get("no_regions"):
        left_out = ", ".join(counts["left_out"]) or "none"
        lines.append(
            f"  no regions {counts['no_regions']} images (listed in {NO_REGIONS_NAME}; left out of: "
            f"{left_out}; --min-regions N gives every image N)"
        )
    if regions:
        lines.append(
            f"  regions    per image min {min(regions)}, mean {np.mean(regions):.1f}, max {max(regions)}"
            f"; feature dim {manifest['feature_dim']}"
        )
    lines.append(f"  wall time  {seconds:.1f} s ({done / max(seconds, 1e-9):.2f} images/s)")
    model_s, write_s = sum(s["model_s"] for s in stats), sum(s["write_s"] for s in stats)
    if done:
        lines.append(
            f"  time       model {model_s:.1f} s, writers {write_s:.2f} s (in a thread beside "
            f"the model; {100 * write_s / max(model_s, 1e-9):.1f}% of model time), summed over ranks"
        )
    return "\n".join(lines)


def extract(job: ExtractionJob):
    """
    What each rank runs: its shard, then (rank 0) the merge and summary.

    The inputs are cut into batches of ``job.batch_size`` first, and the batches shared out
    in contiguous runs (as ``InferenceSampler`` shares images): every image is batched with
    the same others whatever the number of processes, or of resumes.
    """
    start = time.perf_counter()
    rank, world_size = comm.get_rank(), comm.get_world_size()
    # detectron2's logs (checkpoint loading, incompatible keys) of rank 0, as train_net's
    setup_logger(distributed_rank=rank, name="fvcore")
    setup_logger(distributed_rank=rank)
    step, size = job.batch_size, len(job.items)
    batches = [list(range(i, min(i + step, size))) for i in range(0, size, step)]
    batches = [batches[b] for b in InferenceSampler._get_local_indices(len(batches), world_size, rank)]
    if job.complete:
        stats = _new_stats(skipped=sum(map(len, batches)))
    else:
        stats = _extract_batches(job, batches)
    stats = comm.gather(stats, dst=0)
    if comm.is_main_process():
        if not job.complete:
            _finish(job)
        seconds = time.perf_counter() - start
        print(summary(job.output_dir, read_manifest(job.output_dir), stats, seconds))
    comm.synchronize()
