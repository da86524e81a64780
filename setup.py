from setuptools import find_packages, setup

setup(
    name="d2_regionfeat",
    version="0.1.0",
    description="Region features from detectron2 detectors, through config keys alone",
    packages=find_packages(include=["d2_regionfeat", "d2_regionfeat.*"]),
    package_data={"d2_regionfeat": ["pretrained/*.yaml", "pretrained/*.pth"]},
    python_requires=">=3.8",
    # detectron2 itself is installed by tools/install_detectron2.py (it is not on PyPI by name).
    install_requires=["torch", "fvcore", "numpy", "tqdm", "h5py", "lmdb", "fsspec"],
    extras_require={
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "webdataset"],
        "bench": ["psutil"],
        # --engine ray (d2_regionfeat/extraction/ray_engine.py); tested on Ray 2.60, and Ray 2.64
        # removes map_batches' **ray_remote_args, which passes max_task_retries
        "ray": ["ray[data]>=2.60,<2.64"],
    },
)
