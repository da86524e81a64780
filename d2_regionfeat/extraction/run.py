"""
The bookkeeping of a run (extraction or conversion) in its output folder: the run object
(:class:`RunFolder`: claim the folder, store records, merge, finish), each rank's writers and
logs (:class:`RankFiles`), the failure and no-region logs, and reading an output folder
back. The layouts themselves are :mod:`d2_regionfeat.formats`.
"""
import itertools
import json
import os
import shutil
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from .. import formats as layouts
from ..formats import LAYOUTS, LayoutIdError
from ..formats.safety import LineLog, new_part, part_path, replace_with_copy
from ..modeling.vocabulary import Vocabularies
from .inputs import Repeats, first_repeat
from .manifest import MANIFEST_NAME, claim_output_folder, read_manifest, write_manifest

NO_REGIONS = "no regions"


class JsonLinesLog(LineLog):
    """
    A rank's :class:`LineLog` of JSON objects with an ``image_id``, merged into
    ``<output>/<stem>.jsonl``.
    """

    stem = ""
    # the entries' key of their image id
    id_key = "image_id"

    def __init__(self, output_dir: str, rank: int, world_size: int):
        path = new_part(output_dir, self.stem, rank, world_size)
        super().__init__(path, lambda line: json.loads(line)[self.id_key])

    def add(self, entries: List[Dict]):
        self.append((json.dumps(e, ensure_ascii=False) + "\n").encode("utf-8") for e in entries)

    @classmethod
    def merge(cls, output_dir: str, world_size: int):
        parts = [part_path(output_dir, cls.stem, r, world_size) for r in range(world_size)]
        replace_with_copy(parts, os.path.join(output_dir, cls.stem + ".jsonl"))


class FailureLog(JsonLinesLog):
    """
    The images a rank could not extract, as JSON lines of :func:`failure` entries; merged into
    ``<output>/failures.jsonl``.
    """

    stem = "failures"
    id_key = "id"


class NoRegionsLog(JsonLinesLog):
    """
    The images with no region, as JSON lines ``{"image_id", "path", "reason": "no regions",
    "left_out_of": [layouts]}`` (the layouts of the run that do not hold such an image);
    merged into ``<output>/no_regions.jsonl``.
    """

    stem = "no_regions"


FAILURES_NAME = FailureLog.stem + ".jsonl"


def failure(item, reason: str) -> Dict:
    """
    The failure entry of every run: ``{"id", "member", "reason"}`` of an input that gave no
    record (``member``: its file, or its tar member), and ``"shard"`` for an input shard's.
    """
    entry = {"id": item.image_id, "member": item.path, "reason": reason}
    if getattr(item, "shard", None):
        entry["shard"] = item.shard
    return entry
NO_REGIONS_NAME = NoRegionsLog.stem + ".jsonl"


def check_formats(formats: Sequence[str]) -> List[str]:
    """
    ``formats`` without repeats.

    Raises:
        ValueError: one is not in :data:`formats.LAYOUTS`, or there is none (one line).
    """
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in LAYOUTS]
    if unknown or not formats:
        raise ValueError(f"--format must be among {', '.join(LAYOUTS)}; got {formats}")
    return formats


def format_names(words: Sequence[str]) -> List[str]:
    """The layout names of ``--format`` words, each a name or a comma list of names."""
    return [f for word in words for f in word.split(",") if f]


def check_ids(formats: Sequence[str], image_ids: Iterable[str]):
    """
    Check that every layout can store every image id, and that no two images get the same
    key in a layout.

    ``image_ids`` (distinct, an iterable read again each time it is iterated: a list, or
    :meth:`.inputs.Inputs.usable_ids`) is read once, and again for a layout whose key of
    some id is not the id: its keys are then held as :class:`.inputs.Repeats` (8 bytes an
    image), not as a set.

    Raises:
        LayoutIdError: naming the layout and the id(s), one line: the first problem (in id
            order) of the first layout (in ``formats`` order) that has one.
    """
    keys = [LAYOUTS[f].key for f in formats]
    refused = [None] * len(formats)  # each layout's first refusal: (position, error)
    changed = [False] * len(formats)  # whether a layout's key of an id before it is not the id
    for n, image_id in enumerate(image_ids):
        for f, key in enumerate(keys):
            if refused[f] is not None:
                continue
            try:
                changed[f] = key(image_id) != image_id or changed[f]
            except LayoutIdError as e:
                refused[f] = (n, LayoutIdError(f"{formats[f]}: {e}"))
    for fmt, key, refusal, keys_differ in zip(formats, keys, refused, changed):
        # distinct ids kept as they are have distinct keys; only ids before the refusal count
        if keys_differ:
            before = None if refusal is None else refusal[0]
            repeats = Repeats()
            for image_id in itertools.islice(image_ids, before):
                repeats.add(key(image_id))
            pairs = ((key(i), i) for i in itertools.islice(image_ids, before))
            repeat = first_repeat(pairs, repeats.candidates())
            if repeat:
                raise LayoutIdError(f"{fmt}: images {repeat[1]!r} and {repeat[2]!r} both get id {repeat[0]!r}")
        if refusal is not None:
            raise refusal[1]


class RankFiles:
    """
    This rank's writers, failure and no-region logs, and what they held when it started.

    Resuming holds what the layouts' parts hold (each layout's keys, the failed and no-region
    ids: as sets, some 100 bytes an image already written); whether an image needs nothing
    more (:attr:`recorded`) is worked out per image, not held for the run's images.
    """

    def __init__(self, output_dir: str, formats: Sequence[str], rank: int, world_size: int):
        self.writers = [LAYOUTS[f](output_dir, rank, world_size) for f in formats]
        self.failures = FailureLog(output_dir, rank, world_size)
        self.no_regions = NoRegionsLog(output_dir, rank, world_size)
        self.left_out = [f for f, w in zip(formats, self.writers) if not w.keeps_empty]
        # each layout's keys when the rank started
        self.held = [writer.written() for writer in self.writers]

    @property
    def recorded(self) -> "_Recorded":
        """``image_id in recorded``: the image needs nothing more (failed, or in every layout)."""
        # made when asked, not held: it refers to this object (a cycle would keep a killed
        # run's files, an LMDB environment, open until the garbage collector ran)
        return _Recorded(self)

    def holds(self, layout: int, image_id: str) -> bool:
        """Whether the ``layout``-th layout holds the image (or leaves it out: it has no regions)."""
        writer = self.writers[layout]
        if not writer.keeps_empty and image_id in self.no_regions.ids:
            return True
        try:
            return type(writer).key(image_id) in self.held[layout]
        except LayoutIdError:  # an input that is not extracted (its id is its error)
            return False

    def store(self, records: List[Dict], failed: List[Dict] = (), paths: Dict[str, str] = None):
        """
        Write what each layout lacks of ``records`` (a layout that holds no image without
        regions leaves those out), then log those without regions and ``failed``
        (``{"image_id", "path", "reason"}``). ``paths``: image id -> file, for the logs.
        """
        paths = paths or {}
        for layout, writer in enumerate(self.writers):
            writer.write([
                dict(r, image_id=type(writer).key(r["image_id"])) for r in records
                if not self.holds(layout, r["image_id"]) and (r.get("num_bbox") != 0 or writer.keeps_empty)
            ])
        # a grid-only record (no num_bbox) has no regions to lack
        empty = [r["image_id"] for r in records if r.get("num_bbox") == 0 and r["image_id"] not in self.no_regions.ids]
        self.no_regions.add([
            {"image_id": i, "path": paths.get(i), "reason": NO_REGIONS, "left_out_of": self.left_out}
            for i in empty
        ])
        self.no_regions.ids.update(empty)
        self.failures.add(list(failed))

    def close(self):
        for writer in self.writers:
            writer.close()
        self.failures.close()
        self.no_regions.close()


class _Recorded:
    """``image_id in recorded``: whether a rank's image needs nothing more (see :class:`RankFiles`)."""

    def __init__(self, outputs: RankFiles):
        self.outputs = outputs

    def __contains__(self, image_id: str) -> bool:
        outputs = self.outputs
        return image_id in outputs.failures.ids or all(
            outputs.holds(layout, image_id) for layout in range(len(outputs.writers))
        )


def _count_lines(path):
    with open(path) as f:
        return sum(1 for _ in f)


def merge_outputs(output_dir: str, formats: Sequence[str], world_size: int,
                  names: Optional[Vocabularies] = None) -> Dict:
    """
    Rank 0, all ranks closed: merge every layout and log; ``names`` (the model's class and
    attribute names) go to the layouts that write names. Returns the counts for the
    manifest: ``failed``, ``no_regions`` and ``left_out`` (layout -> images it lacks
    for having no region).
    """
    for fmt in formats:
        extra = {"names": names} if LAYOUTS[fmt].takes_names else {}
        LAYOUTS[fmt].merge(output_dir, world_size, **extra)
    FailureLog.merge(output_dir, world_size)
    NoRegionsLog.merge(output_dir, world_size)
    no_regions = _count_lines(os.path.join(output_dir, NO_REGIONS_NAME))
    return {
        "failed": _count_lines(os.path.join(output_dir, FAILURES_NAME)),
        "no_regions": no_regions,
        "left_out": {f: no_regions for f in formats if not LAYOUTS[f].keeps_empty},
    }


def read_log(path: str) -> List[Dict]:
    """The entries of a failures / no-regions JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class RunFolder:
    """
    The output folder of a run, extraction or conversion::

        run = RunFolder(output_dir, formats)
        if not run.claim(manifest, resume):          # first machine, before any process
            outputs = run.outputs(rank, world_size)                     # every rank
            outputs.store(records, failed, paths); outputs.close()
            run.finish(world_size, class_names, inputs=..., written=...)  # rank 0, all done
    """

    def __init__(self, output_dir: str, formats: Sequence[str]):
        self.output_dir = output_dir
        self.formats = list(formats)

    def claim(self, manifest: Dict, resume: bool) -> bool:
        """
        Make the folder this run's (see :func:`manifest.claim_output_folder`); whether it
        already holds the finished run.
        """
        return bool(claim_output_folder(self.output_dir, manifest, resume)["complete"])

    def outputs(self, rank: int, world_size: int) -> "RankFiles":
        """This rank's writers and logs (see :class:`RankFiles`)."""
        return RankFiles(self.output_dir, self.formats, rank, world_size)

    def finish(self, world_size: int, names: Optional[Vocabularies], inputs: int,
               written: Optional[int] = None, **manifest) -> Dict:
        """
        Rank 0, every rank closed: merge the layouts and logs, complete the manifest (its
        counts, ``feature_dim`` unless given, the other ``manifest`` entries), then remove
        the parts.

        Args:
            names: the model's class and attribute names, for the layouts that write names.
            inputs, written: the counts of images (written: default, those that did not fail).

        Returns:
            the complete manifest.
        """
        counts = merge_outputs(self.output_dir, self.formats, world_size, names)
        if written is None:
            written = inputs - counts["failed"]
        if "feature_dim" not in manifest:
            manifest["feature_dim"] = self.feature_dim()
        complete = read_manifest(self.output_dir)
        complete.update(manifest, complete=True, counts=dict(counts, inputs=inputs, written=written))
        write_manifest(self.output_dir, complete)
        shutil.rmtree(os.path.join(self.output_dir, "parts"), ignore_errors=True)
        return complete

    def feature_dim(self) -> Optional[int]:
        """D, from the first record of a layout that reads back (None without one)."""
        # a one-file layout finds its first record at once; a folder would be listed whole
        readable = [f for f in self.formats if LAYOUTS[f].reads_back() and not LAYOUTS[f].grid]
        readable.sort(key=lambda f: LAYOUTS[f].output_name == f)
        for fmt in readable:
            first = next(layouts.read_features(self.output_dir, fmt), None)
            if first is not None:
                return int(first["x"].shape[1])
        return None


def read_features(path, fmt: Optional[str] = None) -> Iterator[Dict]:
    """
    The one reader of features: :func:`d2_regionfeat.formats.read_features` (a layout's file
    or folder, an output folder, output shards: a folder of them, several or a glob), and for
    an output folder of a run its manifest's names (and, without ``fmt``, its first layout).
    """
    names = None
    if isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        manifest = read_manifest(path)
        fmt = fmt or manifest["formats"][0]
        names = Vocabularies(manifest.get("class_names"), manifest.get("attribute_names"))
    return layouts.read_features(path, fmt, names)
