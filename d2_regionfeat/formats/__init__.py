"""
Feature file layouts, one module each, registered by name in :data:`LAYOUTS`; each writer
class also reads its layout back (:meth:`Layout.read`) into the per-image records of
:mod:`.records`.

Our own layouts: ``npz``, ``hdf5``, ``lmdb``, and ``tsv`` (LXMERT). Layouts that other
codebases' loaders read unchanged: ``butd_tsv``, ``openvqa``, ``openvqa_gqa``, ``uniter``,
``mmf``, ``vilbert``, ``ban_hdf5``, ``oscar``, ``visualbert``, ``vinvl``, ``buta``. Only ``mmf``,
``vilbert``, ``ban_hdf5`` and ``buta`` (its ``info``) write pickles (their readers' design); none
is ever read back here.
Crash safety is in :mod:`.safety`; the bookkeeping of a run (manifest, logs, merge) is in
:mod:`d2_regionfeat.extraction.run`.
"""
import os
from typing import Dict, Iterator, Optional

# registration order: our own layouts first, then the consumers'
from . import npz, tsv, lmdb, hdf5  # noqa: F401,I001
from . import butd_tsv, openvqa, uniter, mmf, vilbert, ban, oscar, visualbert  # noqa: F401,I001
from . import vinvl, buta  # noqa: F401,I001
from . import grid, grid_hdf5, grid_feats, grid_mmf  # noqa: F401,I001  (grid layouts)
from .base import LAYOUTS, Layout, WriteOnlyLayoutError, register_format
from .records import LayoutIdError, int_id
from .feature_shards import SHARDS, ShardFolder, holds_shards

# Where each layout lies in an output folder.
LAYOUT_PATHS = {name: cls.output_name for name, cls in LAYOUTS.items()}
# Layout -> function reading the records of the layout at a path.
READERS = {name: cls.read for name, cls in LAYOUTS.items()}
# The layouts of regions, and those of grid features (grid records, see .grid).
REGION_FORMATS = [name for name, cls in LAYOUTS.items() if not cls.grid]
GRID_FORMATS = [name for name, cls in LAYOUTS.items() if cls.grid]


def read_features(path, fmt: Optional[str] = None, names=None) -> Iterator[Dict]:
    """
    Records of a feature file, an output folder of ``tools/extract_net.py``, or output shards
    (a folder of them, several, or a glob: :class:`.feature_shards.ShardFolder`). Never
    unpickles: ``mmf`` and ``vilbert`` raise :class:`WriteOnlyLayoutError`, ``ban_hdf5`` is
    read without its pickle.

    Args:
        path: an output folder (then ``fmt`` says which of its layouts; default the first
            of :data:`LAYOUTS` it holds; ``d2_regionfeat.io.read_features`` defaults to its
            manifest's first), an ``npz`` folder, a ``.tsv`` file, an ``.h5``/``.hdf5``
            file, an LMDB folder, or (with ``fmt``) the file or folder of any layout; or a
            folder of output shards, a glob of such folders or a list of them.
        fmt: one of :data:`LAYOUTS` or ``"shards"``; guessed from ``path`` when not given.
        names: the model's class and attribute names (``class_names``, ``attribute_names``),
            for the layouts that store names (``takes_names``); None: none known.
    """
    if fmt == SHARDS or (fmt is None and holds_shards(path)):
        return iter(ShardFolder(path))
    # the layouts of an output folder lie under their output names
    held = [f for f, name in LAYOUT_PATHS.items() if os.path.exists(os.path.join(path, name))]
    if fmt in held or (fmt is None and held):
        fmt = fmt or held[0]
        path = os.path.join(path, LAYOUT_PATHS[fmt])
    elif fmt is None:
        if path.endswith(".tsv"):
            fmt = "tsv"
        elif path.endswith((".h5", ".hdf5")):
            fmt = "hdf5"
        elif os.path.isfile(os.path.join(path, "data.mdb")):
            fmt = "lmdb"
        else:
            fmt = "npz"
    if LAYOUTS[fmt].takes_names:
        return READERS[fmt](path, names=names)
    return READERS[fmt](path)


__all__ = [
    "LAYOUTS", "READERS", "LAYOUT_PATHS", "REGION_FORMATS", "GRID_FORMATS", "Layout",
    "register_format", "read_features", "ShardFolder", "LayoutIdError", "WriteOnlyLayoutError", "int_id",
]
