# The README's commands. VENV may point elsewhere (CI caches it outside the clone).
VENV ?= .venv
PY := $(VENV)/bin/python
# Dependencies are reinstalled only when what decides them changes.
DEPS_HASH := $(shell cat setup.py tools/install_detectron2.py Makefile | sha1sum | cut -c1-12)
DEPS_STAMP := $(VENV)/.deps-$(DEPS_HASH)

.PHONY: install test demo bench

$(PY):
	python3 -m venv $(VENV)

# torch and detectron2 already in the environment (VENV pointing at your own) are kept.
$(DEPS_STAMP): | $(PY)
	$(PY) -m pip install -q "setuptools<81" wheel
	$(PY) -c "import torch, torchvision" 2>/dev/null || \
		$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,ray]"
	rm -f $(VENV)/.deps-* && touch $@

# The editable install is cheap; redoing it makes a cached venv point at this checkout.
install: $(DEPS_STAMP)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .

# The suite on both cores (one torch thread per worker), then the tests marked equality
# again on other CPU kernel paths (tests/conftest.py): oneDNN off, 1 thread, no vector
# kernels; oneDNN on, 2 threads, AVX2. A result that holds on this CPU only fails here.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal --durations=15 tests
	D2RF_TEST_MKLDNN=0 D2RF_TEST_THREADS=1 ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -m equality tests
	D2RF_TEST_MKLDNN=1 D2RF_TEST_THREADS=2 ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q -m equality tests

# The benchmarks (bench/README.md), at settings that take minutes on 2 cores: tables printed,
# JSON in bench/results/. One torch thread per process: ratios stay fair on a busy machine.
BENCH := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY)
bench: install
	$(BENCH) bench/bench_heads.py
	$(BENCH) bench/bench_extract.py
	$(BENCH) bench/bench_memory.py
	$(BENCH) bench/bench_writers.py
	$(BENCH) bench/bench_amp.py
	$(BENCH) bench/bench_large.py
	$(BENCH) bench/bench_streaming.py
	$(BENCH) bench/bench_vinvl.py
	$(BENCH) bench/bench_shards.py

# The shipped default model over demo/images: features (.npz) and overview.png in demo_out/.
demo: install
	$(PY) tools/demo.py --output demo_out
