"""
Reading the feature files that ``tools/extract_net.py`` writes: every layout yields the
same per-image records (see :mod:`d2_regionfeat.formats.records`), without ever unpickling;
:func:`read_features` reads a folder run, a layout's file, and output shards alike.
The layouts live in :mod:`d2_regionfeat.formats`; this module keeps their reading API.
"""
from .extraction.manifest import MANIFEST_NAME  # noqa: F401
from .extraction.run import FAILURES_NAME, NO_REGIONS_NAME, read_features  # noqa: F401
from .formats import LAYOUT_PATHS, READERS, WriteOnlyLayoutError  # noqa: F401
from .formats.feature_shards import DuplicateIdError, ShardFolder  # noqa: F401  (folders of output shards)
from .formats.records import RECORD_KEYS, decode_npz, encode_npz  # noqa: F401
from .formats.tsv import TSV_FIELDNAMES, decode_tsv_line, encode_tsv_line  # noqa: F401

# Record keys stored in npz files (and lmdb values), in this order when present.
NPZ_KEYS = RECORD_KEYS
read_npz = READERS["npz"]
read_tsv = READERS["tsv"]
read_hdf5 = READERS["hdf5"]
read_lmdb = READERS["lmdb"]
