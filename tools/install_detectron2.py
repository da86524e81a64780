#!/usr/bin/env python
"""Make ``import detectron2`` work in the current Python environment.

If a detectron2 is already importable (a user's own build from source, any recent
version) nothing is done. Otherwise the sdist of upstream v0.6 published as
``pb1-detectron2==0.6`` is installed with the fixes it needs to run on CPU:

* its ``setup()`` loses ``ext_modules=``/``cmdclass=``: the sdist lacks
  ``detectron2/layers/csrc``, so the C++/CUDA extension cannot be built;
* a pure-Python ``detectron2/_C.py`` stands in for the extension, raising a clear
  error on attribute access (only rotated-box and deformable ops need it);
* ``setuptools<81`` (``model_zoo`` imports ``pkg_resources``) and ``pillow<10`` are
  pinned, and it is installed with ``--no-build-isolation`` after torch;
* the ``model_zoo/configs`` folder of the sdist is copied into the installed package.

Run with the interpreter of the target environment::

    python tools/install_detectron2.py
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

SDIST = "pb1-detectron2==0.6"
PINS = ["setuptools<81", "pillow<10"]

STUB_C = '''"""Stand-in for detectron2's compiled extension, which this install does not build.

Installed by d2_regionfeat's tools/install_detectron2.py. Everything but rotated-box and
deformable-convolution ops works without it.
"""


def __getattr__(name):
    raise ImportError(
        f"detectron2._C.{name} is unavailable: this detectron2 was installed without its "
        "compiled extension (rotated-box and deformable ops need it). Build detectron2 from "
        "source to use them."
    )
'''


def detectron2_importable():
    probe = subprocess.run([sys.executable, "-c", "import detectron2"], capture_output=True)
    return probe.returncode == 0


def pip(*args):
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def patch_setup(src_dir):
    """Drop the extension build from the sdist's setup() call."""
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


def installed_package_dir():
    out = subprocess.check_output(
        [sys.executable, "-c", "import detectron2, os; print(os.path.dirname(detectron2.__file__))"]
    )
    return out.decode().strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="install even if detectron2 imports")
    args = parser.parse_args()
    if detectron2_importable() and not args.force:
        print("detectron2 is already importable; nothing to do")
        return
    pip("install", "-q", *PINS)
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "-q", "--no-deps", "--no-build-isolation", "-d", tmp, SDIST)
        (archive,) = glob.glob(os.path.join(tmp, "*.tar.gz"))
        shutil.unpack_archive(archive, tmp)
        (src_dir,) = [p for p in glob.glob(os.path.join(tmp, "*")) if os.path.isdir(p)]
        patch_setup(src_dir)
        pip("install", "-q", "--no-build-isolation", *PINS, src_dir)
        configs = os.path.join(src_dir, "detectron2", "model_zoo", "configs")
        target = os.path.join(installed_package_dir(), "model_zoo", "configs")
        shutil.copytree(configs, target, dirs_exist_ok=True)
    if not detectron2_importable():
        raise SystemExit("detectron2 was installed but still does not import")
    print("installed", SDIST, "without its compiled extension")


if __name__ == "__main__":
    main()
