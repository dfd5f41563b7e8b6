# medhybrid: two commands for a fresh machine — `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
SHARED_DATA ?= ../shared/data
DEMO_OUT ?= demo_out

.PHONY: install browser demo test test-slow fuzz lint bench bench-train bench-infer bench-compare manifests clean

install: $(VENV)/.installed

# torch is pinned first: 2.13.0 is the CPU wheel on this machine; an unpinned torch pulls CUDA builds.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Headless Chromium and its WebDriver for the report tests (rendering; the viewer driven by Selenium): Debian's
# chromium and chromium-driver, installed when we are root with apt-get; elsewhere those tests skip and say why.
BROWSER_PACKAGES := chromium chromium-driver
browser:
	@{ { command -v chromium || command -v chromium-browser; } && command -v chromedriver; } >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES) >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES) >/dev/null 2>&1; }; }; } || \
	echo "chromium/chromium-driver could not be installed: the browser tests will be skipped"

# The demo: a synthetic cohort of 200 phantoms (NIfTI), the demo pipeline trains on it, `evaluate` scores it on
# the cohort's test split (CIs, calibration fitted on val and stored in the model), then `infer` reports on 16 new
# phantoms (another seed: unseen patients) given as a folder of DICOM studies; the last lines state the test AUROC and Dice and how the worklist ranks the new lesion studies.
demo: install
	rm -rf $(DEMO_OUT)/cohort $(DEMO_OUT)/run $(DEMO_OUT)/evaluation $(DEMO_OUT)/new_studies $(DEMO_OUT)/reports
	$(BIN)/medhybrid data synth $(DEMO_OUT)/cohort --n 200 --dims 3 --format nifti --seed 0
	$(BIN)/medhybrid data validate $(DEMO_OUT)/cohort/manifest.csv
	$(BIN)/medhybrid train pipelines/demo.yaml --set data.manifest=$(abspath $(DEMO_OUT))/cohort/manifest.csv --out $(DEMO_OUT)/run
	$(BIN)/medhybrid evaluate --model $(DEMO_OUT)/run --manifest $(DEMO_OUT)/cohort/manifest.csv --split test --out $(DEMO_OUT)/evaluation
	$(BIN)/medhybrid data synth $(DEMO_OUT)/new_studies --n 16 --dims 3 --format dicom --seed 1
	$(BIN)/medhybrid infer $(DEMO_OUT)/new_studies/dicom --model $(DEMO_OUT)/run --out $(DEMO_OUT)/reports
	$(PY) -m medhybrid.evaluate.demo_summary $(DEMO_OUT)/evaluation $(DEMO_OUT)/reports $(DEMO_OUT)/new_studies/manifest.csv

test: install browser
	$(PY) -m pytest -q

# The long fuzzing campaign (tests/fuzz/harness.py): 20,000 mutated real DICOM/NIfTI files, each bounded by
# 10 s and 2 GiB; prints the outcome counts and exits non-zero on any uncaught error, hang or crash (their
# replayable specs go to fuzz_failures.json: add them to tests/fuzz/regressions.json once fixed).
FUZZ_CASES ?= 20000
FUZZ_SEED ?= 1
fuzz: install
	$(PY) -m tests.fuzz.harness --cases $(FUZZ_CASES) --seed $(FUZZ_SEED) --workers 2 --shared $(SHARED_DATA)

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(BIN)/ruff check medhybrid tests benchmarks
	$(BIN)/ruff format --check medhybrid tests benchmarks
	$(BIN)/mypy medhybrid

bench: install
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/models.py --json

# Training benchmark: 5-fold cross-validation (out-of-fold figures) of the shipped pipelines, about two hours on
# 2 cores; needs `make manifests` and ../shared/data.
bench-train: install
	$(PY) benchmarks/train.py

# Inference benchmark: 200 synthetic studies (throughput, model time share, RSS) and a 512x512x400 CT (peak RSS).
bench-infer: install
	$(PY) benchmarks/infer.py

# Hybrid vs ResNet-only vs Transformer-only (PneumoniaMNIST) and vs UNETR and a U-Net (Hippocampus): about an
# hour on 2 cores; needs `make manifests` and ../shared/data. Tables in benchmarks/runs/compare_*/compare.md.
bench-compare: install
	$(PY) benchmarks/compare.py

# Manifests for ../shared/data (MedMNIST samples are written out as files, so they are generated, not shipped).
manifests: install
	$(BIN)/medhybrid data import-msd $(SHARED_DATA)/msd_hippocampus data_manifests/hippocampus --mask-kind anatomy
	$(BIN)/medhybrid data import-medmnist $(SHARED_DATA)/medmnist/pneumoniamnist_trainval.npz data_manifests/generated/pneumoniamnist
	$(BIN)/medhybrid data import-medmnist $(SHARED_DATA)/medmnist/adrenalmnist3d_trainval.npz data_manifests/generated/adrenalmnist3d
	$(BIN)/medhybrid data import-medmnist $(SHARED_DATA)/medmnist/adrenalmnist3d_64_trainval.npz data_manifests/generated/adrenalmnist3d_64

clean:
	rm -rf $(DEMO_OUT) runs benchmarks/runs .pytest_cache .ruff_cache .mypy_cache
