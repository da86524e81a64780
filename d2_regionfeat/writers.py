"""
The crash-safe writers, by layout name in :data:`WRITERS`; they live in
:mod:`d2_regionfeat.formats` (one module per layout), this module keeps their import paths.
"""
from .formats import WRITERS, FeatureWriter, register_format  # noqa: F401
from .formats.base import JournalWriter, LineWriter, PerImageFilesWriter  # noqa: F401
from .formats.hdf5 import Hdf5Writer  # noqa: F401
from .formats.lmdb import LmdbWriter  # noqa: F401
from .formats.npz import NpzWriter  # noqa: F401
from .formats.safety import (  # noqa: F401
    FailureLog,
    LineLog,
    NoRegionsLog,
    RecordJournal,
    part_path,
)
from .formats.tsv import TsvWriter  # noqa: F401

register_writer = register_format
