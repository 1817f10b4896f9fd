# Two commands on a fresh machine (set-up included): `make bench` (the main job) and `make test`.
PYTHON ?= python3
TORCH_VERSION ?= 2.14.1
CSRC := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: install test bench lint format

install: .install-stamp

# torch first (the extension is compiled against it), then the package with --no-build-isolation so pip
# does not build against a different torch in an isolated environment.
.install-stamp: setup.py pyproject.toml $(CSRC)
	$(PYTHON) -m pip install --quiet "torch==$(TORCH_VERSION)" ninja "setuptools>=64" wheel
	$(PYTHON) -m pip install --quiet --no-build-isolation -e ".[test,bench,dev]"
	$(PYTHON) -c "import lowrank; print('lowrank built; CUDA kernels compiled in:', lowrank.WITH_CUDA)"
	touch $@

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) -m benchmarks --quick

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	clang-format --dry-run --Werror $(CSRC)

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .
	clang-format -i $(CSRC)
