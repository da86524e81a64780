"""
Turning a finished extraction into other layouts without the model: the work of
``tools/convert_features.py``. It is crash-safe and resumable as extraction is: the same
writers, parts, logs and manifest: the same run object (:class:`.run.RunFolder`).
"""
import os
from typing import Dict, List, Optional, Sequence

from ..formats import WRITERS, LayoutIdError, WriteOnlyLayoutError, read_features
from ..formats.records import GRID_REQUIRED_KEYS, REQUIRED_KEYS, int_id
from ..modeling.vocabulary import Vocabularies
from .manifest import read_manifest
from .run import NO_REGIONS, FailureLog, NoRegionsLog, RunFolder, check_formats, check_ids, read_log

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
        for key, hint in WRITERS[fmt].needs.items():
            if key not in record:
                raise ConversionError(
                    f"--format {fmt} needs {hint}; the source layout {source} holds no {key}"
                )


def _new_id(image_id, id_mode):
    return str(int_id(image_id)) if id_mode == "int" else image_id


def convert(in_dir: str, formats: Sequence[str], output_dir: str, id_mode: Optional[str] = None,
            resume: bool = False, source_format: Optional[str] = None) -> Dict:
    """
    Write the records of the extraction in ``in_dir`` in ``formats`` into ``output_dir``.

    Args:
        id_mode: None or "stem" (the source's ids) or "int" (their trailing digits).
        resume: continue the conversion that made ``output_dir``.
        source_format: the layout of ``in_dir`` to read (default: the best it holds).

    Returns:
        the manifest of ``output_dir``, complete.

    Raises:
        ConversionError, OutputFolderError: with a one-line message; nothing written then.
    """
    source_manifest = read_manifest(in_dir)
    if not (source_manifest and source_manifest.get("complete")):
        raise ConversionError(f"{in_dir} holds no finished extraction (its manifest.json is missing or not complete)")
    try:
        formats = check_formats(formats)
    except ValueError as e:
        raise ConversionError(str(e))
    grid = {WRITERS[f].grid for f in formats}
    if len(grid) > 1:
        raise ConversionError("--format mixes grid and region layouts: convert them separately")
    grid = grid.pop()
    source = _source_format(source_manifest, in_dir, source_format, grid)

    def records():
        for record in read_features(in_dir, source):
            yield dict(record, image_id=_new_id(record["image_id"], id_mode))

    try:
        ids, first = [], None
        for record in read_features(in_dir, source):
            ids.append(_new_id(record["image_id"], id_mode))
            if first is None and record.get("num_bbox", 1):
                first = record
        if len(set(ids)) < len(ids):
            raise ConversionError(f"--id {id_mode}: two images of {in_dir} get the same id")
        if first is not None:
            _check_source(first, source, formats, grid)
        check_ids(formats, ids)
    except LayoutIdError as e:
        raise ConversionError(f"--format {e}")
    except WriteOnlyLayoutError as e:
        raise ConversionError(str(e))

    manifest = dict(
        source_manifest, complete=False, formats=formats, world_size=1, id=id_mode,
        format_versions={f: WRITERS[f].version for f in formats},
        converted_from={"path": os.path.abspath(in_dir), "format": source},
    )
    for key in ("counts", "feature_dim"):
        manifest.pop(key, None)
    run = RunFolder(output_dir, formats)
    if run.claim(manifest, resume):
        return read_manifest(output_dir)

    failed = _log(in_dir, FailureLog, id_mode)
    no_regions = _log(in_dir, NoRegionsLog, id_mode)
    outputs = run.outputs(0, 1, ids, {i: e["path"] for i, e in no_regions.items()})
    chunk, seen = [], set()
    for record in records():
        seen.add(record["image_id"])
        if record["image_id"] not in outputs.recorded:
            chunk.append(record)
        if len(chunk) == CHUNK:
            outputs.store(chunk)
            chunk = []
    outputs.store(chunk, [e for i, e in failed.items() if i not in outputs.failures.ids])
    # images without regions that the source layout does not hold: in none of the targets
    unseen = [e for i, e in no_regions.items() if i not in seen and i not in outputs.no_regions.ids]
    outputs.no_regions.add([dict(e, reason=NO_REGIONS, left_out_of=formats) for e in unseen])
    outputs.close()

    source_counts = source_manifest["counts"]
    return run.finish(
        1, Vocabularies(source_manifest.get("class_names"), source_manifest.get("attribute_names")),
        inputs=source_counts["inputs"],
        written=source_counts["written"], feature_dim=source_manifest.get("feature_dim"),
    )


def _log(in_dir, log, id_mode) -> Dict[str, Dict]:
    """The entries of the source's failures / no-regions file (``log``: its class), by (new) image id."""
    path = os.path.join(in_dir, log.stem + ".jsonl")
    entries: List[Dict] = read_log(path) if os.path.isfile(path) else []
    out = {}
    for entry in entries:
        image_id = entry[log.id_key]
        try:
            image_id = _new_id(image_id, id_mode)
        except LayoutIdError:
            pass  # a failed image keeps the id it had
        out[image_id] = dict(entry, **{log.id_key: image_id})
    return out
