"""
The model call of an extraction: :class:`BatchExtractor` runs a region-feature model over
decoded images and turns its output ``Instances`` into per-image records
(:mod:`d2_regionfeat.formats.records`); :func:`record_keys` says which keys they hold;
:class:`OutOfMemoryFallback` retries a batch that runs out of CUDA memory, whatever the
run writes to.
"""
import copy
import logging
from collections import defaultdict
from typing import Callable, Dict, List, Optional

import torch

from ..formats.grid import grid_record
from ..formats.records import GRID_KEYS, REGION_SPEC, RecordKey, image_record
from ..modeling.outputs import RegionFields
from .inputs import one_line
from .model_config import as_model_config

logger = logging.getLogger(__name__)


def emitted(key: RecordKey, emits: RegionFields) -> bool:
    """Whether the records of a model that emits ``emits`` hold region key ``key``."""
    return key.when == "always" or getattr(emits, key.when)


def record_keys(emits: RegionFields) -> List[str]:
    """The keys of the records of a model that emits ``emits``."""
    grid = list(GRID_KEYS) if emits.grid is not None else []
    if emits.grid is not None and emits.grid.only:
        return grid
    keys = [key.name for key in REGION_SPEC if emitted(key, emits)]
    return keys + [k for k in grid if k not in keys]


class BatchExtractor:
    """
    Runs a region-feature model over decoded images as :class:`DefaultPredictor` does one at
    a time: on CUDA the images of a batch are grouped by their padded size, so that each
    one's detections are those it gets alone (a batch padded to a larger size would add
    anchors); on CPU each image is run alone.

    With ``amp``, the model's forward runs under ``torch.autocast`` (bfloat16 on CPU, float16
    on CUDA), except its box path, which the Feature heads keep in float32; the records are
    float32 (float16 features with ``fp16``) either way.
    """

    def __init__(self, cfg, fp16=False, amp=False):
        """``cfg``: the run's :class:`~.model_config.ModelConfig`, or a yacs ``CfgNode``."""
        model_config = as_model_config(cfg)
        self.model = model_config.build_model()
        model_config.load_weights(self.model)
        self.divisibility = max(1, self.model.backbone.size_divisibility)
        self.fp16 = fp16
        device = self.model.device.type
        self.autocast = torch.autocast(
            device, dtype=torch.bfloat16 if device == "cpu" else torch.float16, enabled=amp
        )

    def _padded_size(self, image):
        d = self.divisibility
        return tuple(-(-s // d) * d for s in image.shape[-2:])

    @torch.no_grad()
    def __call__(self, inputs: List[Dict]) -> List[Dict]:
        """
        Args:
            inputs: :class:`inputs.ImageDataset` items ("item", "image", "height", "width").

        Returns:
            the records (see :mod:`d2_regionfeat.io`) of ``inputs``, in order.
        """
        if self.model.device.type == "cpu":
            # a batched forward saves nothing on CPU, and its larger activations cost
            # 10-30 % at 800 px (bench/README.md): one image a call
            groups = [[index] for index in range(len(inputs))]
        else:
            by_size = defaultdict(list)
            for index, x in enumerate(inputs):
                by_size[self._padded_size(x["image"])].append(index)
            groups = list(by_size.values())
        records = [None] * len(inputs)
        for indices in groups:
            batch = [{k: inputs[i][k] for k in ("image", "height", "width")} for i in indices]
            with self.autocast:
                outputs = self.model(batch)
            for i, output in zip(indices, outputs):
                # its grid, if any, and its regions (none in grid-only mode)
                records[i] = self._grid_record(inputs[i], output.get("grid"))
                if "instances" in output:
                    records[i].update(self._record(inputs[i], output["instances"].to("cpu")))
        return records

    def _grid_record(self, x, grid):
        if grid is None:
            return {}
        return grid_record(x["item"].image_id, x["height"], x["width"], grid, self.fp16)

    def _record(self, x, instances):
        """The region record of ``instances``: every key of :data:`REGION_SPEC` they hold the field of."""
        record = dict(image_record(x["item"].image_id, x["height"], x["width"]), num_bbox=len(instances))
        for key in REGION_SPEC:
            if key.source is not None and instances.has(key.source):
                value = instances.get(key.source)
                record[key.name] = _numpy(getattr(value, "tensor", value), key.numpy_dtype(self.fp16))
        return record


def _numpy(tensor, dtype):
    """A CPU tensor as an ndarray of ``dtype`` (bfloat16, which numpy lacks, via float32)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy().astype(dtype)


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
    Each retry is logged as a warning; an image that runs out on CPU too gives ``None`` and
    ``fail(input, reason)``.
    """

    def __init__(self, extractor, make_cpu=cpu_copy):
        self.extractor, self.make_cpu, self._cpu = extractor, make_cpu, None

    def __call__(self, inputs: List[Dict], fail: Callable[[Dict, str], None]) -> List[Optional[Dict]]:
        try:
            return self.extractor(inputs)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            if len(inputs) > 1:
                logger.warning("%d images: retry alone: %s", len(inputs), one_line(e))
        self._free()
        return [self._alone(x, fail) for x in inputs]

    def _free(self):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _alone(self, x, fail):
        """``x``'s record, alone on the extractor's device, then on CPU; None if both run out."""
        try:
            return self.extractor([x])[0]
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            logger.warning("%s: retry on CPU: %s", x["item"].image_id, one_line(e))
        self._free()
        self._cpu = self._cpu or self.make_cpu(self.extractor)
        try:
            return self._cpu([x])[0]
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            fail(x, f"out of memory on CPU too: {one_line(e)}")
        return None
