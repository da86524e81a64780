"""What a rank of a run (extraction or conversion) does with its layouts: skip what they
hold, store new records in each, log failures and images without regions, merge at the end."""
import json
import os
from typing import Dict, List, Sequence

from .base import WRITERS
from .records import LayoutIdError
from .safety import FailureLog, NoRegionsLog

MANIFEST_NAME = "manifest.json"
FAILURES_NAME = FailureLog.stem + ".jsonl"
NO_REGIONS_NAME = NoRegionsLog.stem + ".jsonl"
NO_REGIONS = "no regions"


def check_ids(formats: Sequence[str], image_ids: Sequence[str]):
    """
    Check that every layout can store every image id, and that no two images get the same
    key in a layout.

    Raises:
        LayoutIdError: naming the layout and the id(s), one line.
    """
    for fmt in formats:
        writer = WRITERS[fmt]
        first = {}
        for image_id in image_ids:
            try:
                key = writer.key(image_id)
            except LayoutIdError as e:
                raise LayoutIdError(f"{fmt}: {e}")
            if key in first:
                raise LayoutIdError(
                    f"{fmt}: images {first[key]!r} and {image_id!r} both get id {key!r}"
                )
            first[key] = image_id


class RunOutputs:
    """This rank's writers, failure and no-region logs, and what they held when it started."""

    def __init__(self, output_dir: str, formats: Sequence[str], rank: int, world_size: int,
                 image_ids: Sequence[str], paths: Dict[str, str] = None):
        """
        Args:
            image_ids: the ids of the run's images (all ranks'), as the records hold them.
            paths: image id -> file, for the logs.
        """
        self.writers = [WRITERS[f](output_dir, rank, world_size) for f in formats]
        self.failures = FailureLog(output_dir, rank, world_size)
        self.no_regions = NoRegionsLog(output_dir, rank, world_size)
        self.paths = paths or {}
        self.left_out = [f for f, w in zip(formats, self.writers) if not w.keeps_empty]
        self.keys = [{i: type(w).key(i) for i in image_ids} for w in self.writers]
        self.written = []
        for writer, keys in zip(self.writers, self.keys):
            held = writer.written()
            ids = {i for i, key in keys.items() if key in held}
            self.written.append(ids if writer.keeps_empty else ids | self.no_regions.ids)
        # images that need nothing more: failed, or in every layout
        self.recorded = self.failures.ids | set.intersection(*self.written)

    def store(self, records: List[Dict], failed: List[Dict] = ()):
        """
        Write what each layout lacks of ``records`` (a layout that holds no image without
        regions leaves those out), then log those without regions and ``failed``
        (``{"image_id", "path", "reason"}``).
        """
        for writer, keys, ids in zip(self.writers, self.keys, self.written):
            writer.write([
                dict(r, image_id=keys[r["image_id"]]) for r in records
                if r["image_id"] not in ids and (r.get("num_bbox") != 0 or writer.keeps_empty)
            ])
        # a grid-only record (no num_bbox) has no regions to lack
        empty = [r["image_id"] for r in records if r.get("num_bbox") == 0 and r["image_id"] not in self.no_regions.ids]
        self.no_regions.add([
            {"image_id": i, "path": self.paths.get(i), "reason": NO_REGIONS, "left_out_of": self.left_out}
            for i in empty
        ])
        self.no_regions.ids.update(empty)
        self.failures.add(list(failed))

    def close(self):
        for writer in self.writers:
            writer.close()
        self.failures.close()
        self.no_regions.close()


def _count_lines(path):
    with open(path) as f:
        return sum(1 for _ in f)


def merge_outputs(output_dir: str, formats: Sequence[str], world_size: int) -> Dict:
    """
    Rank 0, all ranks closed: merge every layout and log. Returns the counts for the
    manifest: ``failed``, ``no_regions`` and ``left_out`` (layout -> images it lacks
    for having no region).
    """
    for fmt in formats:
        WRITERS[fmt].merge(output_dir, world_size)
    FailureLog.merge(output_dir, world_size)
    NoRegionsLog.merge(output_dir, world_size)
    no_regions = _count_lines(os.path.join(output_dir, NO_REGIONS_NAME))
    return {
        "failed": _count_lines(os.path.join(output_dir, FAILURES_NAME)),
        "no_regions": no_regions,
        "left_out": {f: no_regions for f in formats if not WRITERS[f].keeps_empty},
    }


def read_log(path: str) -> List[Dict]:
    """The entries of a failures / no-regions JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
