"""PHI audit: patient data in DICOM headers never reaches an output, a file name or a log.

The whole chain runs as a user runs it (``data scan``, ``inspect``, ``validate``, ``train``, ``evaluate``,
``infer``, each with ``-vv`` in its own process) over a tiny DICOM cohort whose headers carry distinctive
fake identities; then every byte written (and decoded where it is encoded: gzip, zip members and names
such as the checkpoints' pickles, PNG text chunks, base64 images inside HTML), every file and folder name
and the captured stdout/stderr are searched for each identity and its usual reformattings. Without
``--include-phi`` nothing may be found, the DICOM SEG and SR included (their identity attributes are
emptied or dropped); with it, only the outputs docs/inference.md names carry identity.

Also here: third-party warnings (pydicom on odd header values, MONAI, torch) go to the log, so that they
are hidden by default and shown with ``-v``.
"""

from __future__ import annotations

import base64
import gzip
import io
import os
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from medhybrid.data.synth import synthesize_cohort

# Distinctive fake identities written into every source header. Each search term is long or
# distinctive enough that chance matches in binary data or base64 are out of the question.
PHI_HEADERS: dict[str, str] = {
    "PatientName": "ZQXPHIName^Zebulon",
    "PatientID": "PHIID-7731945",
    "PatientBirthDate": "19230417",
    "OtherPatientIDs": "PHIOTHER-5519302",
    "PatientAddress": "9 Zqxbury Road, Phiton",
    "InstitutionName": "Qwyxfield Institute of Phi",
    "InstitutionAddress": "42 Zqxwell Lane, Phiville",
    "InstitutionalDepartmentName": "Zqxradiology Department",
    "StationName": "ZQXSTATION7",
    "ReferringPhysicianName": "ZQXRefdoc^Quintessa",
    "PerformingPhysicianName": "ZQXPerfdoc^Yolanthe",
    "OperatorsName": "ZQXOperator^Xanthippe",
    "AccessionNumber": "ACCZQX88412",
    "StudyID": "STZQX3301",
}
SEARCH_TERMS: tuple[str, ...] = (
    "ZQXPHIName",
    "Zebulon",
    "PHIID-7731945",
    "PHIID7731945",
    "19230417",
    "1923-04-17",
    "1923/04/17",
    "17.04.1923",
    "17/04/1923",
    "04/17/1923",
    "PHIOTHER",
    "Zqxbury",
    "Qwyxfield",
    "Zqxwell",
    "Phiville",
    "Zqxradiology",
    "ZQXSTATION7",
    "ZQXRefdoc",
    "Quintessa",
    "ZQXPerfdoc",
    "Yolanthe",
    "ZQXOperator",
    "Xanthippe",
    "ACCZQX88412",
    "STZQX3301",
)
TERMS = tuple(t.lower().encode() for t in SEARCH_TERMS)
DIGITS = b"0123456789"
DATA_URI = re.compile(rb"data:[\w/+.-]+;base64,([A-Za-z0-9+/=]+)")
N_STUDIES = 8


# --- the search ------------------------------------------------------------------------------------
def _png_text(data: bytes) -> Iterator[bytes]:
    """The text chunks of a PNG: tEXt as it is, zTXt and iTXt inflated (pixels hold no text to find)."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"tEXt":
            yield body
        elif kind in (b"zTXt", b"iTXt"):
            for start in range(len(body)):  # the compressed text follows a keyword and flags
                try:
                    yield zlib.decompress(body[start:])
                    break
                except zlib.error:
                    continue


def payloads(data: bytes, depth: int = 0) -> Iterator[bytes]:
    """``data`` and whatever it holds decoded: gzip, zip members and names, PNG text, base64 data URIs."""
    yield data
    if depth > 3:
        return
    inner: list[bytes] = []
    if data[:2] == b"\x1f\x8b":
        inner.append(gzip.decompress(data))
    elif data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            inner += [name.encode() for name in archive.namelist()]
            inner += [archive.read(name) for name in archive.namelist()]
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        inner += list(_png_text(data))
    inner += [base64.b64decode(m.group(1) + b"==") for m in DATA_URI.finditer(data)]
    for blob in inner:
        yield from payloads(blob, depth + 1)


def _terms_in(blob: bytes) -> set[str]:
    """Search terms in ``blob``, ignoring case; a term that starts or ends with a digit must not continue
    into more digits, so that "19230417" is not found inside a float such as 0.1923041712."""
    low, found = blob.lower(), set()
    for term in TERMS:
        start = low.find(term)
        while start >= 0:
            end = start + len(term)
            digit_before = term[0] in DIGITS and start > 0 and low[start - 1] in DIGITS
            digit_after = term[-1] in DIGITS and end < len(low) and low[end] in DIGITS
            if not (digit_before or digit_after):
                found.add(term.decode())
                break
            start = low.find(term, start + 1)
    return found


def find_phi(text: bytes | str) -> set[str]:
    """The search terms found in ``text`` or what it holds (also with whitespace removed: rich wraps lines)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    found: set[str] = set()
    for blob in payloads(data):
        found |= _terms_in(blob) | _terms_in(blob.translate(None, b" \t\r\n"))
    return found


def audit(roots: list[Path], logs: dict[str, str]) -> dict[str, set[str]]:
    """Where each search term occurs: file contents, file and folder names, and the given logs."""
    leaks: dict[str, set[str]] = {}
    for where, text in logs.items():
        if hits := find_phi(text):
            leaks[where] = hits
    for root in roots:
        for path in sorted(root.rglob("*")):
            if hits := find_phi(str(path.relative_to(root))):
                leaks[f"name of {path}"] = hits
            if path.is_file() and not path.is_symlink() and (hits := find_phi(path.read_bytes())):
                leaks[str(path)] = hits
    return leaks


# --- the chain ---------------------------------------------------------------------------------------
@dataclass
class Chain:
    cohort: Path  # the input (not audited: its paths and headers are the user's)
    work: Path  # every command's output and working directory
    tmp: Path  # TMPDIR of the commands
    logs: dict[str, str]  # stdout and stderr of every command


def run_cli(args: list[str], cwd: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    # A wide console keeps rich from wrapping (the search also looks through wrapping).
    env = {**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp)}
    return subprocess.run(
        [sys.executable, "-m", "medhybrid", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def put_phi(path: Path) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in PHI_HEADERS.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def tiny_pipeline(manifest: Path, out: Path) -> Path:
    raw = {
        "name": "phi_audit",
        "data": {
            "manifest": str(manifest),
            "task": "multitask",
            "spatial_dims": 2,
            "modality": "CT",
            "intensity": "ct_soft_tissue",
            "spacing": [2.0, 2.0],
            "spatial_size": [64, 64],
        },
        "model": {"name": "hybrid_tiny_2d"},
        "train": {"batch_size": 2, "stages": [{"name": "all", "epochs": 1, "lr": 0.003}]},
        "eval": {"metrics": ["auroc", "dice", "loss"], "select": "auroc"},
        "runtime": {"seed": 0, "threads": 2},
    }
    out.write_text(yaml.safe_dump(raw))
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    root = tmp_path_factory.mktemp("phi_audit")
    manifest = synthesize_cohort(root / "cohort", n=N_STUDIES, dims=2, fmt="dicom", seed=5)
    cohort = manifest.parent
    for path in (cohort / "dicom").rglob("*.dcm"):
        put_phi(path)
    source = cohort / "dicom" / "synth_0000" / "IM0001.dcm"
    # a file that cannot be read (rejected at discovery, logged) and a study that fails QC (two images at
    # one position: listed as failed in summary.csv, index.html and infer.log, with its error message)
    truncated = cohort / "dicom" / "truncated" / "IM0001.dcm"
    truncated.parent.mkdir()
    truncated.write_bytes(source.read_bytes()[:-2000])
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    (cohort / "dicom" / "duplicate").mkdir()
    for name in ("IM0001.dcm", "IM0002.dcm"):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(cohort / "dicom" / "duplicate" / name)
    work, tmp = root / "work", root / "tmp"
    work.mkdir()
    tmp.mkdir()
    pipeline = tiny_pipeline(manifest, work / "pipeline.yaml")
    commands = {
        "scan": ["-vv", "data", "scan", str(cohort)],
        "scan --json": ["-vv", "data", "scan", str(cohort), "--json"],
        "inspect": ["-vv", "data", "inspect", str(source.parent), "--save", str(work / "inspect.nii.gz")],
        "validate": ["-vv", "data", "validate", str(manifest)],
        "train": ["-vv", "train", str(pipeline), "--out", str(work / "run")],
        "evaluate": [
            "-vv",
            "evaluate",
            "--model",
            str(work / "run"),
            "--manifest",
            str(manifest),
            "--out",
            str(work / "evaluation"),
            "--bootstrap",
            "50",
        ],
        "infer": ["-vv", "infer", str(cohort / "dicom"), "--model", str(work / "run"), "--out", str(work / "infer")],
    }
    logs: dict[str, str] = {}
    for name, args in commands.items():
        result = run_cli(args, cwd=work, tmp=tmp)
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        logs[f"{name} stdout"], logs[f"{name} stderr"] = result.stdout, result.stderr
    return Chain(cohort, work, tmp, logs)


def test_no_patient_data_in_any_output_file_name_or_log(chain: Chain) -> None:
    # the audit is not vacuous: the sources carry the identities and the chain wrote what it should
    in_headers = {t.lower() for t in SEARCH_TERMS if any(t.lower() in v.lower() for v in PHI_HEADERS.values())}
    assert find_phi((chain.cohort / "dicom" / "synth_0000" / "IM0001.dcm").read_bytes()) == in_headers
    written = {p.relative_to(chain.work).as_posix() for p in chain.work.rglob("*") if p.is_file()}
    for expected in ("run/best.pt", "run/last.pt", "evaluation/metrics.json", "evaluation/report.html"):
        assert expected in written
    for suffix in ("report.json", "report.html", "seg.dcm", "sr.dcm", "thumb.png", "mask.nii.gz"):
        assert sum(n.startswith("infer/") and n.endswith(f"/{suffix}") for n in written) == N_STUDIES, suffix
    for name in ("infer/summary.csv", "infer/index.html", "infer/infer.log", "inspect.nii.gz"):
        assert name in written
    assert "no_series" in (chain.work / "infer" / "summary.csv").read_text()  # the QC failure is listed
    assert all(chain.logs[f"{command} stderr"] for command in ("train", "evaluate", "infer"))  # -vv speaks

    leaks = audit([chain.work, chain.tmp], chain.logs)
    assert not leaks, "\n".join(f"{where}: {sorted(terms)}" for where, terms in sorted(leaks.items()))


PATIENT = {"zqxphiname", "zebulon", "phiid-7731945", "19230417"}
# what the SEG and SR keep with --include-phi: patient and study identification (highdicom's patient and
# study modules) and the source's equipment, which highdicom records as contributing equipment
STUDY = {"acczqx88412", "stzqx3301", "zqxrefdoc", "quintessa"}
EQUIPMENT = {"qwyxfield", "zqxwell", "phiville", "zqxradiology", "zqxstation7"}


def test_include_phi_puts_identity_only_where_documented(chain: Chain, tmp_path: Path) -> None:
    out = tmp_path / "out"
    study = chain.cohort / "dicom" / "synth_0000"
    args = ["-vv", "infer", str(study), "--model", str(chain.work / "run"), "--out", str(out), "--include-phi"]
    result = run_cli(args, cwd=tmp_path, tmp=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (p for p in out.iterdir() if p.is_dir())
    leaks = audit([out], {"stdout": result.stdout, "stderr": result.stderr})
    assert leaks == {
        str(folder / "report.json"): PATIENT,
        str(folder / "report.html"): PATIENT,
        str(folder / "seg.dcm"): PATIENT | STUDY | EQUIPMENT,
        str(folder / "sr.dcm"): PATIENT | STUDY | EQUIPMENT,
    }


@pytest.mark.parametrize(
    "encode",
    [
        lambda s: s.encode(),
        lambda s: s.replace("^", " ").upper().encode(),
        lambda s: gzip.compress(s.encode()),
        lambda s: b'<img src="data:image/png;base64,' + base64.b64encode(s.encode()) + b'">',
        lambda s: _zip({"archive/data.pkl": s.encode()}),
        lambda s: _zip({s + "/x": b""}),
        lambda s: _png_with_text(b"zTXt", b"Comment\x00\x00" + zlib.compress(s.encode())),
        lambda s: _png_with_text(b"tEXt", b"Comment\x00" + s.encode()),
        lambda s: ("x" * 70 + s[:6] + "\n      " + s[6:]).encode(),  # wrapped by rich
    ],
    ids=["plain", "upper", "gzip", "data-uri", "zip-member", "zip-name", "png-ztxt", "png-text", "wrapped"],
)
def test_the_audit_finds_what_it_looks_for(tmp_path: Path, encode: Callable[[str], bytes]) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file.bin").write_bytes(encode(f"name {PHI_HEADERS['PatientName']} end"))
    assert audit([tmp_path / "out"], {}) == {str(tmp_path / "out" / "file.bin"): {"zqxphiname", "zebulon"}}


def test_the_audit_looks_at_names_and_logs_and_spares_digits_in_floats(tmp_path: Path) -> None:
    (tmp_path / "out" / "PHIID-7731945").mkdir(parents=True)
    (tmp_path / "out" / "PHIID-7731945" / "probabilities.json").write_text('{"p": 0.1923041712, "q": 519230417}')
    leaks = audit([tmp_path / "out"], {"stderr": "born 1923-04-17"})
    assert leaks == {
        "stderr": {"1923-04-17"},
        f"name of {tmp_path / 'out' / 'PHIID-7731945'}": {"phiid-7731945"},
        f"name of {tmp_path / 'out' / 'PHIID-7731945' / 'probabilities.json'}": {"phiid-7731945"},
    }


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _png_with_text(kind: bytes, body: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(kind, body)
        + chunk(b"IDAT", zlib.compress(b"\x00\x00"))
        + chunk(b"IEND", b"")
    )


# --- third-party warnings ---------------------------------------------------------------------------
INVALID_UID = "1.2.abc.3"  # pydicom: "UserWarning: Invalid value for VR UI: '1.2.abc.3'" when highdicom reads it


def test_third_party_warnings_are_logged_not_printed(chain: Chain, tmp_path: Path) -> None:
    """A pydicom UserWarning (raised while highdicom builds the SEG) is hidden by default, shown with -v."""
    source = pydicom.dcmread(chain.cohort / "dicom" / "synth_0000" / "IM0001.dcm")
    source.StudyInstanceUID, source.SeriesInstanceUID = generate_uid(), generate_uid()
    tag = Tag("FrameOfReferenceUID")
    value = INVALID_UID.encode() + b"\x00"  # a UI value is padded with NUL to an even length
    source[tag] = RawDataElement(tag, "UI", len(value), value, 0, False, True)
    (tmp_path / "in" / "odd").mkdir(parents=True)
    source.save_as(tmp_path / "in" / "odd" / "IM0001.dcm")
    model = chain.work / "run"
    for verbosity, shown in (([], False), (["-v"], True)):
        out = tmp_path / f"out{len(verbosity)}"
        result = run_cli(
            [*verbosity, "infer", str(tmp_path / "in"), "--model", str(model), "--out", str(out)], tmp_path, tmp_path
        )
        assert result.returncode == 0, result.stderr
        assert ("UserWarning" in result.stderr) is shown, result.stderr
        assert (INVALID_UID in result.stderr) is shown, result.stderr


def test_warnings_go_through_the_cli_log_configuration() -> None:
    code = (
        "import sys, warnings; from medhybrid.cli import configure_logging; "
        "configure_logging(int(sys.argv[1])); warnings.warn('odd value zqxwarn', UserWarning)"
    )
    for verbosity in (0, 1, 2):
        result = subprocess.run([sys.executable, "-c", code, str(verbosity)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert ("odd value zqxwarn" in result.stderr) is (verbosity > 0), result.stderr
