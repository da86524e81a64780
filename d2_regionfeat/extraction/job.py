"""
The job of an extraction (``tools/extract_net.py``): :func:`prepare_job` checks everything a
run needs (config, weights, inputs, output folder, what the model emits against what the
layouts need, the model's names) and claims the output folder before any process starts,
for every kind of input (folder, list, dataset, tar shards); :func:`finish` completes a
folder run's manifest once every rank is done; :func:`summary` and :func:`shard_summary` are
the end-of-run reports. The model of a run is built by :meth:`ExtractionJob.extractor`, its
input transform by :meth:`ExtractionJob.images`; its config is a
:class:`~.model_config.ModelConfig` (any yacs YAML or LazyConfig, plain heads enabled).
"""
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

from ..formats import LAYOUTS, LayoutIdError
from ..formats.feature_shards import ShardFolder, is_complete
from ..modeling.outputs import RegionFields, region_fields
from ..modeling.vocabulary import NO_NAMES_HINT, Vocabularies
from .inputs import ImageDataset, ImageItem, Inputs, one_line
from .manifest import MANIFEST_VERSION, claim_output_folder, package_versions
from .model_call import BatchExtractor, record_keys
from .model_config import ModelConfig, as_model_config
from .run import FAILURES_NAME, NO_REGIONS_NAME, RunFolder, check_formats, check_ids
from .input_shards import SHARDS_MANIFEST, InputShard, is_shard_source, plan_shards, select_shards


class ExtractionError(RuntimeError):
    """A problem with the settings of a run, reported as one line."""


@dataclass
class ExtractionJob:
    """Everything a rank needs; made by :func:`prepare_job`."""

    # the model's config (see extraction/model_config.py)
    model_config: ModelConfig
    # the run's images: an :class:`.inputs.Inputs` (each rank streams its share), or a list
    items: Iterable[ImageItem]
    output_dir: str
    formats: List[str]
    # what the model emits, asked of it (see modeling/outputs.py)
    emits: RegionFields
    # its class and attribute names, known before the manifest is written
    names: Vocabularies
    batch_size: int = 4
    num_workers: int = 2
    fp16: bool = False
    amp: bool = False
    # The output folder already holds the finished run.
    complete: bool = False
    # A shard run: this worker's input shards (``items`` is then empty), see :mod:`.input_shards`.
    shards: Optional[List[InputShard]] = None
    id_field: Optional[str] = None
    # tar shards: the first ``limit`` samples of each (0: all)
    limit: int = 0
    # the number of ``items`` (a folder run's, counted by :meth:`.inputs.Inputs.check`)
    count: int = 0

    def extractor(self) -> BatchExtractor:
        """The run's model call (the model built, with its weights, on its device)."""
        return BatchExtractor(self.model_config, self.fp16, self.amp)

    def images(self, items: List[ImageItem]) -> ImageDataset:
        """``items`` decoded and resized as the model takes them."""
        config = self.model_config
        return ImageDataset(items, config.input_format, config.test_transform())


def prepare_job(cfg, source, output_dir, formats, world_size, resume=False, image_root=None,
                limit=0, claim=True, id_mode=None, shard_size=0, id_field=None, shard_index=None,
                num_shards=None, **options) -> ExtractionJob:
    """
    Check a run's settings, list its inputs and claim its output folder (writing the
    initial manifest there).

    Args:
        cfg: the model's :class:`ModelConfig`, or a yacs ``CfgNode`` (made one by
            :func:`.model_config.as_model_config`, plain heads enabled).
        source, image_root, limit, id_mode: what to extract and its ids, see
            :class:`inputs.Inputs` (read here to check them, and again by each rank).
        formats: names in :data:`formats.LAYOUTS`.
        world_size: the number of processes of the run (their parts are named by it).
        resume: continue the run that made ``output_dir``.
        claim: check and claim the output folder (the first machine of a run does; the
            others' processes start only once it has).
        shard_size, id_field, shard_index, num_shards: a shard run (tar shards in, or
            ``shard_size``), see :mod:`.input_shards`.
        options: the other fields of :class:`ExtractionJob`.

    Raises:
        ExtractionError, InputError, OutputFolderError: with a one-line message.
    """
    shard_run = bool(shard_size) or is_shard_source(source)
    if shard_run and list(formats) != ["npz"]:
        raise ExtractionError("sharded output holds npz members only: drop --format, or convert later")
    if not shard_run:
        try:
            formats = check_formats(formats)
        except ValueError as e:
            raise ExtractionError(str(e))
    model_config = as_model_config(cfg)
    emits = _region_fields(model_config)
    if not shard_run:
        _check_needs(emits, formats)
    names = model_config.vocabularies()
    identity = model_config.identity()
    if shard_run:
        shards, inputs_sha256 = plan_shards(source, shard_size, image_root, id_mode, limit)
        shards, _, _ = select_shards(shards, shard_index, num_shards)
        claim_output_folder(output_dir, dict(
            identity, fp16=bool(options.get("fp16", False)), amp=bool(options.get("amp", False)),
            id_field=id_field, id=id_mode, shard_size=shard_size, limit=limit, inputs_sha256=inputs_sha256,
            class_names=names.class_names, versions=package_versions(),
        ), resume, shared=True, name=SHARDS_MANIFEST)
        return ExtractionJob(
            model_config=model_config, items=[], output_dir=output_dir, formats=["npz"], emits=emits, names=names,
            shards=shards, id_field=id_field, limit=limit,
            complete=all(is_complete(output_dir, s.name) for s in shards), **options
        )
    items = Inputs(source, image_root, limit, id_mode)
    count, inputs_sha256 = items.check()
    if not count:
        raise ExtractionError(f"--input {source} holds no images")
    try:
        check_ids(formats, items.usable_ids())
    except LayoutIdError as e:
        raise ExtractionError(f"--format {e}")
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "complete": False,
        **model_config.manifest_entries(),
        "formats": formats,
        "format_versions": {f: LAYOUTS[f].version for f in formats},
        "fp16": bool(options.get("fp16", False)),
        "id": id_mode,
        "class_names": names.class_names,
        "attribute_names": names.attribute_names,
        "region_fields": emits.instance_fields(),
        "amp": bool(options.get("amp", False)),
        "world_size": world_size,
        "input": source,
        "inputs_sha256": inputs_sha256,
        "versions": package_versions(),
    }
    if names.class_names is None:
        manifest["class_names_missing"] = NO_NAMES_HINT
    complete = claim and RunFolder(output_dir, formats).claim(manifest, resume)
    return ExtractionJob(
        model_config=model_config, items=items, output_dir=output_dir, formats=formats, emits=emits, names=names,
        complete=complete, count=count, **options
    )


def _region_fields(model_config: ModelConfig) -> RegionFields:
    """
    What the model emits, asked of it built once on the CPU without its weights (what it
    emits does not depend on them): a second or two, before any process starts.
    """
    try:
        return region_fields(model_config.build_model("cpu"))
    except ValueError as e:
        raise ExtractionError(one_line(e))


def _check_needs(emits: RegionFields, formats):
    """Refuse layouts that need record keys the model does not emit."""
    keys = record_keys(emits)
    for fmt in formats:
        for key, hint in LAYOUTS[fmt].needs.items():
            if key not in keys:
                raise ExtractionError(f"--format {fmt} needs {hint}")
        if not LAYOUTS[fmt].grid and "x" not in keys:
            raise ExtractionError(
                f"--format {fmt} holds regions, which MODEL.REGION_FEATURES.GRID.ONLY does not make"
            )


def finish(job: ExtractionJob, world_size: int):
    """Rank 0, all ranks done: merge the parts, complete the manifest."""
    RunFolder(job.output_dir, job.formats).finish(
        world_size, job.names, inputs=job.count, num_classes=job.emits.num_classes
    )


def summary(output_dir, manifest, stats: List[Dict], seconds: float) -> str:
    """
    The end-of-run report: counts of this session and of the folder, regions, time
    (``stats``: each rank's counts, see :func:`.pipeline.extract`).
    """
    done = sum(s["done"] for s in stats)
    regions = [s["regions"] for s in stats]
    with_regions = sum(r["images"] for r in regions)
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
    if with_regions:
        lines.append(_regions_line(min(r["min"] for r in regions), sum(r["sum"] for r in regions) / with_regions,
                                   max(r["max"] for r in regions)) + f"; feature dim {manifest['feature_dim']}")
    lines.append(f"  wall time  {seconds:.1f} s ({done / max(seconds, 1e-9):.2f} images/s)")
    model_s, write_s = sum(s["model_s"] for s in stats), sum(s["write_s"] for s in stats)
    if done:
        lines.append(
            f"  time       model {model_s:.1f} s, writers {write_s:.2f} s (in a thread beside "
            f"the model; {100 * write_s / max(model_s, 1e-9):.1f}% of model time), summed over ranks"
        )
    return "\n".join(lines)


def _regions_line(least: int, mean: float, most: int) -> str:
    return f"  regions    per image min {least}, mean {mean:.1f}, max {most}"


def shard_summary(output_dir, stats: List[Dict], seconds: float) -> str:
    """
    The end-of-run report of a shard run (``stats``: each rank's), with the counts of every
    complete shard of the folder (:meth:`ShardFolder.counts`: every worker's so far).
    """
    lost = [name for s in stats for name in s["lost"]]
    done = sum(s["done"] for s in stats)
    counts = ShardFolder(output_dir).counts()
    regions = counts["regions"]
    lines = [
        f"Shards: {sum(s['shards'] for s in stats)} of this worker, {sum(s['complete'] for s in stats)} "
        f"already complete; {done} images extracted, {sum(s['failed'] for s in stats)} failed "
        f"(in <shard>.failures.jsonl) in {output_dir}",
        f"  in folder  {counts['shards']} complete shards of {counts['images']} images: {counts['written']} "
        f"extracted, {counts['failed']} failed, {counts['no_regions']} with no region",
    ]
    if regions["images"]:
        lines.append(_regions_line(regions["min"], regions["sum"] / regions["images"], regions["max"]))
    lines.append(f"  wall time  {seconds:.1f} s ({done / max(seconds, 1e-9):.2f} images/s)")
    if lost:
        lines.append(f"  lost       {len(lost)} input shards could not be read ({', '.join(sorted(lost))}; "
                     "reasons in <shard>.failures.jsonl): rerun to retry them")
    return "\n".join(lines)
