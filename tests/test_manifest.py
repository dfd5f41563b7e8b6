"""Manifest format (read/write round trip, paths, sidecar) and every validation rule, on tiny real files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medhybrid.errors import ManifestError
from medhybrid.io.manifest import Manifest, ManifestRow, read_manifest, write_manifest
from medhybrid.io.manifest_validate import ValidationReport, validate_manifest

HEADER = "study_id,image,label,mask,split\n"


def nifti(path: Path, shape=(4, 5, 6), affine=None, data=None, dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros(shape, dtype=dtype) if data is None else np.asarray(data, dtype=dtype)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def png(path: Path, size=(7, 5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0]), dtype=np.uint8)).save(path)
    return path


def csv_file(path: Path, body: str, sidecar: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + body, encoding="utf-8")
    if sidecar is not None:
        path.with_suffix(".json").write_text(json.dumps(sidecar), encoding="utf-8")
    return path


def codes(report: ValidationReport, level: str = "errors") -> list[str]:
    return [p.code for p in getattr(report, level)]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """tmp/data with a.nii.gz, b.nii.gz, c.nii.gz (4x5x6) and a matching mask for a."""
    for name in "abc":
        nifti(tmp_path / "data" / f"{name}.nii.gz")
    nifti(tmp_path / "data" / "a_mask.nii.gz", data=np.ones((4, 5, 6)))
    return tmp_path


# --- format ---------------------------------------------------------------------------------------


def test_round_trip_relative_paths_sorted_and_extra_columns(images: Path) -> None:
    data = images / "data"
    rows = [
        ManifestRow("c", data / "c.nii.gz", 1, None, "test", {"site": "B"}),
        ManifestRow("a", data / "a.nii.gz", 0, data / "a_mask.nii.gz", "train", {"site": "A", "age": "61"}),
        ManifestRow("b", data / "b.nii.gz", None, None, "val", {}),
    ]
    sidecar = {"label_names": {"0": "normal", "1": "lesion"}, "task": "multitask", "source": "unit test"}
    path = write_manifest(images / "out" / "manifest.csv", rows, sidecar=sidecar)
    text = path.read_text(encoding="utf-8")
    assert text.splitlines() == [
        "study_id,image,label,mask,split,site,age",
        "a,../data/a.nii.gz,0,../data/a_mask.nii.gz,train,A,61",
        "b,../data/b.nii.gz,,,val,,",
        "c,../data/c.nii.gz,1,,test,B,",
    ]
    manifest = read_manifest(path)
    assert isinstance(manifest, Manifest)
    assert [r.study_id for r in manifest.rows] == ["a", "b", "c"]
    assert manifest.rows[0] == ManifestRow(
        "a", data / "a.nii.gz", 0, data / "a_mask.nii.gz", "train", {"site": "A", "age": "61"}
    )
    assert manifest.rows[0].image.is_absolute() and manifest.rows[0].line == 2
    assert manifest.rows[1].label is None and manifest.rows[1].mask is None
    assert manifest.rows[2].extra == {"site": "B", "age": ""}
    assert manifest.label_names == {0: "normal", 1: "lesion"}
    assert (manifest.task, manifest.source) == ("multitask", "unit test")
    assert manifest.splits() == ["train", "val", "test"]
    assert [r.study_id for r in manifest.split("test")] == ["c"]
    assert manifest.label_counts() == {0: 1, 1: 1}
    assert manifest.label_counts("val") == {}
    # rewriting what was read gives the same bytes, whatever the input order
    write_manifest(images / "out" / "again.csv", list(reversed(manifest.rows)))
    assert (images / "out" / "again.csv").read_text(encoding="utf-8") == text
    assert not [p for p in (images / "out").iterdir() if p.name.endswith(".tmp")]


def test_absolute_and_dotted_paths_are_resolved(images: Path) -> None:
    absolute = images / "data" / "a.nii.gz"
    path = csv_file(images / "m" / "manifest.csv", f"a,{absolute},,,train\nb,./../data/b.nii.gz,,,train\n")
    rows = read_manifest(path).rows
    assert rows[0].image == absolute
    assert rows[1].image == images / "data" / "b.nii.gz"
    assert validate_manifest(path).ok


@pytest.mark.parametrize(
    ("body", "header", "needle"),
    [
        ("a,x.nii.gz,0,,train\n", "study_id,image,label,split\n", "line 1: missing column(s) ['mask']"),
        ("a,x.nii.gz,0,,train\nb,y.nii.gz,abc,,train\n", HEADER, "line 3: label 'abc' is not an integer"),
        ("a,x.nii.gz,1.5,,train\n", HEADER, "line 2: label '1.5'"),
        ("a,x.nii.gz,0,,train\n,y.nii.gz,0,,train\n", HEADER, "line 3: empty study_id"),
        ("a,,0,,train\n", HEADER, "line 2: empty image"),
        ("a,x.nii.gz,0,,train,extra\n", HEADER, "line 2: 6 fields but the header has 5"),
    ],
)
def test_structural_problems_raise_with_file_and_line(tmp_path: Path, body: str, header: str, needle: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(header + body, encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)
    with pytest.raises(ManifestError):  # validation cannot proceed either
        validate_manifest(path)


def test_missing_manifest_and_bad_sidecar_raise(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")
    path = csv_file(tmp_path / "m.csv", "a,x.nii.gz,0,,train\n")
    path.with_suffix(".json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ManifestError, match="sidecar"):
        read_manifest(path)
    path.with_suffix(".json").write_text('{"label_names": {"zero": "normal"}}', encoding="utf-8")
    with pytest.raises(ManifestError, match="not an integer"):
        read_manifest(path)


def test_blank_lines_bom_and_integral_decimal_labels(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("\ufeff" + HEADER + "a,x.nii.gz,1.0,,train\n\n,,,,\nb,y.nii.gz,,,val\n", encoding="utf-8")
    rows = read_manifest(path).rows
    assert [(r.study_id, r.label, r.line) for r in rows] == [("a", 1, 2), ("b", None, 5)]


# --- validation -----------------------------------------------------------------------------------


def test_clean_manifest_validates_with_counts_and_json(images: Path) -> None:
    path = csv_file(
        images / "manifest.csv",
        "a,data/a.nii.gz,0,data/a_mask.nii.gz,train\nb,data/b.nii.gz,1,,train\nc,data/c.nii.gz,0,,val\n",
        sidecar={"label_names": {"0": "n", "1": "p"}, "mask_label_names": {"0": "bg", "1": "fg"}},
    )
    report = validate_manifest(path)
    assert report.ok and report.errors == []
    assert codes(report, "warnings") == ["single_class"]  # val holds only class 0
    assert report.split_counts == {"train": 2, "val": 1}
    assert report.label_counts == {"train": {0: 1, 1: 1}, "val": {0: 1}}
    as_json = json.loads(json.dumps(report.as_dict()))
    assert as_json["ok"] is True and as_json["label_counts"]["train"] == {"0": 1, "1": 1}
    assert as_json["warnings"][0]["code"] == "single_class"


def test_missing_image_and_mask(images: Path) -> None:
    path = csv_file(images / "m.csv", "a,data/zz.nii.gz,,,train\nb,data/b.nii.gz,,data/nomask.nii.gz,train\n")
    report = validate_manifest(path)
    assert not report.ok
    assert codes(report) == ["image_missing", "mask_missing"]
    assert (report.errors[0].line, report.errors[0].study_id) == (2, "a")
    assert "line 3, b" in str(report.errors[1])


def test_leak_across_splits_by_id_and_by_image(images: Path) -> None:
    path = csv_file(
        images / "m.csv",
        "a,data/a.nii.gz,,,train\na,data/b.nii.gz,,,test\nc,data/c.nii.gz,,,train\nc2,data/c.nii.gz,,,val\n",
    )
    report = validate_manifest(path)
    assert sorted(codes(report)) == ["leak_id", "leak_image"]
    leak = next(p for p in report.errors if p.code == "leak_id")
    assert leak.study_id == "a" and "'train'" in leak.message and "'test'" in leak.message


def test_duplicate_id_within_split_and_conflicting_labels(images: Path) -> None:
    path = csv_file(images / "m.csv", "a,data/a.nii.gz,0,,train\na,data/b.nii.gz,1,,train\nc,data/c.nii.gz,1,,val\n")
    report = validate_manifest(path)
    assert sorted(codes(report)) == ["duplicate_id", "label_conflict"]
    assert all(p.line == 3 for p in report.errors)


def test_labels_must_be_in_sidecar_names_and_partial_labels_warn(images: Path) -> None:
    path = csv_file(
        images / "m.csv",
        "a,data/a.nii.gz,0,,train\nb,data/b.nii.gz,2,,train\nc,data/c.nii.gz,,,train\n",
        sidecar={"label_names": {"0": "normal", "1": "lesion"}},
    )
    report = validate_manifest(path)
    assert codes(report) == ["label_unknown"]
    assert report.errors[0].study_id == "b"
    assert "labels_partial" in codes(report, "warnings")


def test_mask_shape_mismatch(images: Path) -> None:
    nifti(images / "data" / "bad_mask.nii.gz", shape=(4, 5, 7))
    path = csv_file(images / "m.csv", "a,data/a.nii.gz,,data/bad_mask.nii.gz,train\n")
    report = validate_manifest(path)
    assert codes(report) == ["mask_shape_mismatch"]
    assert "(4, 5, 7)" in report.errors[0].message
    assert validate_manifest(path, check_geometry=False).ok


def test_mask_affine_mismatch_beyond_tolerance_only(images: Path) -> None:
    shifted = np.eye(4)
    shifted[0, 3] = 0.01  # 10 micrometres: beyond 1e-3 mm
    nifti(images / "data" / "shifted.nii.gz", affine=shifted)
    nearly = np.eye(4)
    nearly[0, 3] = 2e-4
    nifti(images / "data" / "nearly.nii.gz", affine=nearly)
    path = csv_file(
        images / "m.csv",
        "a,data/a.nii.gz,,data/shifted.nii.gz,train\nb,data/b.nii.gz,,data/nearly.nii.gz,val\n",
    )
    report = validate_manifest(path)
    assert codes(report) == ["mask_affine_mismatch"]
    assert report.errors[0].study_id == "a"


def test_mask_values_must_be_non_negative_integers_in_names(images: Path) -> None:
    values = np.zeros((4, 5, 6), dtype=np.float32)
    values[0, 0, 0] = 0.5
    nifti(images / "data" / "frac.nii.gz", data=values, dtype=np.float32)
    nifti(images / "data" / "neg.nii.gz", data=-np.ones((4, 5, 6)), dtype=np.int16)
    labels = np.zeros((4, 5, 6))
    labels[1, 1, 1] = 3
    nifti(images / "data" / "three.nii.gz", data=labels)
    path = csv_file(
        images / "m.csv",
        "a,data/a.nii.gz,,data/frac.nii.gz,train\nb,data/b.nii.gz,,data/neg.nii.gz,train\n"
        "c,data/c.nii.gz,,data/three.nii.gz,train\n",
        sidecar={"mask_label_names": {"0": "background", "1": "lesion"}, "task": "segmentation"},
    )
    report = validate_manifest(path)
    assert codes(report) == ["mask_values", "mask_values", "mask_label_unknown"]
    assert "[3]" in report.errors[2].message


def test_png_image_and_mask_geometry(tmp_path: Path) -> None:
    png(tmp_path / "img.png", size=(7, 5))
    png(tmp_path / "mask.png", size=(7, 5))
    png(tmp_path / "wide.png", size=(5, 7))
    path = csv_file(tmp_path / "m.csv", "a,img.png,,mask.png,train\nb,img.png,,wide.png,val\n")
    report = validate_manifest(path)
    assert "mask_shape_mismatch" in codes(report)
    assert [p.study_id for p in report.errors if p.code == "mask_shape_mismatch"] == ["b"]


def test_dicom_folders_splits_and_formats(images: Path) -> None:
    (images / "dcm" / "series").mkdir(parents=True)
    (images / "dcm" / "series" / "1.dcm").write_bytes(b"\0" * 132 + b"DICM")
    (images / "empty").mkdir()
    (images / "data" / "x.jpg").write_bytes(b"jpg")
    path = csv_file(
        images / "m.csv",
        "a,dcm,,data/a_mask.nii.gz,train\nb,empty,,,train\nc,data/x.jpg,,,holdout\nd,data/c.nii.gz,,,\n",
    )
    report = validate_manifest(path)
    assert codes(report) == ["image_empty_folder", "unsupported_format", "split_missing"]
    assert sorted(codes(report, "warnings")) == ["mask_not_checked", "split_unknown"]
    assert report.split_counts == {"train": 2, "": 1, "holdout": 1}


def test_task_must_match_content(images: Path) -> None:
    path = csv_file(images / "m.csv", "a,data/a.nii.gz,,,train\n", sidecar={"task": "classification"})
    assert codes(validate_manifest(path)) == ["task_mismatch"]
    path = csv_file(images / "s.csv", "a,data/a.nii.gz,0,,train\n", sidecar={"task": "segmentation"})
    assert codes(validate_manifest(path)) == ["task_mismatch"]
    path = csv_file(images / "u.csv", "a,data/a.nii.gz,0,,train\n", sidecar={"task": "detection"})
    assert "task_unknown" in codes(validate_manifest(path), "warnings")


def test_empty_manifest_warns(tmp_path: Path) -> None:
    report = validate_manifest(csv_file(tmp_path / "m.csv", ""))
    assert report.ok and codes(report, "warnings") == ["empty"]
