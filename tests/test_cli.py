"""The command line: version, help everywhere, one-line domain errors, scan and synth end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medhybrid import __version__
from medhybrid.cli import app

runner = CliRunner()
COMMANDS = [[], ["data"], ["data", "scan"], ["data", "inspect"], ["data", "synth"], ["data", "validate"]]
COMMANDS += [["data", "import-medmnist"], ["data", "import-msd"], ["models"]]


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_help_on_every_command(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_domain_error_is_one_line_exit_1(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "medhybrid", "data", "inspect", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "nowhere" in lines[0] and "fix:" in lines[0]


def test_synth_then_scan_is_clean_and_phi_free(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    result = runner.invoke(app, ["data", "synth", str(out), "--n", "4", "--dims", "3", "--format", "both"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "scan", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    series = [s for study in report["studies"] for s in study["series"]]
    dicom = [s for s in series if s["format"] == "dicom"]
    assert len(dicom) == 4 and all(s["qc"]["verdict"] == "ok" for s in dicom)
    assert report["rejected_files"] == []
    # the synthetic DICOM carries fake patient names and IDs; none may reach the scan output
    import pydicom

    first = next((out / "dicom").rglob("*.dcm"))
    ds = pydicom.dcmread(first)
    for phi in (str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate)):
        assert phi and phi not in result.stdout
    validate = runner.invoke(app, ["data", "validate", str(out / "manifest.csv")])
    assert validate.exit_code == 0, validate.output


def test_scan_of_junk_folder_exits_zero(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(b"not dicom" * 40)
    (tmp_path / "b.txt").write_text("hello")
    (tmp_path / "c.nii.gz").write_bytes(b"\x1f\x8bbroken")
    result = runner.invoke(app, ["data", "scan", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {Path(p["path"]).name for p in report["rejected_files"]} == {"a.dcm", "c.nii.gz"}
    assert [Path(p["path"]).name for p in report["skipped_files"]] == ["b.txt"]


def test_validate_reports_errors_with_exit_1(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("study_id,image,label,mask,split\na,missing.nii.gz,1,,train\n")
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "m.csv")])
    assert result.exit_code == 1
    assert "image_missing" in result.output
