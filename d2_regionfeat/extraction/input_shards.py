"""
Tar shards as the input of a run (``--input 'shards/{00000..00099}.tar'``, or a listed input cut
into shards by ``--shard-size N``): naming, expanding and sharing out the input shards, reading a
tar stream into samples, and :class:`ShardDataset`, which decodes them in DataLoader workers for
the run's loop (:mod:`.pipeline`); each becomes one output shard (:mod:`.sinks`,
:mod:`d2_regionfeat.formats.feature_shards`).

Input shards are read with the standard library's ``tarfile`` in stream mode, from a local
path or glob, any fsspec URL (``s3://``, ``gs://``, ``https://``, where the fsspec filesystem is
installed), or webdataset's ``pipe:CMD`` form (the command's stdout). Members are grouped
into samples as webdataset groups them: ``dir/000420001.jpg``, ``dir/000420001.json`` and
``dir/000420001.txt`` are the sample of key ``dir/000420001``. An image that does not decode,
and a tar that ends or breaks inside a member, are failures of the shard (shard and member);
the samples before are extracted and the shard completes. A shard that cannot be opened at all
is lost: it gets no output shard, so that the next run tries it again.

Workers (``--shard-index I --num-shards N``, else ``SLURM_ARRAY_TASK_ID`` /
``SLURM_ARRAY_TASK_COUNT``, else torchrun's ``RANK`` / ``WORLD_SIZE``) each take every N-th
input shard from the I-th, share nothing but the output folder, and skip the shards that are
complete there: a dead worker's shards are simply run again.
"""
import dataclasses
import glob
import io
import json
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..formats.feature_shards import CARRIED
from .inputs import IMAGE_EXTENSIONS, ImageDataset, ImageItem, InputError, Inputs, one_line

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")
# The output folder's record of what makes its shards: every worker checks it before writing.
SHARDS_MANIFEST = "shards.json"
_GLOB = re.compile(r"[*?\[]")
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def expand_braces(pattern: str) -> List[str]:
    """
    ``"s/{00000..00002}.tar"`` -> ``["s/00000.tar", "s/00001.tar", "s/00002.tar"]`` (zero padding
    kept), ``"{a,b}.tar"`` -> ``["a.tar", "b.tar"]``; several braces multiply, in order.
    """
    matches = [m for m in (_RANGE.search(pattern), _CHOICE.search(pattern)) if m]
    if not matches:
        return [pattern]
    match = min(matches, key=lambda m: m.start())
    if match.re is _RANGE:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") else 0
        if int(last) < int(first):
            raise InputError(f"--input {pattern!r}: range {match.group(0)} is empty")
        choices = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        choices = match.group(1).split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [out for choice in choices for out in expand_braces(head + choice + tail)]


def is_shard_source(source: str) -> bool:
    """Whether ``--input`` names tar shards (``.tar``, a brace pattern of them, or ``pipe:``)."""
    return source.startswith("pipe:") or expand_braces(source)[0].endswith(TAR_EXTENSIONS)


TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")


def shard_name(url: str) -> str:
    """The output shard's name of an input shard: its file name less extension (``00042``)."""
    base = url.rstrip("|").split()[-1] if url.startswith("pipe:") else url
    base = os.path.basename(base.split("?")[0])
    for ext in TAR_EXTENSIONS:
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def select_shards(shards: List, shard_index: Optional[int] = None, num_shards: Optional[int] = None,
                  environ=os.environ) -> Tuple[List, int, int]:
    """
    This worker's shards: every ``num_shards``-th from ``shard_index``. Unset values come from
    ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT`` (less ``SLURM_ARRAY_TASK_MIN``), else
    ``RANK``/``WORLD_SIZE``, else 0 of 1.

    Returns:
        (shards, shard_index, num_shards)
    """
    if shard_index is None and num_shards is None:
        if "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
            shard_index = int(environ["SLURM_ARRAY_TASK_ID"]) - int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
            num_shards = int(environ["SLURM_ARRAY_TASK_COUNT"])
        elif "RANK" in environ and "WORLD_SIZE" in environ:
            shard_index, num_shards = int(environ["RANK"]), int(environ["WORLD_SIZE"])
    shard_index = 0 if shard_index is None else shard_index
    num_shards = 1 if num_shards is None else num_shards
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise InputError(f"--shard-index {shard_index} is not in 0 .. --num-shards {num_shards} - 1")
    return shards[shard_index::num_shards], shard_index, num_shards


class ShardLostError(OSError):
    """An input shard that cannot be opened (missing, unreadable, a failing ``pipe:`` command)."""


def _open(url):
    if url.startswith("pipe:"):
        process = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)
        return process.stdout
    import fsspec

    return fsspec.open(url, "rb").open()


def open_tar(url: str) -> tarfile.TarFile:
    """
    The tar stream of shard ``url``, its first header read.

    Raises:
        ShardLostError: it cannot be opened, or holds no tar (one line).
    """
    try:
        stream = _open(url)
    except Exception as e:  # any fsspec filesystem fails its own way
        raise ShardLostError(f"cannot open {url}: {one_line(e)}")
    try:
        return tarfile.open(fileobj=stream, mode="r|*")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        stream.close()
        raise ShardLostError(f"cannot read {url} as a tar: {one_line(e)}")


def _split(name):
    """``"d/000420001.jpg"`` -> ``("d/000420001", "jpg")`` (webdataset's grouping)."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def iter_samples(tar: tarfile.TarFile) -> Iterator[Dict]:
    """
    The samples of an open tar stream (:func:`open_tar`): dicts of ``"__key__"`` and each
    member's extension -> bytes. A tar that breaks ends the stream with ``{"__key__",
    "__member__", "__error__"}``.
    """
    sample, member = None, None
    try:
        with tar:
            for info in tar:
                member = info.name
                if not info.isfile():
                    continue
                key, ext = _split(info.name)
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                sample = sample or {"__key__": key}
                sample[ext] = data
                member = None
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        key = _split(member)[0] if member else None
        if sample is not None and sample["__key__"] != key:
            yield sample  # complete: the break is in the next sample's member
        yield {"__key__": key, "__member__": member or "(a tar header)", "__error__": f"broken tar: {one_line(e)}"}
        return
    if sample is not None:
        yield sample


def _sample_id(sample, id_field):
    if not id_field:
        return sample["__key__"]
    try:
        return str(json.loads(sample["json"])[id_field])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"no --id-field {id_field!r} in the sample's json ({one_line(e)})")


def _image_member(sample):
    for ext in _IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


class _Member(io.BytesIO):
    """A tar member's bytes as a file, named by the member in decoding errors."""

    def __init__(self, data, name):
        super().__init__(data)
        self.name = name

    def __repr__(self):
        return repr(self.name)


@dataclass(frozen=True)
class ShardItem(ImageItem):
    """
    An image of an input shard: ``path`` is its member; ``key`` names its output member;
    ``carried``: the sample's members that its output shard carries (extension -> bytes).
    """

    shard: str = ""
    key: str = ""
    carried: Dict[str, bytes] = field(default_factory=dict)
    data: Optional[bytes] = None


@dataclass(frozen=True)
class InputShard:
    """
    One input shard: a tar (``url``), or the listed images at positions ``start`` to ``stop``
    (less one) of ``inputs``, read from it when the shard is (:meth:`.inputs.Inputs.between`).
    """

    name: str
    url: Optional[str] = None
    inputs: Optional[Inputs] = field(default=None, compare=False, repr=False)
    start: int = 0
    stop: int = 0


def tar_items(shard: InputShard, id_field: Optional[str] = None) -> Iterator[ShardItem]:
    """
    The images of a tar shard; those that cannot be extracted carry an ``error``.

    Raises:
        ShardLostError: the shard cannot be opened.
    """
    for sample in iter_samples(open_tar(shard.url)):
        key = sample["__key__"]
        if "__error__" in sample:
            yield ShardItem(key, sample["__member__"], sample["__error__"], shard.name, key)
            continue
        ext = _image_member(sample)
        try:
            image_id = _sample_id(sample, id_field)
        except ValueError as e:
            yield ShardItem(None, f"{key}.json", str(e), shard.name, key)
            continue
        if ext is None:
            yield ShardItem(image_id, key, "sample has no image member", shard.name, key)
            continue
        yield ShardItem(image_id, f"{key}.{ext}", None, shard.name, key, {e: sample[e] for e in CARRIED if e in sample}, sample[ext])


def shard_items(shard: InputShard, id_field: Optional[str] = None) -> Iterator[ShardItem]:
    """
    The images of an input shard (see :func:`tar_items`), listed ones keyed by their id: read
    on from where the last listed shard of its source ended when it starts there or later.
    """
    if shard.url is not None:
        return tar_items(shard, id_field)
    return (ShardItem(i.image_id, i.path, i.error, shard.name, i.image_id)
            for i in shard.inputs.between(shard.start, shard.stop))


def _expand(source: str) -> List[str]:
    """The tar URLs of ``source``: its braces expanded, and local globs matched (sorted)."""
    urls = []
    for url in expand_braces(source):
        if "://" in url or url.startswith("pipe:") or not _GLOB.search(url):
            urls.append(url)
            continue
        matched = sorted(glob.glob(url))
        if not matched:
            raise InputError(f"--input {source!r}: no file matches {url}")
        urls += matched
    return urls


def plan_shards(source: str, shard_size: int = 0, image_root=None, id_mode=None,
                limit: int = 0) -> Tuple[List[InputShard], Optional[str]]:
    """
    The input shards of ``source``: one per tar of a shard source; else the listed images (the
    first ``limit``, see :class:`.inputs.Inputs`: checked here, read again by each shard) in
    shards of ``shard_size`` named ``00000``, ``00001``, ...

    Returns:
        (shards, the sha256 of a listed source's listing (:meth:`.inputs.Inputs.check`), or None)
    """
    if is_shard_source(source):
        urls = [source] if source.startswith("pipe:") else _expand(source)
        names = [shard_name(u) for u in urls]
        if len(set(names)) != len(names):
            raise InputError(f"--input {source!r}: two shards have the same file name")
        return [InputShard(name, url) for name, url in zip(names, urls)], None
    if shard_size < 1:
        raise InputError("--shard-size N must be >= 1 for an input that is not tar shards")
    inputs = Inputs(source, image_root, limit, id_mode)
    count, inputs_sha256 = inputs.check()
    shards = [InputShard(f"{n // shard_size:05d}", inputs=inputs, start=n, stop=min(n + shard_size, count))
              for n in range(0, count, shard_size)]
    return shards, inputs_sha256


class ShardDataset(torch.utils.data.IterableDataset):
    """
    The batches of input shards for the run's loop, each DataLoader worker reading whole
    shards (every ``num_workers``-th): lists of :class:`ImageDataset` entries of one shard (its
    item a :class:`ShardItem`), the last of a shard ending with ``{"end": shard name, "member":
    its URL, "lost": None, or why it could not be opened}``. A tar shard gives at most its first ``limit``
    samples (0: all); an id that an earlier sample of the shard has is an error.
    """

    def __init__(self, shards: List[InputShard], images: ImageDataset, batch_size: int,
                 id_field: Optional[str] = None, limit: int = 0):
        self.shards, self.images, self.batch_size = shards, images, batch_size
        self.id_field, self.limit = id_field, limit

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        mine = self.shards[worker.id::worker.num_workers] if worker else self.shards
        for shard in mine:
            yield from self._batches(shard)

    def _batches(self, shard):
        batch, seen, lost = [], set(), None
        try:
            for n, item in enumerate(shard_items(shard, self.id_field)):
                if self.limit and shard.url is not None and n == self.limit:
                    break
                if item.image_id in seen and not item.error:
                    item = ShardItem(item.image_id, item.path, "an earlier sample of this shard has this id",
                                     item.shard, item.key)
                seen.add(item.image_id)
                image = None if item.data is None else _Member(item.data, item.path)
                entry = self.images.decode(item, image)
                entry["item"] = dataclasses.replace(item, data=None)  # its bytes stay in the worker
                batch.append(entry)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
        except ShardLostError as e:
            batch, lost = [], str(e)
        yield batch + [{"end": shard.name, "member": shard.url or shard.name, "lost": lost}]
