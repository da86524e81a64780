"""UNITER: the npz folder its ``scripts/convert_imgdir.py`` turns into its LMDB."""
import os

import numpy as np

from .base import PerImageFilesLayout, register_format
from .records import background_first, encode_npz, spatial6

CLASS_PROBS_HINT = (
    "class probabilities, which SELECTION detections gives only with "
    "MODEL.REGION_FEATURES.CLASS_PROBS True"
)


@register_format("uniter")
class UniterLayout(PerImageFilesLayout):
    """
    ``<output>/uniter/<image_id>.npz``, every array 2-D float16 (``convert_imgdir.py``
    refuses other ranks): ``norm_bb`` (N, 6) spatial6 boxes, ``features`` (N, D),
    ``conf`` (N, 1) the region's score, ``soft_labels`` (N, K+1) class probabilities with
    the background FIRST. Name the images as UNITER's text databases do (e.g.
    ``coco_val2014_000000000042``).
    """

    output_name = "uniter"
    flat = True
    needs = {"cls_prob": CLASS_PROBS_HINT}

    def files(self, record):
        arrays = {
            "norm_bb": spatial6(record),
            "features": record["x"],
            "conf": np.asarray(record["objects_conf"]).reshape(-1, 1),
            "soft_labels": background_first(record["cls_prob"]),
        }
        arrays = {k: np.asarray(v, np.float16) for k, v in arrays.items()}
        return [encode_npz(arrays, keys=tuple(arrays))]

    @classmethod
    def read(cls, path):
        """Records with ``x``, ``objects_conf``, ``cls_prob`` (background last) in float16."""
        for key in cls.keys_in(path):
            with np.load(os.path.join(path, key + ".npz")) as npz:
                soft = npz["soft_labels"]
                yield {
                    "image_id": key,
                    "num_bbox": len(npz["features"]),
                    "x": npz["features"],
                    "objects_conf": npz["conf"][:, 0],
                    "cls_prob": np.concatenate([soft[:, 1:], soft[:, :1]], axis=1),
                    "norm_bb": npz["norm_bb"],
                }
