"""VisualBERT (``vqa_dataset.py``): one ``.npy`` of features per image, no pickle."""
import os

import numpy as np

from .base import PerImageFilesLayout, register_format
from .records import npy_bytes


@register_format("visualbert")
class VisualBertLayout(PerImageFilesLayout):
    """
    ``<output>/visualbert/<image_id>.npy``: features (N, D) float32. VisualBERT finds them
    by COCO file stem (``COCO_val2014_000000000042``): extract from the COCO image folders.
    """

    output_name = "visualbert"
    flat = True
    suffixes = (".npy",)

    def files(self, record):
        return [npy_bytes(np.asarray(record["x"], np.float32))]

    @classmethod
    def read(cls, path):
        """Records with ``x`` and ``num_bbox`` only."""
        for key in cls.keys_in(path):
            x = np.load(os.path.join(path, key + ".npy"), allow_pickle=False)
            yield {"image_id": key, "num_bbox": len(x), "x": x}
