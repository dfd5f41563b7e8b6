"""Where ``medhybrid compare`` reports: on studies no run trained or selected on (out-of-fold, the test
split, or a held-out split carved so; see :mod:`medhybrid.evaluate.compare`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medhybrid.config import load_pipeline
from medhybrid.errors import ConfigError
from medhybrid.io.manifest import Manifest, ManifestRow, pseudonymous_patients, read_manifest, write_manifest

if TYPE_CHECKING:
    from medhybrid.evaluate.compare import CompareOptions


@dataclass
class Protocol:
    """Where a comparison reports (module docstring): the studies no model trained or selected on.

    Attributes:
        name: ``out-of-fold``, ``test`` (a split of the manifest) or ``held-out``.
        split: the reported split (``test`` of the held-out manifest for ``held-out``).
        calibration_split: the split temperature and threshold are fitted on (the selection split).
        overrides: pipeline overrides every run gets (the held-out manifest and its splits).
        manifest: the manifest the runs use.
    """

    name: str
    split: str
    calibration_split: str
    overrides: list[str]
    manifest: Path


def choose_protocol(pipeline: Path, options: CompareOptions, out: Path) -> Protocol:
    """The reporting protocol (module docstring); writes the held-out manifest when it is needed.

    Raises:
        ConfigError: ``--split`` names the training or the selection split, or a split the manifest lacks.
    """
    base = load_pipeline(pipeline, options.overrides)
    data = base.data
    manifest = read_manifest(data.manifest)
    if options.folds is not None:
        return Protocol("out-of-fold", "out-of-fold", "inner validation folds", [], data.manifest)
    if options.split in (data.train_split, data.val_split):
        raise ConfigError(
            f"--split {options.split}: the runs train or select their epoch on it, so its figures would be optimistic",
            fix="leave --split out (test split, or the held-out protocol), or use --folds K",
        )
    if options.split is not None:
        if not manifest.split(options.split):
            raise ConfigError(f"--split {options.split}: the manifest has no such split ({manifest.splits()})")
        return Protocol("test", options.split, data.val_split, [], data.manifest)
    if manifest.split("test") and "test" not in (data.train_split, data.val_split):
        return Protocol("test", "test", data.val_split, [], data.manifest)
    path = holdout_manifest(manifest, data.train_split, data.val_split, base.runtime.seed, out / "holdout")
    overrides = [f"data.manifest={path.resolve()}", "data.train_split=train", "data.val_split=val"]
    return Protocol("held-out", "test", "val", overrides, path)


def holdout_manifest(manifest: Manifest, train_split: str, val_split: str, seed: int, folder: Path) -> Path:
    """``folder/manifest.csv``: the ``val_split`` studies become ``test`` (reported), one fifth of the
    ``train_split`` studies (stratified, grouped by patient) becomes the inner ``val`` (selection), the
    rest stays ``train``."""
    from medhybrid.train.folds import assign_folds

    train_rows = manifest.split(train_split)
    fold = assign_folds(train_rows, 5, seed)
    split_of = {r.study_id: "val" if fold[r.study_id] == 0 else "train" for r in train_rows}
    split_of.update({r.study_id: "test" for r in manifest.split(val_split)})
    rows = [
        ManifestRow(r.study_id, r.image, r.label, r.mask, split_of[r.study_id], dict(r.extra), patient_id=r.patient_id)
        for r in pseudonymous_patients([r for r in manifest.rows if r.study_id in split_of])
    ]
    return write_manifest(folder / "manifest.csv", rows, sidecar=dict(manifest.sidecar))
