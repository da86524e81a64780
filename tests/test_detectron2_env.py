"""The environment's detectron2 behaves like a real one.

With the detectron2 that tools/install_detectron2.py installs (no compiled extension), the
``_C`` stand-in answers detectron2's build queries honestly and every compiled op raises one
clear ImportError; the install puts no package but ``detectron2`` on sys.path. With a
detectron2 built from source, the stand-in checks are skipped.
"""
import importlib.metadata
import os
import re

import pytest
import torch
from pycocotools.coco import COCO

import detectron2
import detectron2._C
from detectron2.evaluation.fast_eval_api import COCOeval_opt
from detectron2.layers import ROIAlignRotated, nms_rotated
from detectron2.structures import RotatedBoxes, pairwise_iou_rotated
from detectron2.utils.collect_env import collect_env_info

# The line that marks the stand-in written by tools/install_detectron2.py.
STAND_IN_MARK = "Installed by d2_regionfeat's tools/install_detectron2.py."


def _is_stand_in():
    path = detectron2._C.__file__
    if not path.endswith(".py"):
        return False
    with open(path) as f:
        return STAND_IN_MARK in f.read()


STAND_IN = _is_stand_in()
stand_in_only = pytest.mark.skipif(not STAND_IN, reason="detectron2 has its compiled extension")

NOT_COMPILED = (
    r"^detectron2\._C\.{} is unavailable: this detectron2 was installed without its compiled "
    r"extension \(rotated-box, deformable-convolution and fast COCO-evaluation ops need it\); "
    r"build detectron2 from source to use them$"
)


def test_collect_env_info_describes_the_build():
    info = collect_env_info()
    assert re.search(r"^detectron2 +\S+ @", info, re.M)
    if STAND_IN:
        assert re.search(r"^Compiler +not compiled$", info, re.M)
        assert re.search(r"^CUDA compiler +not compiled$", info, re.M)


@stand_in_only
def test_build_queries_say_not_compiled():
    assert detectron2._C.get_compiler_version() == "not compiled"
    assert detectron2._C.get_cuda_version() == "not compiled"
    assert detectron2._C.has_cuda() is False
    # Module protocol probes (hasattr of private names) see an ordinary module.
    assert not hasattr(detectron2._C, "__path__")
    assert not hasattr(detectron2._C, "_private")


def _rotated(n):
    """(n, 5) rotated boxes (cx, cy, w, h, angle)."""
    return torch.tensor([[20.0 + 5 * i, 20.0, 10.0, 6.0, 30.0] for i in range(n)])


def _fast_coco_eval():
    """detectron2's COCOeval (COCOEvaluator's default) of one detection against one object."""
    box = {"image_id": 1, "category_id": 1, "bbox": [2, 2, 9, 9]}
    truth = COCO()
    truth.dataset = {
        "images": [{"id": 1, "height": 32, "width": 32}],
        "annotations": [dict(box, id=1, area=81, iscrowd=0)],
        "categories": [{"id": 1, "name": "thing"}],
    }
    truth.createIndex()
    COCOeval_opt(truth, truth.loadRes([dict(box, score=0.9)]), "bbox").evaluate()


OPS = {
    # name of the compiled op -> a public detectron2 call that needs it
    "box_iou_rotated": lambda: pairwise_iou_rotated(
        RotatedBoxes(_rotated(2)), RotatedBoxes(_rotated(3))
    ),
    "nms_rotated": lambda: nms_rotated(_rotated(3), torch.rand(3), 0.5),
    "roi_align_rotated_forward": lambda: ROIAlignRotated((7, 7), 1.0, 0)(
        torch.rand(1, 4, 32, 32), torch.cat([torch.zeros(2, 1), _rotated(2)], dim=1)
    ),
    "InstanceAnnotation": _fast_coco_eval,
    # deformable convolutions call these on CUDA only
    "deform_conv_forward": lambda: detectron2._C.deform_conv_forward,
    "modulated_deform_conv_forward": lambda: detectron2._C.modulated_deform_conv_forward,
}


@stand_in_only
@pytest.mark.parametrize("op", sorted(OPS))
def test_compiled_ops_raise_one_clear_import_error(op):
    with pytest.raises(ImportError, match=NOT_COMPILED.format(op)):
        OPS[op]()


def _distribution_of(package):
    """The installed distribution whose files hold the imported ``package``, or None."""
    init_file = os.path.realpath(package.__file__)
    for name in importlib.metadata.packages_distributions().get(package.__name__, []):
        dist = importlib.metadata.distribution(name)
        if os.path.realpath(dist.locate_file(f"{package.__name__}/__init__.py")) == init_file:
            return dist
    return None


@stand_in_only
def test_install_puts_no_stray_top_level_packages():
    dist = _distribution_of(detectron2)
    if dist is None:
        pytest.skip("detectron2 is a source tree on the path, not an installed distribution")
    tops = {file.parts[0] for file in dist.files}
    stray = {t for t in tops if not t.endswith((".dist-info", ".egg-info")) and t != ".."}
    stray -= {"detectron2"}
    assert not stray, f"{dist.metadata['Name']} installed top-level {sorted(stray)}"
    site = dist.locate_file("")
    # detectron2's scripts package, left by earlier installs, shadows any project's tools/.
    assert not os.path.exists(os.path.join(site, "tools", "__init__.py"))
