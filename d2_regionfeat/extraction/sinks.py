"""
Where the run's loop (:mod:`.pipeline`) hands its batches: a sink's ``store(batch)`` gets the
loop's entries in input order, each holding its ``"item"`` and either its ``"record"`` or
the ``"error"`` that stopped it (or, from :class:`.input_shards.ShardDataset`, the end of an input
shard); ``close()`` ends it.

* :class:`FolderSink`: this rank's layouts and logs of a folder run (:class:`.run.RankFiles`);
* :class:`ShardSink`: one output shard per input shard (:mod:`d2_regionfeat.formats.feature_shards`).

Either records failures as :func:`.run.failure` entries.
"""
from typing import Dict, List

from ..formats.feature_shards import FeatureShardWriter
from .run import RankFiles, failure


class FolderSink:
    """The writers and logs of a rank of a folder run."""

    def __init__(self, outputs: RankFiles):
        self.outputs = outputs

    def store(self, batch: List[Dict]):
        self.outputs.store(
            [x["record"] for x in batch if "record" in x],
            [failure(x["item"], x["error"]) for x in batch if "error" in x],
            {x["item"].image_id: x["item"].path for x in batch if "record" in x},
        )

    def close(self):
        self.outputs.close()


class ShardSink:
    """
    Output shards in ``output_dir``: each input shard's writer, put in place at the shard's end
    entry, or, when the shard could not be read (``"lost"``), dropped for its failure alone.
    Shards left unfinished at :meth:`close` (the run stopped) are dropped.
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.writers: Dict[str, FeatureShardWriter] = {}
        self.lost: List[str] = []

    def _writer(self, name):
        if name not in self.writers:
            self.writers[name] = FeatureShardWriter(self.output_dir, name)
        return self.writers[name]

    def store(self, batch: List[Dict]):
        for x in batch:
            if "end" in x:
                self._end(x)
            elif "record" in x:
                self._writer(x["item"].shard).add(x["record"], x["item"].key, x["item"].carried)
            else:
                self._writer(x["item"].shard).fail(failure(x["item"], x["error"]))

    def _end(self, x):
        if x["lost"] is not None:
            self.lose(x["end"], x["member"], x["lost"])
            return
        self._writer(x["end"]).close()
        del self.writers[x["end"]]

    def lose(self, name: str, member: str, reason: str):
        """
        Shard ``name`` is lost: its input ``member`` (URL) could not be read, for ``reason``.
        Whatever it holds is dropped, its failures are this record alone, and it is not complete.
        """
        writer = self.writers.pop(name, None) or FeatureShardWriter(self.output_dir, name)
        writer.lose({"id": None, "shard": name, "member": member, "reason": reason})
        self.lost.append(name)

    def close(self):
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()
