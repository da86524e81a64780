"""
``grid_feats``: facebookresearch/grid-feats-vqa's layout, which its ``extract_grid_feature.py``
writes and MCAN-grid style loaders read: ``torch.save`` of a (1, C, H, W) tensor per image.
"""
import io
import os

import torch

from .base import PerImageFilesLayout, register_format
from .grid import GRID_NEEDS
from .records import int_id


@register_format("grid_feats")
class GridFeatsLayout(PerImageFilesLayout):
    """
    ``<output>/features/<split>/<int id>.pth``: the grid as a (1, C, H, W) CPU tensor
    (float16 with ``--fp16``); ``<split>`` is the image id's folder (``val2014/COCO_val2014_
    000000000042`` -> ``val2014/42.pth``), none for an id without one.
    """

    output_name = "features"
    grid = True
    needs = GRID_NEEDS
    suffixes = (".pth",)
    keeps_empty = True  # every image has a grid
    int_ids = True

    @classmethod
    def key(cls, image_id):
        folder = image_id.rsplit("/", 1)[0] + "/" if "/" in image_id else ""
        return folder + str(int_id(image_id))

    def files(self, record):
        buffer = io.BytesIO()
        torch.save(torch.from_numpy(record["grid"]).unsqueeze(0), buffer)
        return [buffer.getvalue()]

    @classmethod
    def read(cls, path):
        """Records (``image_id``: ``<split>/<int id>``, ``grid`` (C, H, W)), in order of key."""
        for key in cls.keys_in(path):
            tensor = torch.load(os.path.join(path, key + ".pth"), map_location="cpu", weights_only=True)
            yield {"image_id": key, "grid": tensor[0].numpy()}
