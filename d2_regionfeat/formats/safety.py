"""
The crash-safety machinery the writers share: per-rank parts, append-only logs whose torn
tail is cut on recovery, atomic replacement of final files.

Every rank of a run writes its own *part* under ``<output>/parts/`` (per-image-file layouts
excepted: they write each image's files straight into their folder, atomically); when all
ranks are done, rank 0 merges the parts in rank order (the order of a 1-process run) into
the final files, each replaced atomically. Parts are removed only once the run is marked
complete, so a merge cut short is simply done again. Writes go to the OS without fsync
(enough for a killed process); closing a part syncs it (for a crashed machine).
"""
import os
import shutil
import struct
import zlib
from typing import Callable, Iterable, List, Set

from .records import decode_npz


def part_path(output_dir: str, stem: str, rank: int, world_size: int) -> str:
    """``<output>/parts/<stem>.<rank>-of-<world_size>``."""
    return os.path.join(output_dir, "parts", f"{stem}.{rank}-of-{world_size}")


def new_part(output_dir: str, stem: str, rank: int, world_size: int) -> str:
    """:func:`part_path`, its folder made."""
    path = part_path(output_dir, stem, rank, world_size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_with_copy(sources: List[str], target: str):
    """Make ``target`` the concatenation of ``sources``, atomically, leaving them in place."""
    tmp = target + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    if len(sources) == 1 and os.path.exists(target) and os.path.samefile(sources[0], target):
        # a merge redone after a crash: target is already a link to the part (and renaming
        # a link over another link to the same file would do nothing, leaving tmp behind)
        return
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
    fsync(tmp)
    os.replace(tmp, target)


def write_atomically(path: str, data: bytes, tmp_suffix: str = ".tmp"):
    """Write ``data`` to ``path`` through a temporary file renamed over it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + tmp_suffix, "wb") as f:
        f.write(data)
    os.replace(path + tmp_suffix, path)


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
        fsync(self.path)


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
        fsync(self.path)

    @staticmethod
    def records(path: str, keys=None):
        """The records in a journal, decoded (only ``keys``, if given), in order."""
        for _, payload in _journal_frames(path):
            yield decode_npz(payload, keys)
