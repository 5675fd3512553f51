# moesaic: every target installs what it needs into a project-local .venv
# (or into the virtual environment that is already active).
SHELL := /bin/bash
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := $(CURDIR)/.venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moesaic-installed
NPROC ?= 4
# pytest-xdist workers for `make test`: 2 keeps both cores of the development machine busy while
# one test's ranks wait (on a rendezvous, a checkpoint, SLURM); TEST_WORKERS=0 runs in one process
TEST_WORKERS ?= 2
export OMP_NUM_THREADS ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_SILENT ?= true

.PHONY: install demo test test-fast clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) setup.cfg pyproject.toml constraints.txt
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The main job: train the default MoE model on 4 CPU ranks (gloo), or 1 GPU per rank (nccl).
demo: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m moesaic.trainer $(ARGS)

## The whole test suite (CI runs this).
test: install
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

## Everything but the multi-process tests.
test-fast: install
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf outputs .pytest_cache build *.egg-info
