"""Synthetic feature records (the dicts of :mod:`d2_regionfeat.io`) for the writer benchmarks."""
import numpy as np

# distinct feature arrays cycled through, so that records need no memory of their own
POOL = 8


class RecordMaker:
    """
    ``maker(i)``: record ``i``, N regions of D-dim float32 features (and K+1 class
    probabilities; with A attributes, BUTD's best attribute, its probability and the A+1).
    """

    def __init__(self, regions=36, dim=2048, classes=0, seed=0, attributes=0):
        rng = np.random.default_rng(seed)
        self.features = rng.standard_normal((POOL, regions, dim), dtype=np.float32)
        self.boxes = (rng.random((POOL, regions, 4), dtype=np.float32) * 500).cumsum(-1)
        self.probs = None
        if classes:
            self.probs = rng.dirichlet(np.ones(classes + 1), (POOL, regions)).astype(np.float32)
        self.attr_probs = None
        if attributes:
            self.attr_probs = rng.dirichlet(np.ones(attributes + 1), (POOL, regions)).astype(np.float32)
        self.regions = regions

    def __call__(self, i):
        k = i % POOL
        record = {
            "image_id": f"{i:08d}",
            "image_h": 480,
            "image_w": 640,
            "num_bbox": self.regions,
            "x": self.features[k],
            "bbox": self.boxes[k],
            "objects_id": np.arange(self.regions, dtype=np.int64) % 1600,
            "objects_conf": np.linspace(1, 0.2, self.regions, dtype=np.float32),
        }
        if self.probs is not None:
            record["cls_prob"] = self.probs[k]
        if self.attr_probs is not None:
            record["attr_prob"] = self.attr_probs[k]
            record["attrs_id"] = self.attr_probs[k][:, :-1].argmax(1)
            record["attrs_conf"] = self.attr_probs[k][:, :-1].max(1)
        return record

    @staticmethod
    def payload_bytes(record):
        """Bytes of the record's arrays."""
        return sum(v.nbytes for v in record.values() if isinstance(v, np.ndarray))


def write_records(writer, maker, begin, end, batch=4):
    """Records ``begin`` to ``end`` through ``writer.write``, ``batch`` at a time."""
    for i in range(begin, end, batch):
        writer.write([maker(j) for j in range(i, min(i + batch, end))])
