"""
Feature extraction at dataset scale, the work of ``tools/extract_net.py`` and
``tools/convert_features.py``: the job (:mod:`.job`: checks, manifest), the model call
(:mod:`.model_call`: batches to records), the pipeline (:mod:`.pipeline`: each rank's batches
through DataLoader workers, the model and a writer thread), the run object and its logs
(:mod:`.run`), the inputs and their ids (:mod:`.inputs`), the process launcher
(:mod:`.launch`), the output folder's manifest (:mod:`.manifest`) and the conversion of a
finished output folder to other layouts (:mod:`.convert`). The layouts themselves live in
:mod:`d2_regionfeat.formats`.
"""
from .convert import ConversionError
from .inputs import ID_MODES, ImageDataset, ImageItem, InputError, Inputs, list_inputs
from .manifest import OutputFolderError, read_manifest
from .job import ExtractionError, ExtractionJob, prepare_job
from .model_call import BatchExtractor
from .pipeline import extract
from .run import RunFolder, RankFiles, read_features

__all__ = [
    "BatchExtractor",
    "ConversionError",
    "ExtractionError",
    "ExtractionJob",
    "ID_MODES",
    "ImageDataset",
    "ImageItem",
    "InputError",
    "Inputs",
    "OutputFolderError",
    "RunFolder",
    "RankFiles",
    "extract",
    "list_inputs",
    "prepare_job",
    "read_features",
    "read_manifest",
]
