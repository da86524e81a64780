"""
Session-scoped models shared by the test modules: built and tamed once per session, not
once per module; and the CPU kernel path the suite runs on.

Kernel path: ``D2RF_TEST_MKLDNN=0|1`` turns oneDNN off or on, ``D2RF_TEST_THREADS=N`` sets
torch's intra-op threads, and torch's own ``ATEN_CPU_CAPABILITY=default|avx2|avx512`` picks
the vectorised kernels. ``make test`` runs the tests marked ``equality`` (those stating two
computations equal) again under other paths than the suite's, so that a test that holds on
this CPU only is caught here, not on another machine.
"""
import os
from types import SimpleNamespace

import pytest
import torch

from detectron2.engine import DefaultPredictor
from helpers import build, make_cfg


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "equality: states two computations equal (exact in float64, or float32 within "
        "a tolerance of the tensors' scale); rerun under other CPU kernel paths by make test",
    )
    if "D2RF_TEST_MKLDNN" in os.environ:
        torch.backends.mkldnn.enabled = os.environ["D2RF_TEST_MKLDNN"] == "1"
    if os.environ.get("D2RF_TEST_THREADS"):
        torch.set_num_threads(int(os.environ["D2RF_TEST_THREADS"]))


def pytest_report_header(config):
    return (
        f"kernel path: oneDNN {'on' if torch.backends.mkldnn.enabled else 'off'}, "
        f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """
    The tools' model: a small tamed FPN model (ResNet-18, 36-region style selection) saved
    as yaml + weights, with its DefaultPredictor (tests/test_extract_net.py, test_formats.py,
    test_names.py; a module's own ``model`` fixture takes its place there).
    """
    folder = tmp_path_factory.mktemp("model")
    cfg = make_cfg("fpn", SELECTION="regions", MIN_BOXES=3, MAX_BOXES=8)
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 192
    torch.save({"model": build(cfg).state_dict()}, folder / "model.pth")
    cfg.MODEL.WEIGHTS = str(folder / "model.pth")
    (folder / "model.yaml").write_text(cfg.dump())
    return SimpleNamespace(cfg=cfg, yaml=folder / "model.yaml", predictor=DefaultPredictor(cfg))


