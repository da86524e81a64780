"""
extract_net's --amp: the model's forward under autocast but its box path in float32, records
still float32 (float16 features with --fp16), the setting in the manifest and in the identity
a resume must match.
"""
import numpy as np
import pytest
import torch

from d2_regionfeat.data.synthetic import render_image
from d2_regionfeat.default_model import get_default_model_cfg
from d2_regionfeat.data import build_test_transform
from d2_regionfeat.extraction.inputs import ImageDataset, list_inputs
from d2_regionfeat.extraction.manifest import OutputFolderError, read_manifest
from d2_regionfeat.extraction.job import prepare_job
from d2_regionfeat.extraction.model_call import BatchExtractor
from d2_regionfeat.modeling.given_boxes import regions_for_boxes
from d2_regionfeat.modeling.region_heads import _autocast_enabled
from helpers import build, inputs, make_cfg
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


@pytest.mark.equality
def test_amp_records_match_float32(cfg, images):
    dataset = ImageDataset(
        list_inputs(str(images)), cfg.INPUT.FORMAT, build_test_transform(cfg)
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


@pytest.mark.parametrize("kind", ["fpn", "c4", "cascade"])
def test_box_path_runs_in_float32_under_autocast(kind):
    model = build(make_cfg(kind), seed=0)
    heads = model.roi_heads
    box_path = heads.res5 if kind == "c4" else heads.box_head[-1] if kind == "cascade" else heads.box_head
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, []).append((args[0].dtype, torch.is_autocast_enabled("cpu"), output))
        return hook

    model.backbone.register_forward_hook(record("backbone"))
    box_path.register_forward_hook(record("box path"))
    batched = inputs((1, 200, 280))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (detected,) = [o["instances"] for o in model.inference(batched)]
        (given,) = regions_for_boxes(model, batched, [detected.pred_boxes.tensor[:3]])
    assert len(seen["backbone"]) == 2
    for _, on, maps in seen["backbone"]:
        assert on and all(x.dtype == torch.bfloat16 for x in maps.values())
    assert len(seen["box path"]) == 2
    for dtype, on, output in seen["box path"]:
        assert dtype == torch.float32 and not on and output.dtype == torch.float32
    assert len(detected) and len(given) == min(3, len(detected))
    for instances in (detected, given):
        assert instances.box_features.dtype == torch.float32
        assert instances.pred_boxes.tensor.dtype == torch.float32


def test_amp_features_of_given_boxes_are_float32s(cfg, images):
    """The shipped (trained) model: bfloat16 in the backbone alone keeps features' direction."""
    dataset = ImageDataset(
        list_inputs(str(images)), cfg.INPUT.FORMAT, build_test_transform(cfg)
    )
    extractor = BatchExtractor(cfg, amp=True)
    cosines = []
    for x, record in zip(dataset, BatchExtractor(cfg)(list(dataset))):
        batched = [{k: x[k] for k in ("image", "height", "width")}]
        with torch.no_grad():
            reference = regions_for_boxes(extractor.model, batched, [record["bbox"]])[0].box_features
            with extractor.autocast:
                amp = regions_for_boxes(extractor.model, batched, [record["bbox"]])[0].box_features
        cosines += torch.nn.functional.cosine_similarity(reference.double(), amp.double()).tolist()
    assert len(cosines) > 5 and min(cosines) >= 0.999


def test_autocast_query_on_a_torch_without_device_argument(monkeypatch):
    """Older torch: ``is_autocast_enabled()`` takes no device, CPU has a query of its own."""
    with_device = torch.is_autocast_enabled

    def without_device(*device_type):
        if device_type:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments")
        return with_device("cuda")

    for enabled in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            monkeypatch.setattr(torch, "is_autocast_enabled", without_device)
            assert _autocast_enabled("cpu") is enabled
            monkeypatch.undo()  # torch.autocast itself asks with a device
