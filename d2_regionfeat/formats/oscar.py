"""Oscar / VinVL captioning (``run_captioning.py``): features and labels TSVs with indexes."""
import json
import os

import numpy as np

from .base import JournalLayout, register_format
from .records import b64, spatial6, unb64
from .safety import fsync

FILES = ("features.tsv", "features.lineidx", "labels.tsv", "labels.lineidx")


@register_format("oscar")
class OscarLayout(JournalLayout):
    """
    ``<output>/oscar/``: ``features.tsv`` lines ``<image id>\\t<json {"num_boxes": N,
    "features": base64 of float32 (N, D+6), "image_h", "image_w"}>`` (each row the feature
    then spatial6), ``labels.tsv`` lines ``<image id>\\t<json [{"class", "conf", "rect"}]>``
    (``class``: the class name, or ``class_<index>`` for a model without names), and ``features.lineidx`` / ``labels.lineidx``: the byte offset of each line.
    """

    output_name = "oscar"
    takes_names = True

    @classmethod
    def _lines(cls, record, class_names):
        key = record["image_id"].encode("utf-8")
        rows = np.concatenate([np.asarray(record["x"], np.float32), spatial6(record)], axis=1)
        features = {
            "num_boxes": record["num_bbox"], "features": b64(rows, np.float32).decode("ascii"),
            "image_h": record["image_h"], "image_w": record["image_w"],
        }
        labels = [
            {"class": class_names[c] if class_names else f"class_{int(c)}", "conf": float(s),
             "rect": [float(v) for v in box]}
            for c, s, box in zip(record["objects_id"], record["objects_conf"], record["bbox"])
        ]
        return (
            key + b"\t" + json.dumps(features).encode("utf-8") + b"\n",
            key + b"\t" + json.dumps(labels).encode("utf-8") + b"\n",
        )

    @classmethod
    def merge(cls, output_dir, world_size, names=None):
        class_names = names.class_names if names is not None else None
        folder = os.path.join(output_dir, cls.output_name)
        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, name) for name in FILES]
        files = [open(p + ".tmp", "wb") for p in paths]
        positions = [0, 0]
        with files[0], files[1], files[2], files[3]:
            for record in cls.journaled(output_dir, world_size):
                for column, line in enumerate(cls._lines(record, class_names)):
                    files[2 * column].write(line)
                    files[2 * column + 1].write(b"%d\n" % positions[column])
                    positions[column] += len(line)
        for path in paths:
            fsync(path + ".tmp")
        for path in paths:
            os.replace(path + ".tmp", path)

    @classmethod
    def read(cls, path, names=None):
        """
        Records of the layout (no ``cls_prob``), in file order; with the run's ``names``,
        ``objects_id`` too, from the labels' class names (``class_<index>`` for a model
        without names). Without ``names`` the labels cannot be told apart from names.
        """
        class_names = names.class_names if names is not None else None

        def class_id(label):
            return class_names.index(label) if class_names else int(label[len("class_"):])

        with open(os.path.join(path, "features.tsv")) as features, open(
            os.path.join(path, "labels.tsv")
        ) as labels:
            for feature_line, label_line in zip(features, labels):
                key, info = feature_line.rstrip("\n").split("\t")
                info = json.loads(info)
                regions = json.loads(label_line.rstrip("\n").split("\t")[1])
                n = int(info["num_boxes"])
                rows = unb64(info["features"], np.float32).reshape(n, -1)
                record = {
                    "image_id": key,
                    "image_h": int(info["image_h"]),
                    "image_w": int(info["image_w"]),
                    "num_bbox": n,
                    "x": rows[:, :-6],
                    "bbox": np.array([r["rect"] for r in regions], np.float32).reshape(n, 4),
                    "objects_conf": np.array([r["conf"] for r in regions], np.float32),
                }
                if names is not None:
                    record["objects_id"] = np.array([class_id(r["class"]) for r in regions], np.int64)
                yield record
