"""Grid layouts: each written from grid records and read back as its consumer's code reads it."""
import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from d2_regionfeat.formats import LAYOUTS, read_features
from d2_regionfeat.formats.grid import grid_record

GRID_LAYOUTS = ["grid_npz", "grid_hdf5", "grid_feats", "grid_mmf"]
# image id -> (H, W) of its grid: each image its own size
SHAPES = {"val2014/COCO_val2014_000000000001": (5, 7), "val2014/COCO_val2014_000000000002": (7, 4)}


def records(fp16=False, channels=6):
    out = []
    for n, (image_id, (h, w)) in enumerate(SHAPES.items()):
        features = torch.randn(channels, h, w, generator=torch.Generator().manual_seed(n))
        grid = {"features": features, "image_size": (h * 32 - 5, w * 32 - 9), "stride": (32.0, 32.0)}
        out.append(grid_record(image_id, 480 + n, 640 - n, grid, fp16))
    return out


def write(fmt, output_dir, recs):
    cls = LAYOUTS[fmt]
    writer = cls(str(output_dir), 0, 1)
    writer.write([dict(r, image_id=cls.key(r["image_id"])) for r in recs])
    writer.close()
    cls.merge(str(output_dir), 1)
    return os.path.join(str(output_dir), cls.output_name)


def grid_feats_vqa_load(folder, split, image_id):
    """What grid-feats-vqa's consumers (MCAN-grid's loaders) do: torch.load the (1, C, H, W) .pth."""
    return torch.load(os.path.join(folder, split, f"{image_id}.pth"), map_location="cpu")


def mmf_chw_read(path, max_features):
    """mmf's CHWFeatureReader: np.load a 4-d (1, C, h, w) array, zero-pad it to (C, P, P)."""
    feat = torch.from_numpy(np.load(path))
    assert feat.shape[0] == 1, "batch is not 1"
    b, c, h, w = feat.shape
    patch = math.ceil(math.sqrt(max_features))
    padded = torch.zeros((b, c, patch, patch), dtype=torch.float)
    padded[:, :, :h, :w] = feat
    return padded.squeeze(0)


@pytest.mark.parametrize("fmt", GRID_LAYOUTS)
def test_read_features_gives_back_the_grids(tmp_path, fmt):
    recs = records()
    path = write(fmt, tmp_path, recs)
    back = list(read_features(path, fmt))
    assert len(back) == len(recs)
    for rec, got in zip(recs, back):
        assert got["image_id"] == LAYOUTS[fmt].key(rec["image_id"])
        np.testing.assert_array_equal(got["grid"], rec["grid"])
        if fmt in ("grid_npz", "grid_hdf5"):  # ours keep the whole record
            assert got["image_id"] == rec["image_id"]
            for key in ("image_h", "image_w"):
                assert got[key] == rec[key]
            np.testing.assert_array_equal(got["grid_size"], rec["grid_size"])
            np.testing.assert_array_equal(got["grid_stride"], rec["grid_stride"])


def test_grid_feats_vqa_layout_is_what_its_loaders_read(tmp_path):
    recs = records()
    folder = write("grid_feats", tmp_path, recs)
    assert folder == os.path.join(str(tmp_path), "features")
    for rec, image_id in zip(recs, (1, 2)):
        tensor = grid_feats_vqa_load(folder, "val2014", image_id)
        assert tensor.dtype == torch.float32 and tensor.shape == (1,) + rec["grid"].shape
        torch.testing.assert_close(tensor[0], torch.from_numpy(rec["grid"]))


def test_mmf_grid_layout_pads_as_its_chw_reader(tmp_path):
    recs = records(fp16=True)
    folder = write("grid_mmf", tmp_path, recs)
    for rec in recs:
        path = os.path.join(folder, rec["image_id"] + ".npy")
        assert np.load(path).dtype == np.float16  # --fp16: its reader casts to float32
        padded = mmf_chw_read(path, max_features=64)
        h, w = rec["grid"].shape[1:]
        assert padded.shape == (6, 8, 8)
        torch.testing.assert_close(padded[:, :h, :w], torch.from_numpy(rec["grid"]).float())
        assert not padded[:, h:, :].any() and not padded[:, :, w:].any()


def test_fp16_grids(tmp_path):
    recs = records(fp16=True)
    for fmt in ("grid_npz", "grid_hdf5", "grid_feats"):
        (got, _) = read_features(write(fmt, tmp_path / fmt, recs), fmt)
        assert got["grid"].dtype == np.float16
        np.testing.assert_array_equal(got["grid"], recs[0]["grid"])


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path[:0] = [{repo!r}, {tests!r}]
    from test_grid_formats import records, LAYOUTS
    cls = LAYOUTS[{fmt!r}]
    writer = cls({out!r}, 0, 1)
    rec = records()[0]
    writer.write([dict(rec, image_id=cls.key(rec["image_id"]))])
    print("written", flush=True)
    time.sleep(60)
    """
)


def test_resume_after_sigkill(tmp_path, fmt="grid_hdf5"):
    """A writer killed after one image: a new one sees it written, adds the other, merges."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = KILLED_WRITER.format(repo=os.path.dirname(here), tests=here, fmt=fmt, out=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    cls = LAYOUTS[fmt]
    recs = records()
    writer = cls(str(tmp_path), 0, 1)
    keys = [cls.key(r["image_id"]) for r in recs]
    assert writer.written() == {keys[0]}
    writer.write([dict(recs[1], image_id=keys[1])])
    writer.close()
    cls.merge(str(tmp_path), 1)
    back = list(cls.read(os.path.join(str(tmp_path), cls.output_name)))
    assert [r["image_id"] for r in back] == keys
    for rec, got in zip(recs, back):
        np.testing.assert_array_equal(got["grid"], rec["grid"])


@pytest.fixture(scope="module")
def grid_model(tmp_path_factory):
    """configs/grid/R-50-grid.yaml, narrow, random weights saved where MODEL.WEIGHTS points."""
    from test_grid import narrow_grid_cfg

    from detectron2.modeling import build_model

    folder = tmp_path_factory.mktemp("grid_model")
    cfg = narrow_grid_cfg()
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, folder / "model.pth")
    cfg.MODEL.WEIGHTS = str(folder / "model.pth")
    images = folder / "images"
    images.mkdir()
    from PIL import Image

    from helpers import image

    for n, (h, w) in enumerate([(120, 170), (150, 110)]):
        bgr = image(n, h, w).permute(1, 2, 0).numpy().astype(np.uint8)
        Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])).save(images / f"COCO_val2014_00000000000{n + 1}.png")
    return cfg, images


def test_extract_net_writes_the_predictors_grid(grid_model, tmp_path):
    from d2_regionfeat.extraction import extract, prepare_job
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor

    cfg, images = grid_model
    cfg = cfg.clone()
    cfg.freeze()
    out = str(tmp_path / "out")
    job = prepare_job(cfg, str(images), out, ["grid_npz", "grid_feats", "npz"], 1, num_workers=0, batch_size=2)
    extract(job)
    predictor = DefaultPredictor(cfg)
    grids = {r["image_id"]: r for r in read_features(out, "grid_npz")}
    pth = {r["image_id"]: r["grid"] for r in read_features(os.path.join(out, "features"), "grid_feats")}
    regions = {r["image_id"]: r for r in read_features(out, "npz")}
    for n, name in enumerate(sorted(os.listdir(images))):
        stem = name[:-4]
        expected = predictor(read_image(str(images / name), "BGR"))
        np.testing.assert_allclose(grids[stem]["grid"], expected["grid"]["features"].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(pth[str(n + 1)], grids[stem]["grid"])
        assert tuple(grids[stem]["grid_size"]) == expected["grid"]["image_size"]
        assert regions[stem]["num_bbox"] == len(expected["instances"])


def test_extract_net_grid_only(grid_model, tmp_path):
    from d2_regionfeat.extraction.manifest import read_manifest
    from d2_regionfeat.extraction import ExtractionError, extract, prepare_job

    cfg, images = grid_model
    cfg = cfg.clone()
    cfg.MODEL.REGION_FEATURES.GRID.ONLY = True
    cfg.freeze()
    with pytest.raises(ExtractionError, match="--format npz holds regions, which MODEL.REGION_FEATURES.GRID.ONLY"):
        prepare_job(cfg, str(images), str(tmp_path / "refused"), ["grid_hdf5", "npz"], 1)
    out = str(tmp_path / "out")
    extract(prepare_job(cfg, str(images), out, ["grid_hdf5", "grid_mmf"], 1, num_workers=0, fp16=True))
    back = list(read_features(os.path.join(out, "grid.h5"), "grid_hdf5"))
    assert len(back) == 2 and all(r["grid"].dtype == np.float16 for r in back)
    counts = read_manifest(out)["counts"]
    assert counts["written"] == 2 and counts["no_regions"] == 0  # a grid is no missing region


def test_grid_layouts_need_the_grid(tmp_path):
    from d2_regionfeat.extraction import ExtractionError, prepare_job

    from helpers import make_cfg

    cfg = make_cfg("fpn")
    cfg.MODEL.WEIGHTS = __file__
    with pytest.raises(ExtractionError, match="--format grid_feats needs the grid: MODEL.REGION_FEATURES.GRID.ENABLED"):
        prepare_job(cfg, str(tmp_path), str(tmp_path / "out"), ["grid_feats"], 1)


def test_convert_features_between_grid_layouts(grid_model, tmp_path):
    from d2_regionfeat.extraction.convert import ConversionError, convert
    from d2_regionfeat.extraction import extract, prepare_job

    cfg, images = grid_model
    cfg = cfg.clone()
    cfg.MODEL.REGION_FEATURES.GRID.ONLY = True
    cfg.freeze()
    source = str(tmp_path / "source")
    extract(prepare_job(cfg, str(images), source, ["grid_hdf5"], 1, num_workers=0))
    with pytest.raises(ConversionError, match="mixes grid and region layouts"):
        convert(source, ["grid_npz", "npz"], str(tmp_path / "mixed"))
    target = str(tmp_path / "target")
    convert(source, ["grid_npz", "grid_feats", "grid_mmf"], target, id_mode="int")
    originals = {str(int(r["image_id"][-1])): r["grid"] for r in read_features(os.path.join(source, "grid.h5"), "grid_hdf5")}
    for fmt in ("grid_npz", "grid_feats", "grid_mmf"):
        back = {r["image_id"]: r["grid"] for r in read_features(target, fmt)}
        assert sorted(back) == sorted(originals), fmt
        for key, grid in back.items():
            np.testing.assert_array_equal(grid, originals[key])
