"""
extract_net's --amp: the model's forward under autocast, records still float32 (float16
features with --fp16), the setting in the manifest and in the identity a resume must match.
"""
import numpy as np
import pytest

from d2_regionfeat.data.synthetic import render_image
from d2_regionfeat.default_model import get_default_model_cfg
from d2_regionfeat.extraction.inputs import ImageDataset, list_inputs
from d2_regionfeat.extraction.manifest import OutputFolderError, read_manifest
from d2_regionfeat.extraction.runner import BatchExtractor, prepare_job
from PIL import Image


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(2):
        Image.fromarray(render_image([3, i])[0]).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def cfg():
    cfg = get_default_model_cfg("cpu")
    cfg.freeze()
    return cfg


def test_amp_records_match_float32(cfg, images):
    dataset = ImageDataset(
        list_inputs(str(images)), cfg.INPUT.FORMAT, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    )
    inputs = [dataset[i] for i in range(len(dataset))]
    reference = BatchExtractor(cfg)(inputs)
    for fp16 in (False, True):
        records = BatchExtractor(cfg, fp16=fp16, amp=True)(inputs)
        for ref, rec in zip(reference, records):
            assert rec["x"].dtype == (np.float16 if fp16 else np.float32)
            for key in ("bbox", "objects_conf", "cls_prob"):
                assert rec[key].dtype == np.float32, key
            # the shipped model's confident detections survive bfloat16
            confident = ref["objects_conf"] > 0.9
            assert confident.any()
            for box, label in zip(ref["bbox"][confident], ref["objects_id"][confident]):
                same = rec["bbox"][rec["objects_id"] == label]
                assert len(same) and np.abs(same - box).max(axis=1).min() < 4


def test_amp_is_in_the_manifest_and_resume_identity(cfg, images, tmp_path):
    out = str(tmp_path / "out")
    prepare_job(cfg, str(images), out, ["npz"], 1, amp=True)
    assert read_manifest(out)["amp"] is True
    prepare_job(cfg, str(images), out, ["npz"], 1, resume=True, amp=True)
    with pytest.raises(OutputFolderError, match="--amp"):
        prepare_job(cfg, str(images), out, ["npz"], 1, resume=True, amp=False)
