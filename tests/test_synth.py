"""The synthetic cohort: determinism, DICOM/NIfTI agreement, exact masks, splits, PHI and argument checks."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medhybrid.data.synth import LESION_CONTRAST, assign_splits, synth_study, synthesize_cohort
from medhybrid.errors import ConfigError
from medhybrid.io.dicom import discover_dicom, load_series
from medhybrid.io.readers import read_image
from medhybrid.io.study import Verdict


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    calls: list[int] = []
    manifest = synthesize_cohort(out, n=8, dims=3, fmt="both", seed=0, progress=lambda: calls.append(1))
    assert manifest == out / "manifest.csv" and len(calls) == 8
    return out


def test_layout_and_manifest(cohort: Path) -> None:
    rows = _rows(cohort / "manifest.csv")
    assert list(rows[0]) == ["study_id", "image", "label", "mask", "split", "dicom"]
    assert [r["study_id"] for r in rows] == [f"synth_{i:04d}" for i in range(8)]
    for r in rows:
        assert r["image"] == f"nifti/{r['study_id']}.nii.gz" and (cohort / r["image"]).is_file()
        assert (cohort / r["mask"]).is_file() and (cohort / r["dicom"]).is_dir()
        assert len(list((cohort / r["dicom"]).iterdir())) == 32
    sidecar = json.loads((cohort / "manifest.json").read_text())
    assert sidecar == {
        "label_names": {"0": "normal", "1": "abnormal"},
        "mask_label_names": {"0": "background", "1": "lesion"},
        "mask_kind": "lesion",
        "task": "multitask",
        "source": "medhybrid synth",
        "seed": 0,
        "dims": 3,
    }


def test_dicom_and_nifti_agree_and_scan_ok(cohort: Path) -> None:
    for r in _rows(cohort / "manifest.csv"):
        discovery = discover_dicom(cohort / r["dicom"])
        assert not discovery.rejected and not discovery.skipped and len(discovery.series) == 1
        series = discovery.series[0]
        assert series.qc.verdict is Verdict.OK, series.qc.as_dict()
        from_dicom = load_series(series)
        from_nifti = read_image(cohort / r["image"])
        assert from_dicom.array.shape == (64, 64, 32)
        np.testing.assert_array_equal(from_dicom.array, from_nifti.array)
        np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-6)
        np.testing.assert_allclose(from_dicom.spacing, (0.75, 0.75, 2.5))
        mask = read_image(cohort / r["mask"], dtype=np.int16)
        np.testing.assert_allclose(mask.affine, from_nifti.affine, atol=1e-6)


def test_masks_exact(cohort: Path) -> None:
    rows = _rows(cohort / "manifest.csv")
    for index, r in enumerate(rows):
        study = synth_study(0, index, 3)
        mask = read_image(cohort / r["mask"], dtype=np.int16).array
        np.testing.assert_array_equal(mask, study.mask)
        np.testing.assert_array_equal(mask.astype(bool), study.clean != study.background)
        assert study.label == int(r["label"])
        assert mask.any() == (r["label"] == "1")
        image = read_image(cohort / r["image"]).array
        np.testing.assert_array_equal(image, study.image.astype(np.float32))
        if mask.any():  # lesions sit in soft tissue or liver and change it by LESION_CONTRAST HU
            assert set(np.unique(study.background[mask.astype(bool)])) <= {40.0, 60.0}
            delta = np.abs(study.clean - study.background)[mask.astype(bool)]
            assert delta.min() >= LESION_CONTRAST[0] and delta.max() <= LESION_CONTRAST[1]


def test_labels_balanced_and_splits() -> None:
    labels = [synth_study(0, i, 2).label for i in range(20)]
    assert sum(labels) == 10
    splits = assign_splits(labels, seed=0)
    counts = Counter(splits)
    assert counts == {"train": 12, "val": 4, "test": 4}
    for label in (0, 1):
        assert Counter(s for s, lab in zip(splits, labels, strict=True) if lab == label) == {
            "train": 6,
            "val": 2,
            "test": 2,
        }
    assert assign_splits(labels, seed=0) == splits
    assert set(assign_splits([0, 1, 0, 1], seed=3)) == {"train", "val", "test"}
    assert assign_splits([1], seed=0) == ["train"]


def test_deterministic_and_independent_of_n(tmp_path: Path, cohort: Path) -> None:
    again = synthesize_cohort(tmp_path / "again", n=8, dims=3, fmt="both", seed=0).parent
    assert _files(again) == _files(cohort)
    fewer = synthesize_cohort(tmp_path / "fewer", n=3, dims=3, fmt="nifti", seed=0).parent
    for name in ("synth_0002.nii.gz", "synth_0002_mask.nii.gz"):
        assert (fewer / "nifti" / name).read_bytes() == (cohort / "nifti" / name).read_bytes()
    other = synthesize_cohort(tmp_path / "other", n=2, dims=3, fmt="nifti", seed=1).parent
    assert (other / "nifti/synth_0000.nii.gz").read_bytes() != (cohort / "nifti/synth_0000.nii.gz").read_bytes()


def test_phi_only_in_dicom(cohort: Path) -> None:
    manifests = (cohort / "manifest.csv").read_text() + (cohort / "manifest.json").read_text()
    names = set()
    for r in _rows(cohort / "manifest.csv"):
        ds = pydicom.dcmread(next((cohort / r["dicom"]).iterdir()))
        assert str(ds.PatientName).count("^") == 1 and ds.PatientID.startswith("SYN")
        assert len(ds.PatientBirthDate) == 8
        for value in (
            str(ds.PatientName),
            ds.PatientID,
            ds.PatientBirthDate,
            *str(ds.PatientName).split("^"),
        ):
            assert value not in manifests
        names.add(str(ds.PatientName))
    assert len(names) > 1


def test_2d_dicom_only(tmp_path: Path) -> None:
    out = synthesize_cohort(tmp_path / "c2", n=4, dims=2, fmt="dicom", seed=5).parent
    rows = _rows(out / "manifest.csv")
    assert sorted(r["label"] for r in rows) == ["0", "0", "1", "1"]
    assert not list((out / "nifti").glob("synth_????.nii.gz"))
    for r in rows:
        assert r["image"] == r["dicom"] == f"dicom/{r['study_id']}"
        series = discover_dicom(out / r["dicom"]).series[0]
        assert series.qc.verdict is Verdict.OK, series.qc.as_dict()
        study = load_series(series)
        mask = read_image(out / r["mask"], dtype=np.int16)
        assert study.array.shape == mask.array.shape == (128, 128, 1)
        np.testing.assert_allclose(study.affine, mask.affine, atol=1e-6)
        assert mask.array.any() == (r["label"] == "1")
    assert json.loads((out / "manifest.json").read_text())["dims"] == 2


def test_nifti_only_2d(tmp_path: Path) -> None:
    out = synthesize_cohort(tmp_path / "n2", n=2, dims=2, fmt="nifti", seed=0).parent
    rows = _rows(out / "manifest.csv")
    assert list(rows[0]) == ["study_id", "image", "label", "mask", "split"]
    assert not (out / "dicom").exists()
    assert read_image(out / rows[0]["image"]).array.shape == (128, 128, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n must"),
        ({"n": 2.5}, "n must"),
        ({"dims": 4}, "dims must"),
        ({"fmt": "png"}, "format must"),
        ({"seed": -1}, "seed must"),
    ],
)
def test_argument_validation(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        synthesize_cohort(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
