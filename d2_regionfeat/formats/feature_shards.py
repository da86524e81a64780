"""
``shards``: a folder of output shards, each ``<name>.tar`` of per-image samples: a ``<key>.npz``
member (the record bytes of :func:`.records.encode_npz`, our ``npz`` layout), followed by the
input sample's ``<key>.json`` and ``<key>.txt`` members (:data:`CARRIED`, their bytes unchanged)
when it had them, so that a webdataset pipeline gets features and caption as one sample; beside
it ``<name>.jsonl``, its index, one line per record in tar order::

    {"id": ..., "member": "<key>.npz", "offset": byte offset of the member's data in the tar,
     "size": its length, "num_bbox": N, "image_h": H, "image_w": W, "json": {...}, "txt": "..."}

(``json`` (parsed, or its text when it is no json) and ``txt``: the carried members, when the
sample had them; ``num_bbox`` only for a record with regions), and ``<name>.failures.jsonl``, the shard's inputs that gave no record
(``{"id", "shard", "member", "reason"}``), and ``<name>.counts.json``, its counts (:func:`count_rows`),
which the shards of a folder sum to its counts (:meth:`ShardFolder.counts`) without reading
an index. A member holds every key of the record, grid ones too. An input shard that could
not be read at all leaves only its failures (no index), so it is not complete.

A shard is written under temporary names and renamed into place, its index last: a shard whose
index exists is complete; anything else of that name is an unfinished one, removed and redone.
The tar is written with fixed headers (mtime 0, uid 0, ustar), so the same records make the
same bytes. :class:`ShardFolder` reads one folder or several back, by id and as a stream.
"""
import glob
import io
import json
import os
import tarfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .records import GRID_KEYS, RECORD_KEYS, decode_npz, encode_npz

# What a member holds of a record: its region keys, then the grid ones.
MEMBER_KEYS = RECORD_KEYS + tuple(k for k in GRID_KEYS if k not in RECORD_KEYS)
# The input sample's members carried into the output tar (after the npz) and its index.
CARRIED = ("json", "txt")

# The layout's name for :func:`d2_regionfeat.formats.read_features`.
SHARDS = "shards"
TAR_SUFFIX = ".tar"
INDEX_SUFFIX = ".jsonl"
FAILURES_SUFFIX = ".failures.jsonl"
COUNTS_SUFFIX = ".counts.json"
_PARTIAL = ".partial"


def shard_paths(output_dir: str, name: str) -> Dict[str, str]:
    """The tar, index, failures and counts paths of shard ``name`` in ``output_dir``."""
    base = os.path.join(output_dir, name)
    return {"tar": base + TAR_SUFFIX, "index": base + INDEX_SUFFIX, "failures": base + FAILURES_SUFFIX,
            "counts": base + COUNTS_SUFFIX}


def is_complete(output_dir: str, name: str) -> bool:
    """Whether shard ``name`` was written to the end (its index, renamed last, exists)."""
    return os.path.isfile(shard_paths(output_dir, name)["index"])


def _index_fields(carried: Dict[str, bytes]) -> Dict:
    """The index line's ``json`` and ``txt`` of the carried members' bytes."""
    fields = {}
    if "json" in carried:
        try:
            fields["json"] = json.loads(carried["json"])
        except ValueError:
            fields["json"] = carried["json"].decode("utf-8", "replace")
    if "txt" in carried:
        fields["txt"] = carried["txt"].decode("utf-8", "replace")
    return fields


def count_rows(index: Sequence[Dict], failures: Sequence[Dict]) -> Dict:
    """
    The counts of a shard of ``index`` and ``failures`` rows: ``{"images": records + failures,
    "written": records, "failed", "no_regions": records of no region, "regions": {"images":
    records with regions counted, "sum", "min", "max"} of their ``num_bbox``}`` (a grid-only
    record has none). Counts of several shards add up key by key (:func:`add_counts`).
    """
    regions = [entry["num_bbox"] for entry in index if "num_bbox" in entry]
    return {
        "images": len(index) + len(failures), "written": len(index), "failed": len(failures),
        "no_regions": sum(1 for n in regions if n == 0),
        "regions": {"images": len(regions), "sum": sum(regions), "min": min(regions, default=None),
                    "max": max(regions, default=None)},
    }


def add_counts(total: Dict, counts: Dict) -> Dict:
    """``total`` and ``counts`` (of :func:`count_rows`) added: sums summed, ``min``/``max`` kept."""
    out = {k: total[k] + counts[k] for k in ("images", "written", "failed", "no_regions")}
    regions = {k: total["regions"][k] + counts["regions"][k] for k in ("images", "sum")}
    for key, pick in (("min", min), ("max", max)):
        values = [c["regions"][key] for c in (total, counts) if c["regions"][key] is not None]
        regions[key] = pick(values, default=None)
    return dict(out, regions=regions)


def _write_lines(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


class FeatureShardWriter:
    """
    Writes one output shard (see the module docstring): :meth:`add` each record in order,
    :meth:`fail` each input that gave none, then :meth:`close` puts the shard in place. Until
    then only ``*.partial`` files exist, which :meth:`__init__` removes from an earlier try.
    """

    def __init__(self, output_dir: str, name: str):
        self.paths = shard_paths(output_dir, name)
        self.name = name
        for path in self.paths.values():
            for stale in (path, path + _PARTIAL):
                if os.path.exists(stale):
                    os.remove(stale)
        self._file = open(self.paths["tar"] + _PARTIAL, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.index: List[Dict] = []
        self.failures: List[Dict] = []

    def _member(self, name: str, data: bytes) -> int:
        """Append member ``name`` of ``data``; returns the byte offset of its data in the tar."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        # a ustar header is one block: the data starts right after it
        offset = self._tar.offset + tarfile.BLOCKSIZE
        self._tar.addfile(info, io.BytesIO(data))
        return offset

    def add(self, record: Dict, member_key: str, carried: Optional[Dict[str, bytes]] = None):
        """
        Append ``record`` as member ``<member_key>.npz``, then ``carried`` (extension in
        :data:`CARRIED` -> the input sample's bytes) as ``<member_key>.<extension>``.
        """
        carried = carried or {}
        data = encode_npz(record, MEMBER_KEYS)
        entry = {
            "id": record["image_id"], "member": member_key + ".npz",
            "offset": self._member(member_key + ".npz", data), "size": len(data),
            "image_h": int(record["image_h"]), "image_w": int(record["image_w"]),
        }
        for ext in CARRIED:
            if ext in carried:
                self._member(f"{member_key}.{ext}", carried[ext])
        if "num_bbox" in record:
            entry["num_bbox"] = int(record["num_bbox"])
        entry.update(_index_fields(carried))
        self.index.append(entry)

    def fail(self, entry: Dict):
        """Record an input of the shard that gave no record (a failure entry of the run)."""
        self.failures.append(entry)

    def close(self):
        """Finish the tar, then rename tar, failures, counts and (last) index into place."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        _write_lines(self.paths["failures"] + _PARTIAL, self.failures)
        _write_lines(self.paths["counts"] + _PARTIAL, [count_rows(self.index, self.failures)])  # one line
        _write_lines(self.paths["index"] + _PARTIAL, self.index)
        for kind in ("tar", "failures", "counts", "index"):
            os.replace(self.paths[kind] + _PARTIAL, self.paths[kind])

    def abort(self):
        """Drop the unfinished shard (its partial files)."""
        self._tar.close()
        self._file.close()
        os.remove(self.paths["tar"] + _PARTIAL)

    def lose(self, entry: Dict):
        """Drop the shard, leaving only ``entry`` (why its input could not be read) as its failures."""
        self.abort()
        _write_lines(self.paths["failures"] + _PARTIAL, [entry])
        os.replace(self.paths["failures"] + _PARTIAL, self.paths["failures"])


def read_lines(path: str) -> List[Dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class DuplicateIdError(ValueError):
    """One image id in two shards (or twice in one) of the shards read together."""


def shard_folders(folders: Union[str, Sequence[str]]) -> List[str]:
    """
    The folders of output shards that ``folders`` names: a folder, a glob of folders, or a
    list of either; a glob expands in sorted order.

    Raises:
        ValueError: a name that is no folder or matches none (one line).
    """
    found = []
    for spec in [folders] if isinstance(folders, (str, os.PathLike)) else list(folders):
        spec = os.fspath(spec)
        matches = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
        dirs = [m for m in matches if os.path.isdir(m)]
        if not dirs:
            raise ValueError(f"{spec} is no folder of output shards")
        found.extend(dirs)
    return list(dict.fromkeys(found))


def shard_names(folder: str) -> List[str]:
    """The complete shards of ``folder`` (an index beside its tar), sorted by name."""
    files = set(os.listdir(folder))
    return sorted(
        f[: -len(INDEX_SUFFIX)] for f in files
        if f.endswith(INDEX_SUFFIX) and not f.endswith(FAILURES_SUFFIX)
        and f[: -len(INDEX_SUFFIX)] + TAR_SUFFIX in files
    )


def holds_shards(path) -> bool:
    """Whether ``path`` names output shards: a list or glob of folders, or a folder with a shard."""
    if not isinstance(path, (str, os.PathLike)):
        return True
    path = os.fspath(path)
    if glob.has_magic(path) and not os.path.exists(path):
        return True
    return os.path.isdir(path) and bool(shard_names(path))


class ShardFolder:
    """
    The complete shards of one or more output folders (see :func:`shard_folders`), read as
    one: ``folder[image_id]`` (a record), ``folder.index(id)`` (its index line),
    ``iter(folder)`` (every record, folder by folder and in each shard by shard in name
    order, read sequentially; only the ids are held, to check them), :meth:`failures`.
    Unfinished shards are not seen. An id in two shards raises :class:`DuplicateIdError`
    naming both, before any record is read.
    """

    def __init__(self, folders: Union[str, Sequence[str]]):
        self.folders = shard_folders(folders)
        # (folder, name) of each complete shard, in reading order
        self.shards: List[Tuple[str, str]] = [(f, n) for f in self.folders for n in shard_names(f)]
        self.names = [n for _, n in self.shards]
        self._by_id = None

    def tar(self, position: int) -> str:
        """The tar of the shard at ``position`` in :attr:`shards`."""
        return shard_paths(*self.shards[position])["tar"]

    def entries(self) -> Iterator[Tuple[int, Dict]]:
        """
        (position in :attr:`shards`, index line) of every member, in reading order.

        Raises:
            DuplicateIdError: at the second member of an id, naming both shards.
        """
        first: Dict[str, int] = {}
        for position, (folder, name) in enumerate(self.shards):
            for entry in read_lines(shard_paths(folder, name)["index"]):
                if entry["id"] in first:
                    seen = first[entry["id"]]
                    where = (f"twice in {self.tar(seen)}" if seen == position
                             else f"in two shards: {self.tar(seen)} and {self.tar(position)}")
                    raise DuplicateIdError(f"image id {entry['id']!r} is {where}")
                first[entry["id"]] = position
                yield position, entry

    def check(self) -> int:
        """The number of records, their ids checked (see :meth:`entries`)."""
        return sum(1 for _ in self.entries())

    def _lookup(self):
        if self._by_id is None:
            self._by_id = {entry["id"]: (position, entry) for position, entry in self.entries()}
        return self._by_id

    def __len__(self):
        return len(self._lookup())

    def __contains__(self, image_id):
        return image_id in self._lookup()

    def index(self, image_id: str) -> Dict:
        return self._lookup()[image_id][1]

    def __getitem__(self, image_id: str) -> Dict:
        position, entry = self._lookup()[image_id]
        with open(self.tar(position), "rb") as f:
            f.seek(entry["offset"])
            return decode_npz(f.read(entry["size"]))

    def __iter__(self) -> Iterator[Dict]:
        self.check()
        for position in range(len(self.shards)):
            with tarfile.open(self.tar(position), mode="r|") as tar:
                for member in tar:
                    if member.name.endswith(".npz"):
                        yield decode_npz(tar.extractfile(member).read())

    def counts(self) -> Dict:
        """
        The complete shards' counts summed (see :func:`count_rows`), from each one's counts file
        (of a shard written without one, its index and failures), and ``"shards"``: their number.
        """
        total = count_rows([], [])
        for folder, name in self.shards:
            paths = shard_paths(folder, name)
            if os.path.isfile(paths["counts"]):
                with open(paths["counts"], encoding="utf-8") as f:
                    counts = json.load(f)
            else:
                counts = count_rows(read_lines(paths["index"]), read_lines(paths["failures"]))
            total = add_counts(total, counts)
        return dict(total, shards=len(self.shards))

    def failures(self) -> List[Dict]:
        """The failures of the complete shards."""
        return [row for shard in self.shards for row in read_lines(shard_paths(*shard)["failures"])]

    def lost(self) -> List[Dict]:
        """Why each input shard that could not be read has no output shard (retried by the next run)."""
        complete = set(self.shards)
        return [row for folder in self.folders
                for name in sorted(f[: -len(FAILURES_SUFFIX)] for f in os.listdir(folder) if f.endswith(FAILURES_SUFFIX))
                if (folder, name) not in complete
                for row in read_lines(shard_paths(folder, name)["failures"])]
