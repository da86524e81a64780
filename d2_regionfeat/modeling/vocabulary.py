"""
Class and attribute names of a model: from its vocabulary files (or VinVL's labelmap), else
from detectron2's MetadataCatalog. :func:`vocabularies` is what a run, the explain tool and the demo ask, before
any model is built; :func:`register_vocabularies` puts the files' names into the catalog.
"""
import json
from dataclasses import dataclass
from typing import List, Optional

from detectron2.data import MetadataCatalog
from detectron2.utils.file_io import PathManager

from .config import region_features_node

# What to do when a model has names nowhere (the manifest and the README say it).
NO_NAMES_HINT = (
    "the model has no class names: set MODEL.REGION_FEATURES.CLASS_NAMES_FILE (one name per "
    "line), or register thing_classes for a dataset of DATASETS.TEST"
)


@dataclass(frozen=True)
class Vocabularies:
    """
    Attributes:
        class_names: one per class (K), or None when the model has none.
        attribute_names: one per attribute (A), or None.
    """

    class_names: Optional[List[str]] = None
    attribute_names: Optional[List[str]] = None

    def class_name(self, index: int) -> str:
        """The name of class ``index``; ``class_<index>`` for a model without names."""
        return self.class_names[index] if self.class_names else f"class_{int(index)}"


def read_vocabulary(path: str) -> List[str]:
    """
    Display names from a vocabulary file such as bottom-up-attention's objects_vocab.txt:
    one entry per non-empty line, the first comma-separated synonym of each, stripped.

    Raises:
        ValueError: when the file cannot be read or holds no names.
    """
    try:
        with PathManager.open(path, "r") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read vocabulary file {path!r}: {e.strerror or e}") from None
    names = [line.split(",")[0].strip() for line in lines if line.strip()]
    if not names:
        raise ValueError(f"vocabulary file {path!r} holds no names")
    return names


def read_labelmap(path):
    """
    Class and attribute names of a scene_graph_benchmark labelmap
    (``VG-SGG-dicts-vgoi6-clipped.json``): ``label_to_idx`` / ``attribute_to_idx``, 1-based
    (0 is background / "no attribute"), as 0-based lists.

    Raises:
        ValueError: unreadable file, missing key, or indexes that are not 1..N (one line).
    """
    try:
        with PathManager.open(path, "r") as f:
            labelmap = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read VinVL labelmap {path!r}: {e}") from None
    names = []
    for key in ("label_to_idx", "attribute_to_idx"):
        if not isinstance(labelmap.get(key), dict):
            raise ValueError(f"VinVL labelmap {path!r} has no {key!r} mapping")
        order = sorted(labelmap[key].items(), key=lambda item: int(item[1]))
        if [int(i) for _, i in order] != list(range(1, len(order) + 1)):
            raise ValueError(f"VinVL labelmap {path!r}: {key} indexes are not 1..{len(order)}")
        names.append([name for name, _ in order])
    return tuple(names)


def _vocabulary_files(cfg):
    """
    (key, catalog field, the file's names or None, count the model has) of classes, then
    attributes: ``MODEL.REGION_FEATURES.CLASS_NAMES_FILE`` / ``ATTRIBUTE_NAMES_FILE``, else
    ``MODEL.VINVL.LABELMAP`` (its attributes only where the model has an attribute head).
    """
    node = region_features_node(cfg)
    labelmap_path = cfg.MODEL.VINVL.LABELMAP
    labelmap = read_labelmap(labelmap_path) if labelmap_path else (None, None)
    files = (
        ("CLASS_NAMES_FILE", "thing_classes", cfg.MODEL.ROI_HEADS.NUM_CLASSES, labelmap[0]),
        ("ATTRIBUTE_NAMES_FILE", "attribute_classes", cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES,
         labelmap[1] if cfg.MODEL.ATTRIBUTE_ON else None),
    )
    for key, field, expected, labelmap_names in files:
        source, names = f"MODEL.REGION_FEATURES.{key} {node[key]!r}", None
        if node[key]:
            names = read_vocabulary(node[key])
        elif labelmap_names is not None:
            source, names = f"MODEL.VINVL.LABELMAP {labelmap_path!r}", labelmap_names
        if names is not None and len(names) != expected:
            raise ValueError(f"{source} holds {len(names)} {field}; the model has {expected}")
        yield key, field, names, expected


def vocabularies(cfg) -> Vocabularies:
    """
    The model's names: those of ``MODEL.REGION_FEATURES.CLASS_NAMES_FILE`` /
    ``ATTRIBUTE_NAMES_FILE`` when set, else the ``thing_classes`` / ``attribute_classes`` of
    the first dataset of ``DATASETS.TEST`` with one name per class (attribute) of the model.

    Raises:
        ValueError: a vocabulary file that cannot be read or has the wrong count.
    """
    found = {}
    for _, field, names, expected in _vocabulary_files(cfg):
        for dataset in cfg.DATASETS.TEST if names is None else ():
            registered = MetadataCatalog.get(dataset).get(field)
            if registered and len(registered) == expected:
                names = list(registered)
                break
        found[field] = names
    return Vocabularies(found["thing_classes"], found["attribute_classes"])


def register_vocabularies(cfg):
    """
    Put the names of the model's files (:func:`vocabularies`' first source:
    ``MODEL.REGION_FEATURES.CLASS_NAMES_FILE`` / ``ATTRIBUTE_NAMES_FILE``, or
    ``MODEL.VINVL.LABELMAP``), when set, into the metadata of every dataset of
    ``DATASETS.TEST``, as ``thing_classes`` and ``attribute_classes``. Their counts must be
    ``MODEL.ROI_HEADS.NUM_CLASSES`` and ``MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES``.
    """
    for key, field, names, _ in _vocabulary_files(cfg):
        if names is None:
            continue
        for dataset in cfg.DATASETS.TEST:
            metadata = MetadataCatalog.get(dataset)
            if metadata.get(field, names) != names:
                raise ValueError(
                    f"the model's {field} (from its names file) differ from those dataset {dataset!r} "
                    "already has in MetadataCatalog"
                )
            metadata.set(**{field: names})
