# medhybrid: two commands for a fresh machine — `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
SHARED_DATA ?= ../shared/data
DEMO_OUT ?= demo_out

.PHONY: install demo test test-slow lint bench bench-train manifests clean

install: $(VENV)/.installed

# torch is pinned first: 2.13.0 is the CPU wheel on this machine; an unpinned torch pulls CUDA builds.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The demo: a synthetic cohort (real DICOM series + NIfTI), then the demo pipeline trains on it (< 2 min, 2 cores).
demo: install
	rm -rf $(DEMO_OUT)/cohort $(DEMO_OUT)/run
	$(BIN)/medhybrid data synth $(DEMO_OUT)/cohort --n 60 --dims 3 --format both --seed 0
	$(BIN)/medhybrid data validate $(DEMO_OUT)/cohort/manifest.csv
	$(BIN)/medhybrid train pipelines/demo.yaml --set data.manifest=$(abspath $(DEMO_OUT))/cohort/manifest.csv --out $(DEMO_OUT)/run

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

# Training benchmark (tens of minutes on 2 cores): needs `make manifests` and ../shared/data.
bench-train: install
	$(PY) benchmarks/train.py

# Manifests for ../shared/data (MedMNIST samples are written out as files, so they are generated, not shipped).
manifests: install
	$(BIN)/medhybrid data import-msd $(SHARED_DATA)/msd_hippocampus data_manifests/hippocampus
	$(BIN)/medhybrid data import-medmnist $(SHARED_DATA)/medmnist/pneumoniamnist_trainval.npz data_manifests/generated/pneumoniamnist
	$(BIN)/medhybrid data import-medmnist $(SHARED_DATA)/medmnist/adrenalmnist3d_trainval.npz data_manifests/generated/adrenalmnist3d
	$(BIN)/medhybrid data import-medmnist $(SHARED_DATA)/medmnist/adrenalmnist3d_64_trainval.npz data_manifests/generated/adrenalmnist3d_64

clean:
	rm -rf $(DEMO_OUT) runs benchmarks/runs .pytest_cache .ruff_cache .mypy_cache
