"""
Feature extraction at dataset scale, the work of ``tools/extract_net.py`` and
``tools/convert_features.py``: the runner (:mod:`.runner`: checks a job, extracts each rank's
batches, merges), the inputs and their ids (:mod:`.inputs`), the process launcher
(:mod:`.launch`), the output folder's manifest (:mod:`.manifest`) and the conversion of a
finished output folder to other layouts (:mod:`.convert`). The layouts themselves live in
:mod:`d2_regionfeat.formats`.
"""
from .convert import ConversionError
from .inputs import ID_MODES, ImageDataset, ImageItem, InputError, list_inputs
from .manifest import OutputFolderError, read_manifest
from .runner import BatchExtractor, ExtractionError, ExtractionJob, extract, prepare_job

__all__ = [
    "BatchExtractor",
    "ConversionError",
    "ExtractionError",
    "ExtractionJob",
    "ID_MODES",
    "ImageDataset",
    "ImageItem",
    "InputError",
    "OutputFolderError",
    "extract",
    "list_inputs",
    "prepare_job",
    "read_manifest",
]
