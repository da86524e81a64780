"""
``manifest.json``: what made an output folder (config, weights checksum, package versions,
formats), whether the run finished, and its counts. It is written before any feature, so a
folder is always tied to one run: resuming it with other settings is refused.
"""
import hashlib
import importlib
import json
import os
import platform
from importlib import metadata
from typing import Iterable

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Manifest keys that must match for --resume to continue a folder, with their names in errors.
IDENTITY_KEYS = {
    "config_sha256": "config",
    "config_text": "config file",
    "config_overrides": "config overrides",
    "weights_sha256": "weights",
    "formats": "--format",
    "fp16": "--fp16",
    "amp": "--amp",
    "world_size": "number of processes",
    "inputs_sha256": "inputs (--input, --limit)",
    "id": "--id",
    "id_field": "--id-field",
    "shard_size": "--shard-size",
    "limit": "--limit",
}
# module -> distribution (detectron2 may come as another distribution, e.g. pb1-detectron2)
_PACKAGES = {
    "torch": "torch", "torchvision": "torchvision", "detectron2": "detectron2",
    "d2_regionfeat": "d2_regionfeat", "numpy": "numpy", "PIL": "Pillow", "h5py": "h5py",
    "lmdb": "lmdb",
}


class OutputFolderError(RuntimeError):
    """An output folder that this run must not write to."""


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_lines(lines: Iterable[str]) -> str:
    """``sha256_text("\\n".join(lines))``, hashed line by line (the text is never built whole)."""
    digest = hashlib.sha256()
    for n, line in enumerate(lines):
        digest.update((("\n" if n else "") + line).encode("utf-8"))
    return digest.hexdigest()


def package_versions():
    """Versions of Python and of the packages the features depend on."""
    versions = {"python": platform.python_version()}
    for module, distribution in _PACKAGES.items():
        try:
            versions[distribution] = importlib.import_module(module).__version__
        except (ImportError, AttributeError):
            try:
                versions[distribution] = metadata.version(distribution)
            except metadata.PackageNotFoundError:
                versions[distribution] = None
    return versions


def read_manifest(output_dir: str, name: str = MANIFEST_NAME):
    """The folder's manifest (``name``: its file), or None."""
    path = os.path.join(output_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, manifest: dict):
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")


def write_manifest(output_dir: str, manifest: dict):
    """Write the manifest atomically."""
    path = os.path.join(output_dir, MANIFEST_NAME)
    _write_json(path + ".tmp", manifest)
    os.replace(path + ".tmp", path)


def claim_output_folder(output_dir: str, manifest: dict, resume: bool, shared: bool = False,
                        name: str = MANIFEST_NAME) -> dict:
    """
    Make ``output_dir`` this run's: a new or empty folder gets ``manifest`` (as ``name``,
    atomically: of racing processes one writes it); with ``resume``, a folder made by a run
    with the same :data:`IDENTITY_KEYS` is continued. A ``shared`` folder (independent
    workers writing output shards) may hold other files and is always continued.

    Returns:
        the manifest now in the folder.

    Raises:
        OutputFolderError: the folder holds other files, another run's output, or (without
            ``resume``) output of this one. Nothing in it is changed then.
    """
    path = os.path.join(output_dir, name)
    if not os.path.isfile(path):
        if not shared and os.path.isdir(output_dir) and os.listdir(output_dir):
            raise OutputFolderError(
                f"output folder {output_dir} is not empty and holds no {name}; "
                "choose a new or empty folder"
            )
        os.makedirs(output_dir, exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        _write_json(temporary, manifest)
        try:
            os.link(temporary, path)  # fails if it exists: no process overwrites another's
            return manifest
        except FileExistsError:
            pass
        finally:
            os.remove(temporary)
    elif not (resume or shared):
        raise OutputFolderError(
            f"output folder {output_dir} already holds features; pass --resume to continue "
            "that run, or choose another folder"
        )
    with open(path) as f:
        existing = json.load(f)
    differs = [label for key, label in IDENTITY_KEYS.items() if existing.get(key) != manifest.get(key)]
    if differs:
        raise OutputFolderError(
            f"output folder {output_dir} was written by another run (its {', '.join(differs)} "
            "differ from this one's); use the same settings to resume, or another folder"
        )
    return existing
