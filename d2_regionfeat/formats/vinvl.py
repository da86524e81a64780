"""scene_graph_benchmark's ``predictions.tsv`` (``convert_predictions_to_tsv``): the VinVL layout."""
import json
import os

import numpy as np

from .base import JournalLayout, register_format
from .records import b64, unb64
from .safety import fsync

FILES = ("predictions.tsv", "predictions.lineidx")


def _class_and_attribute_names(names):
    """(class names, attribute names) of ``names`` (see ``takes_names``), each None when absent."""
    return (names.class_names, names.attribute_names) if names is not None else (None, None)


@register_format("vinvl")
class VinVLLayout(JournalLayout):
    """
    ``<output>/vinvl/predictions.tsv``: one line per image, ``<image id>\\t<json>`` with json
    ``{"objects": [...], "relations": null}``; each object ``rect`` ([x1, y1, x2, y2],
    original image pixels), ``bbox_id`` (its position), ``class`` (the class name from the
    run's ``names``, else the class index as text), ``conf``, ``feature`` (base64
    of its float32 (D,) feature), and, from a model with VinVL's attribute head
    (``ROI_ATTRIBUTE_HEAD.KIND: "vinvl"``), ``attributes`` (names, or indexes as text) and
    ``attr_scores`` of its attributes (scene_graph_benchmark also lists the zero-score
    padding; here only the kept ones). ``predictions.lineidx``: each line's byte offset.
    """

    output_name = "vinvl"
    takes_names = True

    @classmethod
    def _line(cls, record, class_names, attribute_names):
        objects = []
        features = np.asarray(record["x"], np.float32)
        for i in range(record["num_bbox"]):
            c = int(record["objects_id"][i])
            obj = {
                "rect": [float(v) for v in record["bbox"][i]], "bbox_id": i,
                "class": class_names[c] if class_names else str(c),
                "conf": float(record["objects_conf"][i]),
                "feature": b64(features[i], np.float32).decode("ascii"),
            }
            if "attr_labels" in record:
                kept = record["attr_labels"][i] >= 0
                obj["attributes"] = [
                    attribute_names[a] if attribute_names else str(int(a))
                    for a in record["attr_labels"][i][kept]
                ]
                obj["attr_scores"] = [float(s) for s in record["attr_scores"][i][kept]]
            objects.append(obj)
        text = json.dumps({"objects": objects, "relations": None})
        return record["image_id"].encode("utf-8") + b"\t" + text.encode("utf-8") + b"\n"

    @classmethod
    def merge(cls, output_dir, world_size, names=None):
        folder = os.path.join(output_dir, cls.output_name)
        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, name) for name in FILES]
        names = _class_and_attribute_names(names)
        position = 0
        with open(paths[0] + ".tmp", "wb") as tsv, open(paths[1] + ".tmp", "wb") as index:
            for record in cls.journaled(output_dir, world_size):
                line = cls._line(record, *names)
                tsv.write(line)
                index.write(b"%d\n" % position)
                position += len(line)
        for path in paths:
            fsync(path + ".tmp")
        for path in paths:
            os.replace(path + ".tmp", path)

    @classmethod
    def read(cls, path, names=None, max_attributes=16):
        """
        Records in file order: ``image_id``, ``num_bbox``, ``x``, ``bbox``, ``objects_conf``,
        ``objects_id`` (through ``names``, or indexes as text) and,
        when written, ``attr_labels`` / ``attr_scores`` padded to ``max_attributes`` (-1 / 0).
        No ``image_h`` / ``image_w``: the layout does not hold them.
        """
        class_names, attribute_names = _class_and_attribute_names(names)

        def index(name, names):
            return names.index(name) if names else int(name)

        with open(os.path.join(path, FILES[0])) as f:
            for line in f:
                key, text = line.rstrip("\n").split("\t")
                objects = json.loads(text)["objects"]
                n = len(objects)
                record = {
                    "image_id": key, "num_bbox": n,
                    "x": np.stack([unb64(o["feature"], np.float32) for o in objects]) if n
                    else np.zeros((0, 0), np.float32),
                    "bbox": np.array([o["rect"] for o in objects], np.float32).reshape(n, 4),
                    "objects_id": np.array([index(o["class"], class_names) for o in objects], np.int64),
                    "objects_conf": np.array([o["conf"] for o in objects], np.float32),
                }
                if objects and "attributes" in objects[0]:
                    labels = np.full((n, max_attributes), -1, np.int64)
                    scores = np.zeros((n, max_attributes), np.float32)
                    for i, o in enumerate(objects):
                        k = len(o["attributes"])
                        labels[i, :k] = [index(a, attribute_names) for a in o["attributes"]]
                        scores[i, :k] = o["attr_scores"]
                    record.update(attr_labels=labels, attr_scores=scores)
                yield record
