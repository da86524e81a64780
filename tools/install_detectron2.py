#!/usr/bin/env python
"""Make ``import detectron2`` work in the current Python environment.

If a detectron2 is already importable (a user's own build from source, any recent
version) nothing is done. Otherwise the sdist of upstream v0.6 published as
``pb1-detectron2==0.6`` is installed with the fixes it needs to run on CPU:

* its ``setup()`` loses ``ext_modules=``/``cmdclass=``: the sdist lacks
  ``detectron2/layers/csrc``, so the C++/CUDA extension cannot be built;
* a pure-Python ``detectron2/_C.py`` stands in for the extension: the build queries of
  ``collect_env_info()`` answer "not compiled", and every op of the extension (rotated
  boxes, deformable convolutions, fast COCO evaluation) raises a one-line ImportError;
* the sdist's top-level packages other than ``detectron2`` (``tools``, detectron2's
  scripts) are not installed: they would shadow any project's own ``tools``;
* ``setuptools<81`` (``model_zoo`` imports ``pkg_resources``) and ``pillow<10`` are
  pinned, and it is installed with ``--no-build-isolation`` after torch;
* the sdist's ``detectron2/model_zoo/configs`` folder is moved to the top, where setup()
  takes the model-zoo configs from (as in a source checkout): they are installed as package
  data, and recorded, so that ``pip uninstall pb1-detectron2`` leaves nothing behind.

A detectron2 installed by an earlier version of this script (its stand-in differs from
the current one, or stray packages are left) is installed again.

Run with the interpreter of the target environment::

    python tools/install_detectron2.py
"""
import argparse
import glob
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile

SDIST = "pb1-detectron2==0.6"
DIST_NAME = "pb1-detectron2"
PINS = ["setuptools<81", "pillow<10"]
# The line that tells our stand-in from a real extension (and from a user's own file).
MARK = "Installed by d2_regionfeat's tools/install_detectron2.py."

STUB_C = f'''"""Stand-in for detectron2's compiled extension, which this install does not build.

{MARK} detectron2's pure-Python
code runs without the extension: its build queries answer "not compiled", and each op the
extension provides (rotated boxes, deformable convolutions, fast COCO evaluation) raises
ImportError when it is used.
"""
import torch

_MESSAGE = (
    "detectron2._C.{{}} is unavailable: this detectron2 was installed without its compiled "
    "extension (rotated-box, deformable-convolution and fast COCO-evaluation ops need it); "
    "build detectron2 from source to use them"
)


def get_compiler_version():
    return "not compiled"


def get_cuda_version():
    return "not compiled"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("_"):
        raise AttributeError(f"module {{__name__!r}} has no attribute {{name!r}}")
    raise ImportError(_MESSAGE.format(name))


def _unavailable_op(name):
    def op(*args, **kwargs):
        raise ImportError(_MESSAGE.format(name))

    return op


# The ops the extension registers with torch (torch.ops.detectron2.*), with their schemas.
_TORCH_OPS = {{
    "nms_rotated": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "box_iou_rotated": "(Tensor boxes1, Tensor boxes2) -> Tensor",
    "roi_align_rotated_forward": "(Tensor input, Tensor rois, float spatial_scale, "
    "int pooled_height, int pooled_width, int sampling_ratio) -> Tensor",
    "roi_align_rotated_backward": "(Tensor grad, Tensor rois, float spatial_scale, "
    "int pooled_height, int pooled_width, int batch_size, int channels, int height, "
    "int width, int sampling_ratio) -> Tensor",
}}
_LIBRARY = torch.library.Library("detectron2", "DEF")
for _name, _schema in _TORCH_OPS.items():
    _LIBRARY.define(_name + _schema)
    _LIBRARY.impl(_name, _unavailable_op(_name), "CompositeExplicitAutograd")
'''


def detectron2_dir():
    """The folder of the detectron2 package this interpreter imports, or None."""
    code = "import detectron2, os; print(os.path.dirname(detectron2.__file__))"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def stray_packages():
    """Top-level names other than ``detectron2`` that the installed sdist put on sys.path."""
    importlib.invalidate_caches()
    try:
        files = importlib.metadata.distribution(DIST_NAME).files or []
    except importlib.metadata.PackageNotFoundError:
        return []
    tops = {file.parts[0] for file in files} - {"detectron2", ".."}  # "..": scripts in bin/
    return sorted(top for top in tops if not top.endswith((".dist-info", ".egg-info")))


def outdated_install(package_dir):
    """Why the detectron2 in ``package_dir``, installed by this script, must be installed
    again; None when it is current or was not installed by this script."""
    stand_in = os.path.join(package_dir, "_C.py")
    if not os.path.isfile(stand_in):
        return None
    with open(stand_in) as f:
        text = f.read()
    if MARK not in text:
        return None
    if text != STUB_C:
        return "its _C stand-in is outdated"
    stray = stray_packages()
    if stray:
        return f"it left stray top-level packages: {', '.join(stray)}"
    return None


def pip(*args):
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def patch_sdist(src_dir):
    """Drop the extension build from the sdist's setup() call, write the stand-in, put the
    model-zoo configs where setup() looks for them, and remove the top-level packages other
    than detectron2 so that find_packages() skips them."""
    path = os.path.join(src_dir, "setup.py")
    with open(path) as f:
        text = f.read()
    patched = re.sub(r"^\s*(ext_modules|cmdclass)=.*\n", "", text, flags=re.M)
    if patched.count("ext_modules=") or patched.count("cmdclass="):
        raise RuntimeError(f"could not remove the extension build from {path}")
    with open(path, "w") as f:
        f.write(patched)
    with open(os.path.join(src_dir, "detectron2", "_C.py"), "w") as f:
        f.write(STUB_C)
    shutil.move(os.path.join(src_dir, "detectron2", "model_zoo", "configs"), src_dir)
    for entry in os.listdir(src_dir):
        package = os.path.join(src_dir, entry)
        if entry != "detectron2" and os.path.isfile(os.path.join(package, "__init__.py")):
            shutil.rmtree(package)


def install():
    pip("install", "-q", *PINS)
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "-q", "--no-deps", "--no-build-isolation", "-d", tmp, SDIST)
        (archive,) = glob.glob(os.path.join(tmp, "*.tar.gz"))
        shutil.unpack_archive(archive, tmp)
        (src_dir,) = [p for p in glob.glob(os.path.join(tmp, "*")) if os.path.isdir(p)]
        patch_sdist(src_dir)
        # A local folder is always (re)installed: pip first removes an installed
        # pb1-detectron2 with every file it recorded (an earlier install's stray packages).
        pip("install", "-q", "--no-build-isolation", *PINS, src_dir)
    package_dir = detectron2_dir()
    if package_dir is None:
        raise SystemExit("detectron2 was installed but still does not import")
    if not os.path.isfile(os.path.join(package_dir, "model_zoo", "configs", "Base-RCNN-FPN.yaml")):
        raise SystemExit("detectron2 was installed without its model-zoo configs")
    problem = outdated_install(package_dir)
    if problem:
        raise SystemExit(f"detectron2 was installed but {problem}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="install even if detectron2 imports")
    args = parser.parse_args()
    package_dir = detectron2_dir()
    if package_dir is not None and not args.force:
        problem = outdated_install(package_dir)
        if problem is None:
            print("detectron2 is already importable; nothing to do")
            return
        print(f"reinstalling the detectron2 at {package_dir}: {problem}")
    install()
    print("installed", SDIST, "without its compiled extension")


if __name__ == "__main__":
    main()
