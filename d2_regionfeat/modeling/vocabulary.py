"""Class and attribute names from vocabulary files, into detectron2's MetadataCatalog."""
from typing import List

from detectron2.data import MetadataCatalog
from detectron2.utils.file_io import PathManager

from .config import region_features_node


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


def register_vocabularies(cfg):
    """
    Put the names of ``MODEL.REGION_FEATURES.CLASS_NAMES_FILE`` and ``ATTRIBUTE_NAMES_FILE``
    (when set) into the metadata of every dataset of ``DATASETS.TEST``, as ``thing_classes``
    and ``attribute_classes``. Their counts must be ``MODEL.ROI_HEADS.NUM_CLASSES`` and
    ``MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES``.
    """
    node = region_features_node(cfg)
    files = (
        ("CLASS_NAMES_FILE", "thing_classes", cfg.MODEL.ROI_HEADS.NUM_CLASSES),
        ("ATTRIBUTE_NAMES_FILE", "attribute_classes", cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES),
    )
    for key, field, expected in files:
        if not node[key]:
            continue
        names = read_vocabulary(node[key])
        if len(names) != expected:
            raise ValueError(
                f"MODEL.REGION_FEATURES.{key} {node[key]!r} holds {len(names)} names; the model "
                f"has {expected}"
            )
        for dataset in cfg.DATASETS.TEST:
            metadata = MetadataCatalog.get(dataset)
            if metadata.get(field, names) != names:
                raise ValueError(
                    f"MODEL.REGION_FEATURES.{key}: dataset {dataset!r} already has other "
                    f"{field} in MetadataCatalog"
                )
            metadata.set(**{field: names})
