"""Series selection: explicit rules, never a silent first pick."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medhybrid.errors import AmbiguousSeriesError, ConfigError, NoSeriesError
from medhybrid.io.dicom import discover_dicom
from medhybrid.io.dicom_write import derive_uid, write_dicom_series
from medhybrid.io.scan import load_study
from medhybrid.io.select import SelectionRules, select_for_model, select_series


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    """One study: a 3-slice localizer, a 12-slice CT 'ART', a 20-slice CT 'VEN' and a 20-slice MR."""
    root = tmp_path / "study"
    for name, modality, n in (("LOCALIZER", "CT", 3), ("ART", "CT", 12), ("VEN", "CT", 20), ("T1", "MR", 20)):
        write_dicom_series(
            np.zeros((8, 8, n)),
            np.diag([-1.0, -1.0, 2.0, 1.0]),
            root / name,
            modality=modality,
            study_uid=derive_uid("study"),
            series_uid=derive_uid("series", name),
            series_description=name,
        )
    return root


def test_ambiguous_study_lists_candidates(study: Path) -> None:
    with pytest.raises(AmbiguousSeriesError) as err:
        load_study(study)
    text = str(err.value)
    for name in ("LOCALIZER", "ART", "VEN", "T1"):
        assert name in text
    assert "fix:" in text and "--series-description" in text


def test_rules_pick_one(study: Path) -> None:
    series = discover_dicom(study).series
    assert select_series(series, SelectionRules(modalities=("MR",))).description == "T1"
    assert select_series(series, SelectionRules(description="^ven$")).description == "VEN"
    ct = SelectionRules(modalities=("CT",), min_slices=10)
    with pytest.raises(AmbiguousSeriesError):
        select_series(series, ct)
    assert select_series(series, SelectionRules(modalities=("CT",), largest=True)).description == "VEN"
    # a tie in size stays ambiguous even with largest
    with pytest.raises(AmbiguousSeriesError):
        select_series(series, SelectionRules(min_slices=20, largest=True))
    assert load_study(study, SelectionRules(description="ART")).spatial_shape == (8, 8, 12)


def test_no_match_explains_each_series(study: Path) -> None:
    with pytest.raises(NoSeriesError) as err:
        select_series(discover_dicom(study).series, SelectionRules(modalities=("PT",)))
    assert str(err.value).count("modality") >= 4


def test_bad_rules_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        SelectionRules(min_slices=0)
    with pytest.raises(ConfigError):
        SelectionRules(description="([")


def test_the_models_modality_decides_or_marks_the_study_out_of_scope(tmp_path: Path) -> None:
    def series(name: str, modality: str, n: int) -> None:
        write_dicom_series(
            np.zeros((8, 8, n)),
            np.diag([-1.0, -1.0, 2.0, 1.0]),
            tmp_path / "study" / name,
            modality=modality,
            study_uid=derive_uid("study"),
            series_uid=derive_uid("series", name),
            series_description=name,
        )

    series("T1", "MR", 20)
    series("FLAIR", "MR", 12)
    mr_only = discover_dicom(tmp_path / "study").series
    with pytest.raises(AmbiguousSeriesError):
        select_series(mr_only, SelectionRules())
    choice = select_for_model(mr_only, SelectionRules(), ("CT",))
    assert choice.series.description == "T1"  # the largest is shown
    assert choice.out_of_scope is not None and "2 MR" in choice.out_of_scope and "no CT series" in choice.out_of_scope
    # a model of that modality leaves the ambiguity to the user; so does a modality rule the user set
    with pytest.raises(AmbiguousSeriesError):
        select_for_model(mr_only, SelectionRules(), ("MR",))
    with pytest.raises(NoSeriesError):
        select_for_model(mr_only, SelectionRules(modalities=("CT",)), ("CT",))
    series("CT", "CT", 10)
    mixed = discover_dicom(tmp_path / "study").series
    choice = select_for_model(mixed, SelectionRules(), ("CT",))
    assert choice.series.description == "CT" and choice.out_of_scope is None
