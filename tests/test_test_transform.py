"""
One test transform (issue 24, bug 1): VinVL's truncating resize (INPUT.RESIZE_LONG_SIDE
"truncate") reaches the extraction run, RegionPredictor and given boxes; DefaultPredictor,
which builds its own rounding resize, gets a warning naming the difference.
"""
import warnings

import numpy as np
import pytest

from d2_regionfeat.data import build_test_transform
from d2_regionfeat.extraction.inputs import ImageItem
from d2_regionfeat.extraction.job import ExtractionJob
from d2_regionfeat.extraction.model_config import as_model_config
from d2_regionfeat.modeling.given_boxes import RegionPredictor
from detectron2.engine import DefaultPredictor

from test_extract_net import generated, save_bgr
from test_vinvl_model import narrow_cfg

# a 66 x 100 image to a short side of 120: long side 100 * 120 / 66 = 181.8, VinVL 181, detectron2 182
HEIGHT, WIDTH, TRUNCATED = 66, 100, (120, 181)


def resize_warnings(caught):
    return [w for w in caught if "test resize" in str(w.message)]


@pytest.fixture(scope="module")
def cfg():
    cfg = narrow_cfg()
    cfg.MODEL.WEIGHTS = ""
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 120, 1000
    assert cfg.INPUT.RESIZE_LONG_SIDE == "truncate"
    return cfg


def test_every_path_resizes_as_vinvl(cfg, tmp_path):
    bgr = generated(0, HEIGHT, WIDTH)
    resize = build_test_transform(cfg).get_transform(bgr)
    assert (resize.new_h, resize.new_w) == TRUNCATED
    save_bgr(tmp_path / "a.png", bgr)
    job = ExtractionJob(model_config=as_model_config(cfg), items=[], output_dir="", formats=[], emits=None, names=None)
    entry = job.images([ImageItem("a", str(tmp_path / "a.png"))])[0]
    assert tuple(entry["image"].shape[-2:]) == TRUNCATED
    predictor = RegionPredictor(cfg)
    assert tuple(predictor.model_inputs(bgr)["image"].shape[-2:]) == TRUNCATED
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor(bgr)
        predictor(bgr, np.array([[2.0, 3.0, 30.0, 20.0]]))
    assert not resize_warnings(caught)


def test_default_predictor_warns_once(cfg):
    predictor = DefaultPredictor(cfg)
    bgr = generated(1, HEIGHT, WIDTH)
    with pytest.warns(UserWarning, match=r"66x100 image came resized to 120x182, not the 120x181"):
        predictor(bgr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor(bgr)
    assert not resize_warnings(caught)


def test_a_500x333_image_enters_the_run_at_900x600(tmp_path):
    """The VinVL config's own 600 / 1000: scene_graph_benchmark's Resize truncates 500 * 600 /
    333 = 900.9 to 900 (detectron2 would round to 901); the extraction run's loader says so."""
    cfg = narrow_cfg()
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (600, 1000)
    save_bgr(tmp_path / "a.png", generated(1, 333, 500))
    job = ExtractionJob(model_config=as_model_config(cfg), items=[], output_dir="", formats=[], emits=None, names=None)
    entry = job.images([ImageItem("a", str(tmp_path / "a.png"))])[0]
    assert tuple(entry["image"].shape[-2:]) == (600, 900)
    assert (entry["height"], entry["width"]) == (333, 500)
