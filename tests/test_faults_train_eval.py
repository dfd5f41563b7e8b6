"""SIGKILL ``medhybrid train`` and ``medhybrid evaluate`` at named points and check what is left behind:
nothing that looks complete when it is not, and a rerun (``train --resume``, evaluate again) that gives
the same result as an uninterrupted run.

The kills are exact: ``MEDHYBRID_FAULT_POINT=NAME[:N]`` makes the process SIGKILL itself the N-th time it
passes a named point (:func:`medhybrid.train.records.fault_point`), so no test races a timer. Training on
CPU with one thread is deterministic (generators re-derived from ``(seed, epoch)``, see
:mod:`medhybrid.train.loop`), so the resumed run's weights are compared bit for bit.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from medhybrid.cli import app
from medhybrid.config import load_pipeline
from medhybrid.io.readers import read_image
from medhybrid.train import load_checkpoint, train
from medhybrid.train.checkpoint import DIGEST_KEY
from medhybrid.train.records import FAULT_ENV, finished_run, read_metrics
from tests.easy_cohort import easy_pipeline, write_easy_cohort

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
TIMING = ("epoch_seconds", "elapsed_seconds", "updated", "created", "wall_seconds", "seconds_per_study")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 16-study 2D cohort, a 3-epoch pipeline of a tiny hybrid (one thread), and its uninterrupted run."""
    root = tmp_path_factory.mktemp("faults")
    manifest = write_easy_cohort(root / "cohort", n=16)
    raw = easy_pipeline(manifest, epochs=EPOCHS)
    raw["runtime"]["threads"] = 1
    pipe = root / "pipe.yaml"
    pipe.write_text(yaml.safe_dump(raw))
    train(load_pipeline(pipe), root / "reference")
    return {"root": root, "manifest": manifest, "pipe": pipe, "reference": root / "reference"}


def killed_at(point: str, args: list[str]) -> None:
    """Run ``medhybrid ARGS`` in a subprocess that SIGKILLs itself at ``point``; it must die there."""
    env = {**os.environ, FAULT_ENV: point, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "medhybrid", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point} (rc {proc.returncode}): {proc.stderr[-1500:]}"


def strip(value: Any) -> Any:
    """``value`` without wall-clock fields (the only thing two identical runs may differ in)."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def visible_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# --- train ------------------------------------------------------------------------------------------


def check_unfinished(run: Path, digest: str, epochs_on_disk: int) -> None:
    """What a killed run leaves: complete files or none, and a run.json that does not claim a finished run."""
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert finished_run(run, digest) is None
    assert not [f for f in visible_files(run) if f.endswith(".tmp")]  # every write landed whole or not at all
    lines = read_metrics(run)  # every line parses: no half-written line
    if epochs_on_disk == 0:
        assert not (run / "last.pt").exists() and not (run / "best.pt").exists() and lines == []
        return
    last = load_checkpoint(run / "last.pt")  # loads, and its weights match their recorded digest
    assert last["epoch"] == epochs_on_disk and len(lines) <= epochs_on_disk
    assert load_checkpoint(run / "best.pt")["epoch"] <= epochs_on_disk


def test_sigkilled_train_leaves_nothing_that_looks_finished_and_resume_matches(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """Killed during epoch 1, resumed and killed right after epoch 2's last.pt (before its best.pt and
    metrics.jsonl), resumed and killed before the final run.json, resumed to the end: the weights, history
    and run summary are those of the uninterrupted run."""
    run = tmp_path / "run"
    digest = load_pipeline(setup["pipe"]).digest()
    args = ["train", str(setup["pipe"]), "--out", str(run)]
    killed_at("train_step:1", args)  # nothing to continue from yet: --resume starts it again
    check_unfinished(run, digest, 0)
    killed_at("after_checkpoint:2", [*args, "--resume"])
    check_unfinished(run, digest, 2)
    killed_at("before_finish", [*args, "--resume"])
    check_unfinished(run, digest, EPOCHS)

    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    ref = setup["reference"]
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(ref / name), load_checkpoint(run / name)
        assert a[DIGEST_KEY] == b[DIGEST_KEY], f"{name}: other weights than the uninterrupted run's"
        assert a["epoch"] == b["epoch"] and strip(a["history"]) == strip(b["history"])
    assert strip(read_metrics(run)) == strip(read_metrics(ref))
    done, expected = json.loads((run / "run.json").read_text()), json.loads((ref / "run.json").read_text())
    assert done["status"] == "completed" and finished_run(run, digest) is not None
    for key in ("best_epoch", "best_value", "epochs_run", "final"):
        assert strip(done[key]) == strip(expected[key]), key
    # the files' own bytes differ (each records its epochs' wall-clock seconds); their weights do not
    assert set(done["files"]) == set(expected["files"]) == {"best.pt", "last.pt", "config.yaml", "metrics.jsonl"}


# --- evaluate ---------------------------------------------------------------------------------------


def evaluate_args(model: Path, manifest: Path, out: Path) -> list[str]:
    return ["evaluate", "--model", str(model), "--manifest", str(manifest), "--out", str(out)] + [
        "--bootstrap",
        "100",
        "--device",
        "cpu",
        "--max-faithfulness",
        "2",
    ]


def predictions(out: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO((out / "predictions.csv").read_text())))
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_sigkilled_evaluate_leaves_no_finished_looking_folder_and_rerun_matches(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """The output folder holds a finished earlier evaluation; a new one is killed after two studies, then
    again between predictions.csv and metrics.json: neither time does the folder look finished, and the
    rerun's metrics, predictions and saliency maps are the uninterrupted run's."""
    model = tmp_path / "model"  # a copy: evaluate stores its calibration sidecar beside the checkpoint
    shutil.copytree(setup["reference"], model)
    reference, out = tmp_path / "reference_eval", tmp_path / "eval"
    done = CliRunner().invoke(app, evaluate_args(model, setup["manifest"], reference))
    assert done.exit_code == 0, done.output
    shutil.copytree(reference, out)  # the earlier, finished evaluation

    killed_at("evaluate_study:2", evaluate_args(model, setup["manifest"], out))
    assert not (out / "metrics.json").exists()  # the mark of a finished evaluation (evaluate.runner) is gone
    assert not [f for f in visible_files(out) if f.endswith(".tmp")]
    for path in (out / "saliency").glob("*.nii.gz"):  # every map on disk is whole
        assert read_image(path).array.size > 0

    killed_at("evaluate_outputs", evaluate_args(model, setup["manifest"], out))
    assert (out / "predictions.csv").is_file() and (out / "report.html").is_file()  # written whole, atomically
    assert not (out / "metrics.json").exists()

    again = CliRunner().invoke(app, evaluate_args(model, setup["manifest"], out))
    assert again.exit_code == 0, again.output
    a = json.loads((reference / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert strip(a) == strip(b)
    assert predictions(reference) == predictions(out)
    for path in (reference / "saliency").glob("*.nii.gz"):
        assert (out / "saliency" / path.name).read_bytes() == path.read_bytes(), path.name
