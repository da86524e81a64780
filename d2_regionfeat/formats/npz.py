"""``npz``: our own per-image npz files, every record key, no pickles."""
import os

import numpy as np

from .base import PerImageFilesLayout, register_format
from .records import encode_npz, from_npz


@register_format("npz")
class NpzLayout(PerImageFilesLayout):
    """
    ``<output>/npz/<image_id>.npz``, one file per image with the record's keys (see
    :mod:`.records`), uncompressed, byte-for-byte reproducible; ``np.load`` reads it with
    the default ``allow_pickle=False``.
    """

    output_name = "npz"
    keeps_empty = True

    def files(self, record):
        return [encode_npz(record)]

    @classmethod
    def read(cls, path):
        """Records of a folder of ``<image_id>.npz`` files, in order of image id."""
        for key in cls.keys_in(path):
            with np.load(os.path.join(path, key + ".npz")) as npz:
                yield from_npz(npz)
