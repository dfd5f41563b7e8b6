# medhybrid: two commands for a fresh machine — `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
SHARED_DATA ?= ../shared/data
DEMO_OUT ?= demo_out

.PHONY: install demo test test-slow lint bench manifests clean

install: $(VENV)/.installed

# torch is pinned first: 2.13.0 is the CPU wheel on this machine; an unpinned torch pulls CUDA builds.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/medhybrid data synth $(DEMO_OUT)/cohort --n 12 --dims 3 --format both --seed 0
	$(BIN)/medhybrid data scan $(DEMO_OUT)/cohort

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(BIN)/ruff check medhybrid tests benchmarks
	$(BIN)/ruff format --check medhybrid tests benchmarks
	$(BIN)/mypy medhybrid

bench: install
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/models.py --json

# Manifests for ../shared/data (MedMNIST samples are written out as files, so they are generated, not shipped).
manifests: install
	$(BIN)/medhybrid data import-msd $(SHARED_DATA)/msd_hippocampus data_manifests/hippocampus
	$(BIN)/medhybrid data import-medmnist $(SHARED_DATA)/medmnist/pneumoniamnist_trainval.npz data_manifests/generated/pneumoniamnist
	$(BIN)/medhybrid data import-medmnist $(SHARED_DATA)/medmnist/adrenalmnist3d_trainval.npz data_manifests/generated/adrenalmnist3d
	$(BIN)/medhybrid data import-medmnist $(SHARED_DATA)/medmnist/adrenalmnist3d_64_trainval.npz data_manifests/generated/adrenalmnist3d_64

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache .mypy_cache
