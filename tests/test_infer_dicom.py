"""DICOM SEG and Comprehensive 3D SR outputs (medhybrid.infer.dicom_out), on the synthetic CT cohort."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from medhybrid.data.synth import synth_study, synthesize_cohort
from medhybrid.errors import DicomError, InputError, MedHybridError
from medhybrid.infer.dicom_out import (
    PROBABILITY_DECIMALS,
    VOLUME_DECIMALS,
    AlgorithmInfo,
    Findings,
    SegmentFinding,
    source_datasets,
    write_seg,
    write_sr,
)
from medhybrid.io.dicom import DicomSeries, discover_dicom, load_series
from medhybrid.io.dicom_files import SliceHeader
from medhybrid.io.dicom_write import derive_uid, write_dicom_series
from medhybrid.io.readers import read_image

ALGORITHM = AlgorithmInfo(name="medhybrid hybrid_r18_3d", version="0.1.0+3fa2b1c4", weights_sha256="3fa2b1c4" * 8)
NAMES = {1: "lesion"}


@dataclass
class Case:
    series: DicomSeries
    mask: np.ndarray  # (I, J, K) in the series' geometry
    sources: list[Dataset]

    @property
    def headers(self) -> list[SliceHeader]:
        return self.series.headers


def _one_series(folder: Path) -> DicomSeries:
    found = discover_dicom(folder).series
    assert len(found) == 1 and found[0].error is None
    return found[0]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(root, n=2, dims=3, fmt="dicom", seed=0)
    return root


@pytest.fixture(scope="module")
def case(cohort: Path) -> Case:
    """The synthetic study with lesions (the other one of the pair is normal)."""
    for sid in ("synth_0000", "synth_0001"):
        mask = read_image(cohort / "nifti" / f"{sid}_mask.nii.gz", dtype=np.int16).array
        if mask.any():
            series = _one_series(cohort / "dicom" / sid)
            return Case(series, mask, source_datasets(series.headers))
    raise AssertionError("the synthetic pair has no abnormal study")


@pytest.fixture(scope="module")
def other_case(cohort: Path, case: Case) -> Case:
    """The other (normal) study of the cohort: another patient and series."""
    for sid in ("synth_0000", "synth_0001"):
        series = _one_series(cohort / "dicom" / sid)
        if series.series_uid != case.series.series_uid:
            mask = read_image(cohort / "nifti" / f"{sid}_mask.nii.gz", dtype=np.int16).array
            return Case(series, mask, source_datasets(series.headers))
    raise AssertionError("no second study")


# --- helpers -----------------------------------------------------------------------------------------


def _floats(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values]


def _reconstruct(seg_path: Path, headers: list[SliceHeader], names: dict[int, str]) -> np.ndarray:
    """The label volume (I, J, K) of a SEG file, rebuilt from its frames with pydicom alone.

    Each frame is placed at the slice k whose source instance (and frame, for a multi-frame source) it
    references; the frame's ImagePositionPatient must be that source slice's position. Segments are
    mapped back to mask labels through their SegmentLabel.
    """
    ds = pydicom.dcmread(seg_path)
    first = headers[0]
    label_of_segment = {
        int(item.SegmentNumber): next(label for label, name in names.items() if name == item.SegmentLabel)
        for item in ds.SegmentSequence
    }
    k_of = {(h.sop_uid, h.frame): k for k, h in enumerate(headers)}
    shared = ds.SharedFunctionalGroupsSequence[0]
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    volume = np.zeros((first.cols, first.rows, len(headers)), dtype=np.int16)
    for index, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        seg_item = (item if "SegmentIdentificationSequence" in item else shared).SegmentIdentificationSequence[0]
        label = label_of_segment[int(seg_item.ReferencedSegmentNumber)]
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame = int(source.ReferencedFrameNumber) - 1 if "ReferencedFrameNumber" in source else 0
        k = k_of[(str(source.ReferencedSOPInstanceUID), frame)]
        position = item.PlanePositionSequence[0].ImagePositionPatient
        expected = headers[k].position
        assert expected is not None
        assert _floats(position) == pytest.approx(list(expected), abs=1e-6)
        on = frames[index].T.astype(bool)
        assert not (volume[:, :, k][on] != 0).any(), "segments overlap"
        volume[:, :, k][on] = label
    return volume


def _all_values(ds: Dataset, vr: str | None = None) -> list[tuple[str, str]]:
    """(keyword, str(value)) of every element, nested sequences included (optionally of one VR)."""
    out = []
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                out += _all_values(item, vr)
        elif vr in (None, elem.VR):
            out.append((elem.keyword, str(elem.value)))
    return out


# --- SEG -----------------------------------------------------------------------------------------------


def test_seg_round_trip(case: Case, tmp_path: Path) -> None:
    out = tmp_path / "seg.dcm"
    returned = write_seg(case.mask, case.headers, NAMES, ALGORITHM, out, sources=case.sources)
    assert out.is_file()

    # highdicom reads it and gives back the mask through the source instances
    seg = hd.seg.segread(out)
    assert seg.SOPInstanceUID == returned.SOPInstanceUID
    assert seg.SegmentationType == "BINARY"
    assert seg.number_of_segments == 1
    pixels = seg.get_pixels_by_source_instance(
        [h.sop_uid for h in case.headers], combine_segments=True, assert_missing_frames_are_empty=True
    )
    assert np.array_equal(pixels.transpose(2, 1, 0), case.mask)

    # pydicom alone: frames placed by their referenced instances and positions rebuild the mask exactly
    assert np.array_equal(_reconstruct(out, case.headers, NAMES), case.mask)

    ds = pydicom.dcmread(out)
    source = case.sources[0]
    assert ds.Modality == "SEG"
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert [item.SeriesInstanceUID for item in ds.ReferencedSeriesSequence] == [case.series.series_uid]
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert _floats(shared.PixelMeasuresSequence[0].PixelSpacing) == _floats(source.PixelSpacing)
    assert _floats(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == _floats(
        source.ImageOrientationPatient
    )
    # each frame sits exactly where its source slice is (the DS strings are copied unchanged)
    by_uid = {ds_.SOPInstanceUID: ds_ for ds_ in case.sources}
    for item in ds.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert _floats(item.PlanePositionSequence[0].ImagePositionPatient) == _floats(by_uid[ref].ImagePositionPatient)
    # descriptive attributes
    assert ds.Manufacturer == "medhybrid"
    assert ds.SoftwareVersions == ALGORITHM.version
    assert ds.SeriesDescription == "MEDHYBRID SEG"
    assert ds.ContentLabel == "MEDHYBRID SEG"
    segment = ds.SegmentSequence[0]
    assert segment.SegmentLabel == "lesion"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == ALGORITHM.name
    category = codes.SCT.MorphologicallyAbnormalStructure
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == category.value
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Lesion.value
    # only frames holding the lesion are stored
    assert int(ds.NumberOfFrames) == int(np.count_nonzero(case.mask.any(axis=(0, 1))))


def test_seg_several_labels(case: Case, tmp_path: Path) -> None:
    """Non-consecutive labels become segments 1..N, in label order; uint8 and boolean masks work too."""
    mask = case.mask.astype(np.uint8)
    mask[5:9, 40:44, 2:5] = 3  # a second class, away from the synthetic lesions
    names = {0: "background", 1: "lesion", 3: "nodule"}
    out = tmp_path / "seg.dcm"
    write_seg(mask, case.headers, names, ALGORITHM, out, sources=case.sources)
    ds = pydicom.dcmread(out)
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in ds.SegmentSequence] == [(1, "lesion"), (2, "nodule")]
    assert ds.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Nodule.value
    assert np.array_equal(_reconstruct(out, case.headers, names), mask)
    write_seg(case.mask > 0, case.headers, NAMES, ALGORITHM, out, sources=case.sources)
    assert np.array_equal(_reconstruct(out, case.headers, NAMES), case.mask)


def test_seg_empty_mask(case: Case, tmp_path: Path) -> None:
    """An all-empty mask still gives a valid SEG: every frame present and empty."""
    out = tmp_path / "empty.dcm"
    empty = np.zeros_like(case.mask)
    write_seg(empty, case.headers, NAMES, ALGORITHM, out, sources=case.sources)
    seg = hd.seg.segread(out)
    assert seg.number_of_segments == 1
    assert int(seg.NumberOfFrames) == len(case.headers)
    pixels = seg.get_pixels_by_source_instance([h.sop_uid for h in case.headers], combine_segments=True)
    assert pixels.shape == (len(case.headers), case.headers[0].rows, case.headers[0].cols)
    assert not pixels.any()
    assert not _reconstruct(out, case.headers, NAMES).any()


def test_seg_k_axis_reversed(tmp_path: Path) -> None:
    """A series written with its k axis against the slice normal reads back reversed; the SEG follows the
    loaded (sorted) geometry, so every frame still lands on its own source slice."""
    study = synth_study(0, 1, 3)
    affine = study.affine.copy()
    n_k = study.image.shape[2]
    affine[:3, 3] += affine[:3, 2] * (n_k - 1)
    affine[:3, 2] *= -1
    folder = tmp_path / "reversed"
    write_dicom_series(
        study.image,
        affine,
        folder,
        study_uid=derive_uid("test-reversed", "study"),
        series_uid=derive_uid("test-reversed", "series"),
        patient_name="DOE^JANE",
        patient_id="REV0001",
        patient_birth_date="19700101",
    )
    series = _one_series(folder)
    loaded = load_series(series)
    assert np.array_equal(loaded.array, study.image[:, :, ::-1].astype(np.float32))
    mask = np.ascontiguousarray(study.mask[:, :, ::-1])  # the mask in the loaded geometry
    assert mask.any() and not np.array_equal(mask, mask[:, :, ::-1])
    out = tmp_path / "seg.dcm"
    write_seg(mask, series.headers, NAMES, ALGORITHM, out)
    assert np.array_equal(_reconstruct(out, series.headers, NAMES), mask)


def test_seg_multiframe_source(case: Case, tmp_path: Path) -> None:
    """An enhanced (multi-frame) source: mask slices are mapped to the source frames through header.frame."""
    datasets = [pydicom.dcmread(path) for path in case.series.files]
    converted = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets, derive_uid("test-mf", "series"), 7, derive_uid("test-mf", "instance"), 1
    )
    folder = tmp_path / "multiframe"
    folder.mkdir()
    converted.save_as(folder / "enhanced.dcm", enforce_file_format=True)
    series = _one_series(folder)
    frames = [h.frame for h in series.headers]
    assert sorted(frames) == list(range(len(frames)))
    assert frames != list(range(len(frames)))  # the converter stores frames in another order than k
    out = tmp_path / "seg.dcm"
    write_seg(case.mask, series.headers, NAMES, ALGORITHM, out)
    ds = pydicom.dcmread(out)
    assert [item.SeriesInstanceUID for item in ds.ReferencedSeriesSequence] == [series.series_uid]
    assert np.array_equal(_reconstruct(out, series.headers, NAMES), case.mask)

    # a series that uses only some frames of its multi-frame file cannot be paired by highdicom
    with pytest.raises(DicomError, match="frames"):
        write_seg(case.mask[:, :, 1:], series.headers[1:], NAMES, ALGORITHM, tmp_path / "partial.dcm")
    assert not (tmp_path / "partial.dcm").exists()


def test_seg_bad_inputs(case: Case, tmp_path: Path) -> None:
    out = tmp_path / "seg.dcm"
    with pytest.raises(InputError, match="does not match the series") as info:
        write_seg(case.mask[:, :, :-1], case.headers, NAMES, ALGORITHM, out, sources=case.sources)
    assert info.value.fix
    with pytest.raises(MedHybridError, match="does not match the series"):
        write_seg(case.mask[:, :, 0], case.headers, NAMES, ALGORITHM, out)
    unnamed = case.mask.copy()
    unnamed[0, 0, 0] = 2
    with pytest.raises(InputError, match=r"label\(s\) \[2\]"):
        write_seg(unnamed, case.headers, NAMES, ALGORITHM, out, sources=case.sources)
    with pytest.raises(MedHybridError, match="no foreground label"):
        write_seg(case.mask, case.headers, {0: "background"}, ALGORITHM, out, sources=case.sources)
    with pytest.raises(DicomError, match="source dataset"):
        write_seg(case.mask, case.headers, NAMES, ALGORITHM, out, sources=case.sources[::-1])
    assert not out.exists()


def test_seg_deterministic_uids(case: Case, tmp_path: Path) -> None:
    first = write_seg(case.mask, case.headers, NAMES, ALGORITHM, tmp_path / "a.dcm", sources=case.sources)
    second = write_seg(case.mask, case.headers, NAMES, ALGORITHM, tmp_path / "b.dcm")
    uids_a = _all_values(pydicom.dcmread(tmp_path / "a.dcm"), "UI")
    uids_b = _all_values(pydicom.dcmread(tmp_path / "b.dcm"), "UI")
    assert uids_a == uids_b
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == derive_uid(case.series.series_uid, ALGORITHM.weights_sha256, "seg", "series")
    # another result: same series, a new instance
    changed = case.mask.copy()
    changed[0, 0, 0] = 1
    third = write_seg(changed, case.headers, NAMES, ALGORITHM, tmp_path / "c.dcm", sources=case.sources)
    assert third.SeriesInstanceUID == first.SeriesInstanceUID
    assert third.SOPInstanceUID != first.SOPInstanceUID


# --- SR ------------------------------------------------------------------------------------------------


def _findings(mask: np.ndarray, probability: float = 0.87654321) -> Findings:
    volume = float(np.count_nonzero(mask == 1)) * 0.75 * 0.75 * 2.5 / 1000.0 + 1.234e-5  # not round
    return Findings(
        probability=probability,
        decision="abnormal" if probability >= 0.5 else "normal",
        threshold=0.5,
        segments=(SegmentFinding(label=1, name="lesion", volume_ml=volume, components=2),),
    )


def test_sr_round_trip(case: Case, tmp_path: Path) -> None:
    seg = write_seg(case.mask, case.headers, NAMES, ALGORITHM, tmp_path / "seg.dcm", sources=case.sources)
    findings = _findings(case.mask)
    out = tmp_path / "sr.dcm"
    write_sr(findings, case.headers, seg, ALGORITHM, out, sources=case.sources)

    sr = hd.sr.srread(out)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.SeriesDescription == "MEDHYBRID SR"
    assert sr.Manufacturer == "medhybrid"
    assert sr.StudyInstanceUID == case.sources[0].StudyInstanceUID
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)

    # probability and decision (rounded to PROBABILITY_DECIMALS)
    (classification,) = report.get_image_measurement_groups()
    (probability,) = classification.get_measurements(name=codes.DCM.Probability)
    assert probability.value == round(findings.probability, PROBABILITY_DECIMALS)
    assert probability.unit == codes.UCUM.NoUnits
    (decision,) = classification.get_qualitative_evaluations(name=codes.DCM.Normality)
    assert decision.value == codes.SCT.Abnormal

    # the lesion class: volume (mL, rounded to VOLUME_DECIMALS), components, reference to the SEG segment
    (group,) = report.get_volumetric_roi_measurement_groups()
    (volume,) = group.get_measurements(name=codes.SCT.Volume)
    assert volume.value == round(findings.segments[0].volume_ml, VOLUME_DECIMALS)
    assert volume.unit.value == "mL" and volume.unit.scheme_designator == "UCUM"
    (count,) = group.get_measurements(name=codes.SCT.NumberOfLesions)
    assert count.value == 2
    ref = group.referenced_segment
    assert ref is not None
    referenced = ref[0].ReferencedSOPSequence[0]  # the "Referenced Segment" IMAGE item
    assert referenced.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert int(referenced.ReferencedSegmentNumber) == 1
    assert group.tracking_uid == seg.SegmentSequence[0].TrackingUID
    assert (seg.StudyInstanceUID, seg.SeriesInstanceUID, seg.SOPInstanceUID, seg.SOPClassUID) in sr.get_evidence()


def test_sr_without_seg(case: Case, tmp_path: Path) -> None:
    findings = _findings(case.mask, probability=0.125)
    out = tmp_path / "sr.dcm"
    write_sr(findings, case.headers, None, ALGORITHM, out, sources=case.sources)
    report = hd.sr.srread(out).content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert report.get_volumetric_roi_measurement_groups() == []
    (classification,) = report.get_image_measurement_groups()
    assert classification.get_measurements(name=codes.DCM.Probability)[0].value == 0.125
    assert classification.get_qualitative_evaluations(name=codes.DCM.Normality)[0].value == codes.SCT.Normal


def test_sr_bad_inputs(case: Case, other_case: Case, tmp_path: Path) -> None:
    seg = write_seg(case.mask, case.headers, NAMES, ALGORITHM, tmp_path / "seg.dcm", sources=case.sources)
    out = tmp_path / "sr.dcm"
    good = _findings(case.mask)
    with pytest.raises(DicomError, match="does not reference this series"):
        write_sr(good, other_case.headers, seg, ALGORITHM, out, sources=other_case.sources)
    with pytest.raises(InputError, match="no segment for class 2"):
        write_sr(
            Findings(0.9, "abnormal", 0.5, (SegmentFinding(2, "nodule", 1.0, 1),)), case.headers, seg, ALGORITHM, out
        )
    with pytest.raises(InputError, match="given together"):  # a decision without its score
        write_sr(Findings(None, "abnormal", 0.5, ()), case.headers, None, ALGORITHM, out)
    with pytest.raises(InputError, match="probability"):
        write_sr(Findings(1.5, "abnormal", 0.5, ()), case.headers, None, ALGORITHM, out)
    with pytest.raises(InputError, match="decision"):
        write_sr(Findings(0.5, "maybe", 0.5, ()), case.headers, None, ALGORITHM, out)
    assert not out.exists()


def test_anatomy_is_coded_as_anatomy_and_gets_no_verdict(case: Case, tmp_path: Path) -> None:
    """A model of normal structures (hippocampus) must not code them as lesions, nor call the scan
    abnormal or normal: the SEG codes Anatomical Structure, the SR has volumes and no Normality."""
    names = {1: "Hippocampus", 2: "Posterior"}  # "Posterior" is a SNOMED qualifier, not a structure
    mask = case.mask.copy()
    mask[:4, :4, :] = 2
    seg = write_seg(
        mask, case.headers, names, ALGORITHM, tmp_path / "seg.dcm", sources=case.sources,
        segment_kinds={1: "anatomy", 2: "anatomy"},
    )  # fmt: skip
    items = list(seg.SegmentSequence)
    assert [i.SegmentedPropertyCategoryCodeSequence[0].CodeValue for i in items] == ["91723000", "91723000"]
    # a label named like a SNOMED CT concept gets that type; another name the generic structure
    assert [i.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for i in items] == [
        "Hippocampus",
        "Anatomical Structure",
    ]
    findings = Findings(
        None,
        None,
        None,
        (
            SegmentFinding(1, "Hippocampus", 2.5, 1, kind="anatomy"),
            SegmentFinding(2, "Posterior", 0.5, 1, kind="anatomy"),
        ),
    )
    write_sr(findings, case.headers, seg, ALGORITHM, tmp_path / "sr.dcm", sources=case.sources)
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    assert report.get_image_measurement_groups() == []  # no study classification, no Normality
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    for group in groups:
        assert group.finding_category.value == "91723000"
        assert group.get_measurements(name=codes.SCT.NumberOfLesions) == []
    assert groups[0].finding_type.meaning == "Hippocampus"
    lesion_seg = write_seg(case.mask, case.headers, NAMES, ALGORITHM, tmp_path / "lesion.dcm", sources=case.sources)
    assert lesion_seg.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"


def test_sr_deterministic_uids(case: Case, tmp_path: Path) -> None:
    seg = write_seg(case.mask, case.headers, NAMES, ALGORITHM, tmp_path / "seg.dcm", sources=case.sources)
    findings = _findings(case.mask)
    write_sr(findings, case.headers, seg, ALGORITHM, tmp_path / "a.dcm", sources=case.sources)
    write_sr(findings, case.headers, seg, ALGORITHM, tmp_path / "b.dcm")
    assert _all_values(pydicom.dcmread(tmp_path / "a.dcm"), "UI") == _all_values(
        pydicom.dcmread(tmp_path / "b.dcm"), "UI"
    )


# --- PHI -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_phi", [False, True])
def test_phi(case: Case, tmp_path: Path, include_phi: bool) -> None:
    source = case.sources[0]
    name, patient_id, birth = str(source.PatientName), str(source.PatientID), str(source.PatientBirthDate)
    assert name and patient_id and birth  # the synthetic headers carry a fake identity
    needles = [name, *name.split("^"), patient_id, birth]
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg = write_seg(case.mask, case.headers, NAMES, ALGORITHM, seg_path, include_phi=include_phi)
    write_sr(_findings(case.mask), case.headers, seg, ALGORITHM, sr_path, include_phi=include_phi)
    for path in (seg_path, sr_path):
        data = path.read_bytes()
        ds = pydicom.dcmread(path)
        values = [value for _, value in _all_values(ds) if value]
        if include_phi:
            assert all(needle.encode() in data for needle in needles), path.name
            assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate) == (name, patient_id, birth)
        else:
            for needle in needles:
                assert needle.encode() not in data, f"{needle!r} found in {path.name}"
                assert not any(needle in value for value in values)
            assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate) == ("", "", "")
    assert str(source.PatientName) == name  # the caller's source headers are left alone


def test_phi_other_identifiers(tmp_path: Path) -> None:
    """Further identifiers of the source (other IDs, nested ones, address, accession, staff, institution)
    do not reach the outputs either without include_phi."""
    other = Dataset()
    other.PatientID = "NESTEDID77"
    other.IssuerOfPatientID = "NESTEDISSUER"
    identity = {
        "OtherPatientIDsSequence": [other],
        "OtherPatientNames": "ALIAS^ANNA",
        "PatientAddress": "12 SECRET LANE",
        "AccessionNumber": "ACC998877",
        "StudyID": "STUDY4242",
        "ReferringPhysicianName": "REFER^RITA",
        "InstitutionName": "ST NOWHERE HOSPITAL",
        "OperatorsName": "OPERA^OTTO",
    }
    image = np.full((16, 12, 3), 40.0)
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])
    folder = tmp_path / "identified"
    write_dicom_series(
        image,
        affine,
        folder,
        study_uid=derive_uid("test-phi", "study"),
        series_uid=derive_uid("test-phi", "series"),
        patient_name="ROE^RICHARD",
        patient_id="PID31337",
        patient_birth_date="19451231",
        extra=identity,
    )
    series = _one_series(folder)
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[4:8, 3:6, 1] = 1
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg = write_seg(mask, series.headers, NAMES, ALGORITHM, seg_path)
    write_sr(_findings(mask), series.headers, seg, ALGORITHM, sr_path)
    needles = ["ROE", "RICHARD", "PID31337", "19451231", "NESTEDID77", "NESTEDISSUER", "ALIAS", "SECRET LANE"]
    needles += ["ACC998877", "STUDY4242", "REFER", "RITA", "NOWHERE", "OPERA^OTTO"]
    for path in (seg_path, sr_path):
        data = path.read_bytes()
        assert [needle for needle in needles if needle.encode() in data] == [], path.name
    assert np.array_equal(_reconstruct(seg_path, series.headers, NAMES), mask)


def test_seg_absent_label(case: Case, tmp_path: Path) -> None:
    """A named label absent from a non-empty mask is a segment without frames, read back as empty."""
    out = tmp_path / "seg.dcm"
    names = {1: "lesion", 2: "nodule"}
    write_seg(case.mask, case.headers, names, ALGORITHM, out, sources=case.sources)
    seg = hd.seg.segread(out)
    assert seg.number_of_segments == 2
    pixels = seg.get_pixels_by_source_instance([h.sop_uid for h in case.headers], assert_missing_frames_are_empty=True)
    assert np.array_equal(pixels[..., 0].transpose(2, 1, 0), case.mask)
    assert not pixels[..., 1].any()
