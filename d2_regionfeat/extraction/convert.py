"""
Turning a finished extraction (an output folder, or output shards: one folder of them, several
or a glob) into other layouts without the model: the work of ``tools/convert_features.py``.
Records are streamed (shards one after another, each read sequentially); only the ids are held,
to check them (an id in two shards is refused, naming both). It is crash-safe and resumable as
extraction is: the same writers, parts, logs and manifest: the same run object
(:class:`.run.RunFolder`).
"""
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

from ..formats import LAYOUTS, LayoutIdError, WriteOnlyLayoutError, read_features
from ..formats.records import GRID_REQUIRED_KEYS, REQUIRED_KEYS, int_id
from ..formats.feature_shards import SHARDS, DuplicateIdError, ShardFolder, holds_shards, shard_folders
from ..modeling.vocabulary import Vocabularies
from .manifest import read_manifest
from .run import NO_REGIONS, FailureLog, NoRegionsLog, RunFolder, check_formats, check_ids, read_log
from .input_shards import SHARDS_MANIFEST

# Source layouts, best first: complete records (class probabilities, images without
# regions), in input order where possible.
SOURCE_PREFERENCE = ("hdf5", "lmdb", "npz", "tsv", "oscar", "butd_tsv", "openvqa", "openvqa_gqa", "ban_hdf5")
# The same for grid layouts (written from grid records only).
GRID_SOURCE_PREFERENCE = ("grid_hdf5", "grid_npz")
# Records handed to the writers at once.
CHUNK = 64


class ConversionError(RuntimeError):
    """A conversion that cannot be done, reported as one line."""


def _source_format(manifest, in_dir, source_format, grid=False):
    if source_format is not None:
        if source_format not in manifest["formats"]:
            raise ConversionError(f"{in_dir} holds no {source_format} (it holds {', '.join(manifest['formats'])})")
        return source_format
    for fmt in GRID_SOURCE_PREFERENCE if grid else SOURCE_PREFERENCE:
        if fmt in manifest["formats"]:
            return fmt
    if grid:
        raise ConversionError(
            f"{in_dir} holds only {', '.join(manifest['formats'])}: convert grid layouts from a run "
            "with grid_hdf5 or grid_npz"
        )
    raise ConversionError(
        f"{in_dir} holds only {', '.join(manifest['formats'])}, which hold pickles or part of the "
        "records: convert from a run with npz, hdf5, lmdb or tsv"
    )


def _check_source(record, source, formats, grid=False):
    """Refuse targets that need what the source's records lack."""
    missing = [k for k in (GRID_REQUIRED_KEYS if grid else REQUIRED_KEYS) if k not in record]
    if missing:
        raise ConversionError(
            f"the source layout {source} lacks {', '.join(missing)}: convert from npz, hdf5 or lmdb"
        )
    for fmt in formats:
        for key, hint in LAYOUTS[fmt].needs.items():
            if key not in record:
                raise ConversionError(
                    f"--format {fmt} needs {hint}; the source layout {source} holds no {key}"
                )


def _new_id(image_id, id_mode):
    return str(int_id(image_id)) if id_mode == "int" and image_id is not None else image_id


@dataclass
class Source:
    """
    What a conversion reads: a finished extraction's output folder (one of its layouts), or
    output shards (a folder of them, several, or a glob: their records streamed shard by shard).
    """

    path: Union[str, List[str]]
    manifest: Dict  # the run's manifest; of shards, their shards.json
    format: str  # the layout read (``shards`` for output shards)
    failed: List[Dict] = field(default_factory=list)  # the run's failure entries
    no_regions: List[Dict] = field(default_factory=list)  # its no-region entries (a folder run's)

    @property
    def shards(self) -> bool:
        return self.format == SHARDS

    def records(self) -> Iterator[Dict]:
        return read_features(self.path, self.format)

    def scan(self):
        """
        The ids of the records in reading order, and the first record with regions (None
        without one); of shards, from their indexes (the ids checked, see :class:`ShardFolder`).
        """
        if not self.shards:
            ids, first = [], None
            for record in self.records():
                ids.append(record["image_id"])
                if first is None and record.get("num_bbox", 1):
                    first = record
            return ids, first
        folder, ids, first = ShardFolder(self.path), [], None
        for _, entry in folder.entries():
            ids.append(entry["id"])
            if first is None and entry.get("num_bbox", 1):
                first = entry["id"]
        return ids, None if first is None else folder[first]


def open_source(in_dir, source_format: Optional[str] = None, grid: bool = False) -> Source:
    """
    The :class:`Source` at ``in_dir``: an output folder with a complete manifest, or output
    shards (a folder of them with its shards.json, a list of such folders, or a glob).

    Raises:
        ConversionError: it is neither, or shards of other settings are mixed (one line).
    """
    if isinstance(in_dir, os.PathLike):
        in_dir = os.fspath(in_dir)
    if holds_shards(in_dir) and not (isinstance(in_dir, str) and read_manifest(in_dir)):
        try:
            folders = shard_folders(in_dir)
        except ValueError as e:
            raise ConversionError(str(e))
        if source_format not in (None, SHARDS):
            raise ConversionError(f"{in_dir} holds output shards (npz members): drop --source-format")
        manifests = [read_manifest(f, SHARDS_MANIFEST) for f in folders]
        for folder, manifest in zip(folders, manifests):
            if manifest is None:
                raise ConversionError(f"{folder} holds no {SHARDS_MANIFEST}: not the output of a shard run")
            differs = sorted(k for k in set(manifest) | set(manifests[0])
                             if k != "versions" and manifest.get(k) != manifests[0].get(k))
            if differs:
                raise ConversionError(
                    f"{folders[0]} and {folder} were extracted with other settings (their {SHARDS_MANIFEST} "
                    f"differ in {', '.join(differs)}): convert them separately"
                )
        failed = ShardFolder(folders).failures()
        return Source(folders if len(folders) > 1 else folders[0], manifests[0], SHARDS, failed)
    manifest = read_manifest(in_dir)
    if not (manifest and manifest.get("complete")):
        raise ConversionError(f"{in_dir} holds no finished extraction (its manifest.json is missing or not complete)")
    logs = [os.path.join(in_dir, log.stem + ".jsonl") for log in (FailureLog, NoRegionsLog)]
    failed, no_regions = [read_log(path) if os.path.isfile(path) else [] for path in logs]
    return Source(in_dir, manifest, _source_format(manifest, in_dir, source_format, grid), failed, no_regions)


def convert(in_dir, formats: Sequence[str], output_dir: str, id_mode: Optional[str] = None,
            resume: bool = False, source_format: Optional[str] = None) -> Dict:
    """
    Write the records of the extraction in ``in_dir`` in ``formats`` into ``output_dir``.

    Args:
        in_dir: an output folder of a finished extraction; or output shards: a folder of them,
            a list of such folders or a glob (read shard by shard, never all at once).
        id_mode: None or "stem" (the source's ids) or "int" (their trailing digits).
        resume: continue the conversion that made ``output_dir``.
        source_format: the layout of ``in_dir`` to read (default: the best it holds).

    Returns:
        the manifest of ``output_dir``, complete.

    Raises:
        ConversionError, OutputFolderError: with a one-line message; nothing written then
            (an image id in two shards too, naming both).
    """
    try:
        formats = check_formats(formats)
    except ValueError as e:
        raise ConversionError(str(e))
    grid = {LAYOUTS[f].grid for f in formats}
    if len(grid) > 1:
        raise ConversionError("--format mixes grid and region layouts: convert them separately")
    grid = grid.pop()
    source = open_source(in_dir, source_format, grid)

    def records():
        for record in source.records():
            yield dict(record, image_id=_new_id(record["image_id"], id_mode))

    try:
        ids, first = source.scan()
        ids = [_new_id(i, id_mode) for i in ids]
        if len(set(ids)) < len(ids):
            raise ConversionError(f"--id {id_mode}: two images of {in_dir} get the same id")
        if first is not None:
            _check_source(first, source.format, formats, grid)
        check_ids(formats, ids)
    except LayoutIdError as e:
        raise ConversionError(f"--format {e}")
    except (WriteOnlyLayoutError, DuplicateIdError) as e:
        raise ConversionError(str(e))

    source_manifest = source.manifest
    paths = [os.path.abspath(p) for p in ([source.path] if isinstance(source.path, str) else source.path)]
    manifest = dict(
        source_manifest, complete=False, formats=formats, world_size=1, id=id_mode,
        format_versions={f: LAYOUTS[f].version for f in formats},
        converted_from={"path": paths[0] if len(paths) == 1 else paths, "format": source.format},
    )
    for key in ("counts", "feature_dim"):
        manifest.pop(key, None)
    run = RunFolder(output_dir, formats)
    if run.claim(manifest, resume):
        return read_manifest(output_dir)

    failed = _by_id(source.failed, FailureLog, id_mode)
    no_regions = _by_id(source.no_regions, NoRegionsLog, id_mode)
    no_region_paths = {i: e["path"] for i, e in no_regions.items()}
    outputs = run.outputs(0, 1)
    chunk, seen = [], set()
    for record in records():
        seen.add(record["image_id"])
        if record["image_id"] not in outputs.recorded:
            chunk.append(record)
        if len(chunk) == CHUNK:
            outputs.store(chunk, paths=no_region_paths)
            chunk = []
    outputs.store(chunk, [e for i, e in failed.items() if i not in outputs.failures.ids], no_region_paths)
    # images without regions that the source layout does not hold: in none of the targets
    unseen = [e for i, e in no_regions.items() if i not in seen and i not in outputs.no_regions.ids]
    outputs.no_regions.add([dict(e, reason=NO_REGIONS, left_out_of=formats) for e in unseen])
    outputs.close()

    if source.shards:
        inputs, written = len(ids) + len(failed), len(ids)
        feature_dim = None if first is None else int(first["x"].shape[1])
    else:
        inputs, written = source_manifest["counts"]["inputs"], source_manifest["counts"]["written"]
        feature_dim = source_manifest.get("feature_dim")
    return run.finish(
        1, Vocabularies(source_manifest.get("class_names"), source_manifest.get("attribute_names")),
        inputs=inputs, written=written, feature_dim=feature_dim,
    )


def _by_id(entries: List[Dict], log, id_mode) -> Dict[str, Dict]:
    """The source's failures / no-regions entries (``log``: their log's class), by (new) image id."""
    out = {}
    for entry in entries:
        image_id = entry[log.id_key]
        try:
            image_id = _new_id(image_id, id_mode)
        except LayoutIdError:
            pass  # a failed image keeps the id it had
        out[image_id] = dict(entry, **{log.id_key: image_id})
    return out
