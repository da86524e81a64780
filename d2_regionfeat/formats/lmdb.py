"""``lmdb``: our own LMDB, key the image id, value the record's npz bytes."""
import os
import shutil

from .base import Layout, register_format
from .records import decode_npz, encode_npz
from .safety import new_part, replace_with_copy


@register_format("lmdb")
class LmdbLayout(Layout):
    """
    ``<output>/features.lmdb``: key the image id in UTF-8, value the npz bytes of
    :func:`.records.encode_npz`; one transaction per batch. Each rank writes its own
    environment; the merge copies them into the final one.
    """

    output_name = "features.lmdb"
    keeps_empty = True
    map_size = 1 << 40  # address space only: the file grows with what is written

    def __init__(self, output_dir, rank, world_size):
        super().__init__(output_dir, rank, world_size)
        self.env = self._open(new_part(output_dir, self.name, rank, world_size))

    @classmethod
    def _open(cls, path, **kwargs):
        import lmdb

        return lmdb.open(path, map_size=cls.map_size, sync=False, readahead=False, **kwargs)

    def written(self):
        with self.env.begin() as txn:
            return {bytes(k).decode("utf-8") for k in txn.cursor().iternext(values=False)}

    def write(self, records):
        with self.env.begin(write=True) as txn:
            for record in records:
                txn.put(record["image_id"].encode("utf-8"), encode_npz(record))

    def close(self):
        self.env.sync(True)
        self.env.close()

    @classmethod
    def merge(cls, output_dir, world_size):
        target = os.path.join(output_dir, cls.output_name)
        tmp = target + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        parts = cls.parts(output_dir, world_size)
        if len(parts) == 1:
            replace_with_copy([os.path.join(parts[0], "data.mdb")], os.path.join(tmp, "data.mdb"))
        else:
            env = cls._open(tmp)
            for part in parts:
                source = cls._open(part)
                with source.begin() as src, env.begin(write=True) as dst:
                    for key, value in src.cursor():
                        dst.put(key, value)
                source.close()
            env.sync(True)
            env.close()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)

    @classmethod
    def read(cls, path):
        """Records of the LMDB environment, in key order."""
        import lmdb

        env = lmdb.open(path, readonly=True, lock=False, readahead=False)
        try:
            with env.begin(buffers=True) as txn:
                for _, value in txn.cursor():
                    yield decode_npz(bytes(value))
        finally:
            env.close()
