"""
Crash-safe writers of per-image feature records, one class per output format, registered by
name in :data:`WRITERS`.

Every rank of a run writes its own *part* under ``<output>/parts/`` (npz files excepted: one
file per image, straight into ``<output>/npz/``); when all ranks are done, rank 0 calls
:meth:`FeatureWriter.merge`, which builds the final file from the parts in rank order (the
order of a 1-process run) and replaces it atomically. Parts are removed only once the run is
marked complete, so a merge cut short is simply done again.

Each record is stored atomically, so a process killed at any point (SIGKILL included) leaves
every part readable, holding whole records only; :meth:`FeatureWriter.written` recovers a
part (cutting off a half-written tail) and tells which images it holds, so that ``--resume``
writes each missing image once. Writes go to the OS without fsync (enough for a killed
process; :meth:`FeatureWriter.close` syncs, for a crashed machine).
"""
import json
import os
import shutil
import struct
import zlib
from typing import Callable, Dict, Iterable, List, Set

import numpy as np

from .io import NPZ_KEYS, OUTPUT_NAMES, decode_npz, encode_npz, encode_tsv_line

WRITERS: Dict[str, type] = {}


def register_writer(name: str):
    """Class decorator: register a :class:`FeatureWriter` under format ``name``."""

    def register(cls):
        cls.name = name
        WRITERS[name] = cls
        return cls

    return register


def part_path(output_dir: str, stem: str, rank: int, world_size: int) -> str:
    """``<output>/parts/<stem>.<rank>-of-<world_size>``."""
    return os.path.join(output_dir, "parts", f"{stem}.{rank}-of-{world_size}")


def _new_part(output_dir: str, stem: str, rank: int, world_size: int) -> str:
    """:func:`part_path`, its folder made."""
    path = part_path(output_dir, stem, rank, world_size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_with_copy(sources: List[str], target: str):
    """Make ``target`` the concatenation of ``sources``, atomically, leaving them in place."""
    tmp = target + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    if len(sources) == 1:
        try:
            os.link(sources[0], tmp)
        except OSError:
            shutil.copyfile(sources[0], tmp)
    else:
        with open(tmp, "wb") as out:
            for source in sources:
                with open(source, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
    _fsync(tmp)
    os.replace(tmp, target)


class LineLog:
    """
    An append-only UTF-8 text file, one record a line. Recovery cuts off a last line left
    without its newline; a line is written with its newline in one go, so every whole line
    is a whole record.
    """

    def __init__(self, path: str, line_id: Callable[[str], str]):
        """
        Args:
            line_id: the image id of a line (str).
        """
        self.path = path
        self.ids = self._recover(line_id)
        self.file = open(path, "ab")

    def _recover(self, line_id) -> Set[str]:
        if not os.path.exists(self.path):
            return set()
        ids, end = set(), 0
        with open(self.path, "rb") as f:
            for line in f:  # streamed: a TSV part may be far larger than memory
                if not line.endswith(b"\n"):
                    break
                ids.add(line_id(line.decode("utf-8")))
                end += len(line)
        if end < os.path.getsize(self.path):
            with open(self.path, "r+b") as f:
                f.truncate(end)
        return ids

    def append(self, lines: Iterable[bytes]):
        """Append whole lines (each ending in a newline) and hand them to the OS."""
        self.file.write(b"".join(lines))
        self.file.flush()

    def close(self):
        self.file.close()
        _fsync(self.path)


class FeatureWriter:
    """
    The interface of a format's writer. One instance per rank::

        writer = WRITERS[name](output_dir, rank, world_size)
        todo = [r for r in records if r["image_id"] not in writer.written()]
        writer.write(todo)        # any number of times
        writer.close()
        # on rank 0, after every rank closed:
        WRITERS[name].merge(output_dir, world_size)

    Records are the dicts of :mod:`d2_regionfeat.io`.
    """

    name = ""
    # Bumped whenever what a format's files hold changes.
    version = 1

    def __init__(self, output_dir: str, rank: int, world_size: int):
        self.output_dir = output_dir
        self.rank = rank
        self.world_size = world_size

    def written(self) -> Set[str]:
        """Ids of the images this rank's part already holds."""
        raise NotImplementedError

    def write(self, records: List[Dict]):
        """Store ``records`` (new images), each atomically."""
        raise NotImplementedError

    def close(self):
        raise NotImplementedError

    @classmethod
    def parts(cls, output_dir: str, world_size: int) -> List[str]:
        """The parts of every rank, in rank order."""
        return [part_path(output_dir, cls.name, r, world_size) for r in range(world_size)]

    @classmethod
    def merge(cls, output_dir: str, world_size: int):
        """Build the final output from the parts of all ranks (rank 0 only)."""
        raise NotImplementedError


@register_writer("npz")
class NpzWriter(FeatureWriter):
    """
    ``<output>/npz/<image_id>.npz``, one file per image (keys in :data:`io.NPZ_KEYS`),
    written to a temporary name and renamed. Nothing to merge.
    """

    def __init__(self, output_dir, rank, world_size):
        super().__init__(output_dir, rank, world_size)
        self.folder = os.path.join(output_dir, OUTPUT_NAMES["npz"])
        self.tmp_suffix = f".{rank}.tmp"
        os.makedirs(self.folder, exist_ok=True)

    def written(self):
        ids = set()
        for dirpath, _, filenames in os.walk(self.folder):
            for name in filenames:
                path = os.path.join(dirpath, name)
                if name.endswith(self.tmp_suffix):
                    os.remove(path)  # a write this rank did not finish
                elif name.endswith(".npz"):
                    rel = os.path.relpath(path, self.folder)[: -len(".npz")]
                    ids.add(rel.replace(os.sep, "/"))
        return ids

    def write(self, records):
        for record in records:
            path = os.path.join(self.folder, record["image_id"] + ".npz")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + self.tmp_suffix, "wb") as f:
                f.write(encode_npz(record))
            os.replace(path + self.tmp_suffix, path)

    def close(self):
        pass

    @classmethod
    def merge(cls, output_dir, world_size):
        pass


@register_writer("tsv")
class TsvWriter(FeatureWriter):
    """
    The bottom-up-attention TSV (:func:`io.encode_tsv_line`): each rank appends lines to
    its part; the merge concatenates the parts into ``<output>/features.tsv``.
    """

    def __init__(self, output_dir, rank, world_size):
        super().__init__(output_dir, rank, world_size)
        path = _new_part(output_dir, self.name, rank, world_size)
        self.log = LineLog(path, lambda line: line.split("\t", 1)[0])

    def written(self):
        return self.log.ids

    def write(self, records):
        self.log.append(encode_tsv_line(r) for r in records)

    def close(self):
        self.log.close()

    @classmethod
    def merge(cls, output_dir, world_size):
        target = os.path.join(output_dir, OUTPUT_NAMES["tsv"])
        _replace_with_copy(cls.parts(output_dir, world_size), target)


class FailureLog(LineLog):
    """
    The images a rank could not extract, as JSON lines ``{"image_id", "path", "reason"}``;
    merged into ``<output>/failures.jsonl``.
    """

    stem = "failures"

    def __init__(self, output_dir: str, rank: int, world_size: int):
        path = _new_part(output_dir, self.stem, rank, world_size)
        super().__init__(path, lambda line: json.loads(line)["image_id"])

    def add(self, failures: List[Dict]):
        self.append((json.dumps(f, ensure_ascii=False) + "\n").encode("utf-8") for f in failures)

    @classmethod
    def merge(cls, output_dir: str, world_size: int):
        parts = [part_path(output_dir, cls.stem, r, world_size) for r in range(world_size)]
        _replace_with_copy(parts, os.path.join(output_dir, "failures.jsonl"))


@register_writer("lmdb")
class LmdbWriter(FeatureWriter):
    """
    An LMDB environment (key: image id in UTF-8, value: the npz bytes of
    :func:`io.encode_npz`), one transaction per batch. Each rank writes its own
    environment; the merge copies them into ``<output>/features.lmdb``.
    """

    map_size = 1 << 40  # address space only: the file grows with what is written

    def __init__(self, output_dir, rank, world_size):
        super().__init__(output_dir, rank, world_size)
        self.env = self._open(_new_part(output_dir, self.name, rank, world_size))

    @classmethod
    def _open(cls, path):
        import lmdb

        return lmdb.open(path, map_size=cls.map_size, sync=False, readahead=False)

    def written(self):
        with self.env.begin() as txn:
            return {bytes(k).decode("utf-8") for k in txn.cursor().iternext(values=False)}

    def write(self, records):
        with self.env.begin(write=True) as txn:
            for record in records:
                txn.put(record["image_id"].encode("utf-8"), encode_npz(record))

    def close(self):
        self.env.sync(True)
        self.env.close()

    @classmethod
    def merge(cls, output_dir, world_size):
        target = os.path.join(output_dir, OUTPUT_NAMES["lmdb"])
        tmp = target + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        parts = cls.parts(output_dir, world_size)
        if len(parts) == 1:
            _replace_with_copy([os.path.join(parts[0], "data.mdb")], os.path.join(tmp, "data.mdb"))
        else:
            env = cls._open(tmp)
            for part in parts:
                source = cls._open(part)
                with source.begin() as src, env.begin(write=True) as dst:
                    for key, value in src.cursor():
                        dst.put(key, value)
                source.close()
            env.sync(True)
            env.close()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)


def _journal_frames(path: str, recover: bool = False):
    """(image_id, payload) of each whole frame of a journal; with ``recover``, cut off the rest."""
    if not os.path.exists(path):
        return
    header_size = RecordJournal.header.size
    good = 0
    with open(path, "rb") as f:
        while True:
            header = f.read(header_size)
            if len(header) < header_size:
                break
            crc, id_len, size = RecordJournal.header.unpack(header)
            body = f.read(id_len + size)
            if len(body) < id_len + size or zlib.crc32(body) != crc:
                break
            good = f.tell()
            yield body[:id_len].decode("utf-8"), body[id_len:]
    if recover and good < os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good)


class RecordJournal:
    """
    An append-only file of framed records: ``<crc32 u32><id length u32><payload length
    u64><image id UTF-8><payload>``, the crc over id and payload. Recovery cuts the file
    after the last whole frame whose crc matches.
    """

    header = struct.Struct("<IIQ")

    def __init__(self, path: str):
        self.path = path
        self.ids = {image_id for image_id, _ in _journal_frames(path, recover=True)}
        self.file = open(path, "ab")

    def append(self, frames: Iterable):
        """Append ``(image_id, payload bytes)`` frames and hand them to the OS."""
        for image_id, payload in frames:
            key = image_id.encode("utf-8")
            body = key + payload
            self.file.write(self.header.pack(zlib.crc32(body), len(key), len(payload)) + body)
        self.file.flush()

    def close(self):
        self.file.close()
        _fsync(self.path)

    @staticmethod
    def records(path: str):
        """The records in a journal, decoded, in order."""
        for _, payload in _journal_frames(path):
            yield decode_npz(payload)


@register_writer("hdf5")
class Hdf5Writer(FeatureWriter):
    """
    One HDF5 file, ``<output>/features.h5``, with flat arrays and an offsets index (layout
    in :func:`io.read_hdf5`). HDF5 files do not survive a killed writer, so each rank
    journals its records (:class:`RecordJournal`) and the merge builds the file from the
    journals into a temporary file, then renames it.
    """

    def __init__(self, output_dir, rank, world_size):
        super().__init__(output_dir, rank, world_size)
        self.journal = RecordJournal(_new_part(output_dir, self.name, rank, world_size))

    def written(self):
        return self.journal.ids

    def write(self, records):
        self.journal.append((r["image_id"], encode_npz(r)) for r in records)

    def close(self):
        self.journal.close()

    # Regions are appended to the HDF5 columns in slabs of about this many bytes.
    slab_bytes = 64 << 20

    @classmethod
    def merge(cls, output_dir, world_size):
        import h5py

        target = os.path.join(output_dir, OUTPUT_NAMES["hdf5"])
        tmp = target + ".tmp"
        per_image = {key: [] for key in NPZ_KEYS[:4]}
        slab, slab_bytes = [], 0
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = cls.version
            for part in cls.parts(output_dir, world_size):
                for record in RecordJournal.records(part):
                    for key, values in per_image.items():
                        values.append(record[key])
                    slab.append(record)
                    slab_bytes += record["x"].nbytes
                    if slab_bytes >= cls.slab_bytes:
                        cls._append(f, slab)
                        slab, slab_bytes = [], 0
            cls._append(f, slab)
            f.create_dataset("image_id", data=per_image.pop("image_id"), dtype=h5py.string_dtype())
            for key, values in per_image.items():
                f.create_dataset(key, data=np.array(values, dtype=np.int64))
            offsets = np.cumsum([0] + per_image["num_bbox"], dtype=np.int64)
            f.create_dataset("offsets", data=offsets)
        _fsync(tmp)
        os.replace(tmp, target)

    @staticmethod
    def _append(f, records):
        """Append the regions of ``records`` to the per-region columns of ``f``."""
        for key in NPZ_KEYS[4:]:
            if not records or key not in records[0]:
                continue
            rows = np.concatenate([r[key] for r in records])
            if key not in f:
                row_bytes = max(1, rows[0].nbytes if len(rows) else 1)
                f.create_dataset(
                    key, shape=(0,) + rows.shape[1:], maxshape=(None,) + rows.shape[1:],
                    dtype=rows.dtype, chunks=(max(1, (1 << 20) // row_bytes),) + rows.shape[1:],
                )
            column = f[key]
            begin = column.shape[0]
            column.resize(begin + len(rows), axis=0)
            column[begin:] = rows
