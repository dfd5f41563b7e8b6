"""K-fold cross-validation, the nnU-Net way: ``medhybrid train PIPELINE --folds K``.

The studies of the pipeline's train and val splits are pooled and cut into K folds (scikit-learn's
``StratifiedGroupKFold``: stratified by label, a patient's studies kept in one fold where the manifest
has ``patient_id``, seeded by ``runtime.seed``); the test split, if any, is left alone. Fold ``k`` is one
training run in ``RUN/fold_k`` on its own manifest (``RUN/fold_k/manifest.csv``):

- ``test``: fold ``k``, the out-of-fold studies, which nothing of run ``k`` saw or selected on;
- ``val``: fold ``k + 1`` (mod K), the inner validation split that selects the run's best epoch;
- ``train``: the other K - 2 folds.

Every study is thus tested once, selects once and trains K - 2 times. After the K runs each fold model is
evaluated on its ``test`` fold (temperature and threshold fitted on its inner ``val``), and the
out-of-fold predictions are pooled into one report with CIs (``RUN/cv``: metrics.json, predictions.csv,
report.html; :mod:`medhybrid.evaluate.crossval`). ``RUN/ensemble.json`` lists the fold models:
``medhybrid infer --model RUN`` averages them.

The folds are written to ``RUN/folds.json`` (study ids only, no patient ids; the fold manifests carry
pseudonyms in place of patient ids); ``--resume`` continues a killed run fold by fold and refuses a
different assignment. Under torchrun every rank trains the folds together and rank 0 alone evaluates
and pools them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medhybrid.config import PipelineConfig
from medhybrid.errors import ConfigError, TrainingError
from medhybrid.io.manifest import Manifest, ManifestRow, pseudonymous_patients, read_manifest, write_manifest
from medhybrid.io.writers import sha256_file
from medhybrid.train import records
from medhybrid.train.data import load_task_data
from medhybrid.train.distributed import from_env
from medhybrid.train.loop import EpochCallback, train

logger = logging.getLogger(__name__)

MIN_FOLDS = 3  # train on K - 2 folds, select on one, test on one


@dataclass
class CVResult:
    run_dir: Path
    folds: int
    fold_dirs: list[Path]
    metrics: dict[str, Any]


def assign_folds(rows: list[ManifestRow], k: int, seed: int) -> dict[str, int]:
    """``study_id -> fold`` for ``rows``: stratified by label (unlabelled rows count as one class), grouped by
    patient where known, seeded.

    Raises:
        ConfigError: fewer sampling units (patients or studies) than folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    groups = np.asarray([r.group for r in rows])
    if len(set(groups.tolist())) < k:
        raise ConfigError(
            f"--folds {k}: only {len(set(groups.tolist()))} patients/studies to split",
            fix="use fewer folds (at least 3) or more data",
        )
    y = np.asarray([-1 if r.label is None else r.label for r in rows])
    counts = np.unique(y, return_counts=True)[1]
    if counts.min() < k:  # too few of a class to stratify: keep the groups, drop the stratification
        logger.warning("a class has %d studies, fewer than %d folds: folds are not stratified", counts.min(), k)
        y = np.zeros(len(rows), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    out: dict[str, int] = {}
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(rows)), y, groups)):
        for i in test:
            out[rows[i].study_id] = fold
    return out


def fold_rows(pooled: list[ManifestRow], assignment: dict[str, int], k: int, fold: int) -> list[ManifestRow]:
    """The rows of fold ``fold``'s manifest: test = ``fold``, val = ``fold + 1``, train = the rest
    (patients pseudonymised: run folders are shared as models)."""

    def split_of(r: ManifestRow) -> str:
        f = assignment[r.study_id]
        return "test" if f == fold else "val" if f == (fold + 1) % k else "train"

    return [
        ManifestRow(r.study_id, r.image, r.label, r.mask, split_of(r), dict(r.extra), patient_id=r.patient_id)
        for r in pseudonymous_patients(pooled)
    ]


def pooled_rows(cfg: PipelineConfig, manifest: Manifest) -> list[ManifestRow]:
    """The studies cross-validation splits: the pipeline's train and val splits."""
    return [r for r in manifest.rows if r.split in (cfg.data.train_split, cfg.data.val_split)]


def _write_folds(run_dir: Path, cfg: PipelineConfig, manifest: Manifest, k: int, assignment: dict[str, int]) -> None:
    path = run_dir / records.FOLDS_FILE
    payload = {
        "folds": k,
        "seed": cfg.runtime.seed,
        "manifest": str(cfg.data.manifest),
        "manifest_sha256": sha256_file(cfg.data.manifest),
        "pooled_splits": [cfg.data.train_split, cfg.data.val_split],
        "grouping": "patient_id" if manifest.has_patients else "study",
        "scheme": "fold k: test = fold k, val = fold k+1 (mod K), train = the other K-2 folds",
        "assignment": dict(sorted(assignment.items())),
    }
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous.get("assignment") != payload["assignment"] or previous.get("folds") != k:
            raise TrainingError(
                "the run folder holds other folds (a different manifest, seed or --folds)",
                path=path,
                fix="use a new --out folder",
            )
    records.write_json(path, payload)


def train_folds(
    cfg: PipelineConfig,
    run_dir: Path,
    k: int,
    *,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
    on_event: Callable[[str], None] | None = None,
    n_boot: int = 2000,
) -> CVResult:
    """Train the K fold models, evaluate each on its held-out fold and pool the out-of-fold predictions
    (module docstring).

    Raises:
        ConfigError: fewer than 3 folds, or too little data; TrainingError: the folder holds another run.
    """
    from medhybrid.evaluate.crossval import pooled_evaluation

    say = on_event or (lambda msg: logger.info("%s", msg))
    if k < MIN_FOLDS:
        raise ConfigError(f"--folds {k}: at least {MIN_FOLDS} folds", fix="e.g. --folds 5")
    run_dir = Path(run_dir)
    if not resume and (run_dir / records.FOLDS_FILE).is_file():
        raise TrainingError(
            "the run folder already holds a cross-validation run",
            path=run_dir,
            fix="pass --resume to continue it, or --out with a new folder",
        )
    load_task_data(cfg)  # the pipeline must fit its data before folds are cut
    manifest = read_manifest(cfg.data.manifest)
    pooled = pooled_rows(cfg, manifest)
    assignment = assign_folds(pooled, k, cfg.runtime.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_folds(run_dir, cfg, manifest, k, assignment)
    records.write_config(run_dir, cfg.to_dict())
    fold_dirs: list[Path] = []
    for fold in range(k):
        fold_dir = run_dir / f"fold_{fold}"
        fold_manifest = write_manifest(
            fold_dir / "manifest.csv", fold_rows(pooled, assignment, k, fold), sidecar=dict(manifest.sidecar)
        )
        fold_cfg = fold_config(cfg, fold_manifest)
        fold_dirs.append(fold_dir)
        if records.finished_run(fold_dir, fold_cfg.digest()):
            say(f"fold {fold}: reusing the finished run")
            continue
        again = (fold_dir / records.LAST_FILE).is_file()
        say(f"fold {fold}: {'resuming' if again else 'training'} ({len(assignment)} studies, test = fold {fold})")
        train(fold_cfg, fold_dir, resume=again, on_epoch=on_epoch)
    if not from_env().is_main:  # under torchrun, rank 0 alone evaluates and writes the pooled report
        return CVResult(run_dir, k, fold_dirs, {})
    say("evaluating every fold model on its held-out fold")
    metrics = pooled_evaluation(run_dir, fold_dirs, cfg, n_boot=n_boot, on_event=say)
    return CVResult(run_dir, k, fold_dirs, metrics)


def fold_config(cfg: PipelineConfig, fold_manifest: Path) -> PipelineConfig:
    """The pipeline of one fold: its manifest, its train/val splits."""
    data = cfg.data.model_copy(update={"manifest": fold_manifest.resolve(), "train_split": "train", "val_split": "val"})
    return cfg.model_copy(update={"data": data})
