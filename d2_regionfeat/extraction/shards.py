"""
Extraction at web scale: webdataset shards in (``--input 'shards/{00000..00099}.tar'``), one
output shard per input shard out (:mod:`d2_regionfeat.formats.shard`), independent workers.

Input shards are read with the standard library's ``tarfile`` in stream mode, from a local
path, any fsspec URL (``s3://``, ``gs://``, ``https://``, where the fsspec filesystem is
installed), or webdataset's ``pipe:CMD`` form (the command's stdout). Members are grouped
into samples as webdataset groups them: ``dir/000420001.jpg``, ``dir/000420001.json`` and
``dir/000420001.txt`` are the sample of key ``dir/000420001``. An image that does not decode,
and a tar that ends or breaks inside a member, are recorded in the shard's failures (shard and
member); the samples before are extracted, and the run goes on with the next shard.

Workers (``--shard-index I --num-shards N``, else ``SLURM_ARRAY_TASK_ID`` /
``SLURM_ARRAY_TASK_COUNT``, else torchrun's ``RANK`` / ``WORLD_SIZE``) each take every N-th
input shard from the I-th, share nothing but the output folder, and skip the shards that are
complete there: a dead worker's shards are simply run again.
"""
import copy
import io
import json
import os
import re
import subprocess
import tarfile
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..formats.shard import ShardWriter, is_complete
from .manifest import OutputFolderError, package_versions, sha256_file
from .inputs import IMAGE_EXTENSIONS, ImageDataset, ImageItem, InputError, list_inputs, one_line
from .model_call import BatchExtractor
from .model_config import ModelConfig, as_model_config

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")
# The output folder's record of what makes its shards: every worker checks it before writing.
SHARDS_MANIFEST = "shards.json"
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


def _open(url):
    if url.startswith("pipe:"):
        process = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)
        return process.stdout
    import fsspec

    return fsspec.open(url, "rb").open()


def _split(name):
    """``"d/000420001.jpg"`` -> ``("d/000420001", "jpg")`` (webdataset's grouping)."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def iter_samples(url: str) -> Iterator[Dict]:
    """
    The samples of a tar shard, streamed: dicts of ``"__key__"`` and each member's extension
    -> bytes. A tar that breaks ends the stream with ``{"__key__", "__member__", "__error__"}``.
    """
    sample, member = None, None
    try:
        with _open(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
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


def is_out_of_memory(error: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(error, oom) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


def cpu_copy(extractor):
    """A copy of a :class:`BatchExtractor` whose model runs on the CPU (float32)."""
    cpu = copy.copy(extractor)
    cpu.model = copy.deepcopy(extractor.model).to("cpu")
    cpu.autocast = torch.autocast("cpu", enabled=False)
    return cpu


class OutOfMemoryFallback:
    """
    Runs an extractor over a batch; on a CUDA out-of-memory error frees the cache and runs each
    image alone, and an image that still runs out on CPU (``make_cpu(extractor)``, made once).
    ``log(image_id, reason)`` gets each retry and final failure; a failed image gives ``None``.
    """

    def __init__(self, extractor, make_cpu=cpu_copy):
        self.extractor, self.make_cpu, self._cpu = extractor, make_cpu, None

    def __call__(self, inputs: List[Dict], log) -> List[Optional[Dict]]:
        try:
            return self.extractor(inputs)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            if len(inputs) > 1:
                for x in inputs:
                    log(x["item"].image_id, f"retry alone: {one_line(e)}")
        self._free()
        return [self._alone(x, log) for x in inputs]

    def _free(self):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _alone(self, x, log):
        """``x``'s record, alone on the extractor's device, then on CPU; None if both run out."""
        for where, on_failure in ((self.extractor, "retry on CPU"), (None, "failed: out of memory on CPU too")):
            if where is None:
                where = self._cpu = self._cpu or self.make_cpu(self.extractor)
            try:
                return where([x])[0]
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                log(x["item"].image_id, f"{on_failure}: {one_line(e)}")
            self._free()
        return None


def _sample_id(sample, id_field):
    if not id_field:
        return sample["__key__"]
    try:
        return str(json.loads(sample["json"])[id_field])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"no --id-field {id_field!r} in the sample's json ({one_line(e)})")


def _carried(sample):
    carried = {}
    if "json" in sample:
        try:
            carried["json"] = json.loads(sample["json"])
        except ValueError:
            carried["json"] = sample["json"].decode("utf-8", "replace")
    if "txt" in sample:
        carried["txt"] = sample["txt"].decode("utf-8", "replace")
    return carried


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


def tar_units(url: str, id_field: Optional[str] = None) -> Iterator[Dict]:
    """
    The inputs of a tar shard as units ``{"id", "member", "key", "image" (a binary file),
    "carried"}``, or ``{"id", "member", "error"}`` for those that cannot be extracted.
    """
    for sample in iter_samples(url):
        key = sample["__key__"]
        if "__error__" in sample:
            yield {"id": key, "member": sample["__member__"], "error": sample["__error__"]}
            continue
        ext = _image_member(sample)
        try:
            image_id = _sample_id(sample, id_field)
        except ValueError as e:
            yield {"id": None, "member": f"{key}.json", "error": str(e)}
            continue
        if ext is None:
            yield {"id": image_id, "member": key, "error": "sample has no image member"}
            continue
        yield {
            "id": image_id, "member": f"{key}.{ext}", "key": key,
            "image": _Member(sample[ext], f"{key}.{ext}"), "carried": _carried(sample),
        }


def list_units(items: List[ImageItem]) -> Iterator[Dict]:
    """Units (see :func:`tar_units`) of listed image files."""
    for item in items:
        if item.error:
            yield {"id": item.image_id, "member": item.path, "error": item.error}
        else:
            yield {"id": item.image_id, "member": item.path, "key": item.image_id, "image": item.path,
                   "carried": {}}


def plan_shards(source: str, shard_size: int = 0, image_root=None, id_mode=None,
                id_field=None) -> List[Tuple[str, object]]:
    """
    The input shards of ``source`` as ``(output name, units factory)``: one per tar of a shard
    source; else the listed images in shards of ``shard_size`` named ``00000``, ``00001``, ...
    """
    if is_shard_source(source):
        urls = [source] if source.startswith("pipe:") else expand_braces(source)
        names = [shard_name(u) for u in urls]
        if len(set(names)) != len(names):
            raise InputError(f"--input {source!r}: two shards have the same file name")
        return [(name, (lambda u=url: tar_units(u, id_field))) for name, url in zip(names, urls)]
    if shard_size < 1:
        raise InputError("--shard-size N must be >= 1 for an input that is not tar shards")
    items = list_inputs(source, image_root, 0, id_mode)
    chunks = [items[i: i + shard_size] for i in range(0, len(items), shard_size)]
    return [(f"{n:05d}", (lambda c=chunk: list_units(c))) for n, chunk in enumerate(chunks)]


def _batches(units, size):
    batch = []
    for unit in units:
        batch.append(unit)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def extract_shard(name: str, units, output_dir: str, run, model_config: ModelConfig,
                  batch_size: int = 4) -> Dict:
    """
    Extract one input shard's ``units`` into output shard ``name`` (written atomically).

    Args:
        run: an :class:`OutOfMemoryFallback` (over a :class:`BatchExtractor`).
        model_config: the model's config (its input format and test resize).

    Returns:
        counts ``{"done", "failed"}``.
    """
    writer = ShardWriter(output_dir, name)
    seen = set()
    try:
        for batch in _batches(units, batch_size):
            good = []
            for unit in batch:
                if "error" in unit:
                    writer.fail(unit["id"], unit["member"], unit["error"])
                elif unit["id"] in seen:
                    writer.fail(unit["id"], unit["member"], "an earlier sample of this shard has this id")
                else:
                    seen.add(unit["id"])
                    good.append(unit)
            dataset = ImageDataset(
                [ImageItem(u["id"], u["image"]) for u in good],
                model_config.input_format, model_config.min_size_test, model_config.max_size_test,
            )
            decoded = [dataset[i] for i in range(len(good))]
            ready = [(u, x) for u, x in zip(good, decoded) if "error" not in x]
            for u, x in zip(good, decoded):
                if "error" in x:
                    writer.fail(u["id"], u["member"], x["error"])
            members = {u["id"]: u["member"] for u in good}
            records = run([x for _, x in ready], lambda i, reason: writer.fail(i, members[i], reason))
            for (unit, _), record in zip(ready, records):
                if record is not None:
                    writer.add(record, unit["key"], unit["carried"])
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return {"done": len(writer.index), "failed": len({f["member"] for f in writer.failures
                                                       if not f["reason"].startswith("retry")})}


def claim_shard_folder(output_dir: str, identity: Dict):
    """
    Write ``identity`` (what decides the shards' content) as the folder's ``shards.json`` if it
    has none (atomically, so one of racing workers does), else check it is the same.

    Raises:
        OutputFolderError: the folder's shards were made with other settings.
    """
    path = os.path.join(output_dir, SHARDS_MANIFEST)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(dict(identity, versions=package_versions()), f, indent=2, sort_keys=True)
    try:
        os.link(temporary, path)  # fails if it exists: no worker overwrites another's
    except FileExistsError:
        with open(path) as f:
            existing = json.load(f)
        changed = [key for key in identity if existing.get(key) != identity[key]]
        if changed:
            raise OutputFolderError(
                f"{output_dir} holds shards made with other {', '.join(changed)}: use another --output"
            )
    finally:
        os.remove(temporary)


def extract_shards(cfg, source: str, output_dir: str, shard_index=None, num_shards=None,
                   shard_size: int = 0, image_root=None, id_mode=None, id_field=None,
                   batch_size: int = 4, fp16=False, amp=False, extractor=None) -> Dict:
    """
    This worker's input shards of ``source`` (see :func:`select_shards`), each extracted to its
    output shard unless already complete in ``output_dir``.

    Args:
        cfg: the model's :class:`ModelConfig`, or a yacs ``CfgNode``.

    Returns:
        counts ``{"shards", "skipped", "done", "failed"}``.
    """
    shards, shard_index, num_shards = select_shards(
        plan_shards(source, shard_size, image_root, id_mode, id_field), shard_index, num_shards
    )
    os.makedirs(output_dir, exist_ok=True)
    model_config = as_model_config(cfg)
    claim_shard_folder(output_dir, {
        "config_sha256": model_config.sha256, "weights_sha256": sha256_file(model_config.local_weights()),
        "fp16": bool(fp16), "amp": bool(amp), "id_field": id_field, "id": id_mode, "shard_size": shard_size,
    })
    todo = [(name, units) for name, units in shards if not is_complete(output_dir, name)]
    counts = {"shards": len(shards), "skipped": len(shards) - len(todo), "done": 0, "failed": 0}
    if not todo:
        return counts
    if extractor is None:
        extractor = BatchExtractor(model_config, fp16, amp)
    run = OutOfMemoryFallback(extractor)
    for name, units in todo:
        shard_counts = extract_shard(name, units(), output_dir, run, model_config, batch_size)
        counts["done"] += shard_counts["done"]
        counts["failed"] += shard_counts["failed"]
    return counts
