"""Mutations of real DICOM/NIfTI files for the ingestion fuzzer (``tests/fuzz/harness.py``).

A case is a JSON-ready spec: ``{"kind": "file"|"series"|"nifti", "source": <path relative to the shared data>,
"ops": [...], "seed": n}``. The spec, not the mutated bytes, is what the regression list keeps: the shared
data are never copied into the repository, and a spec replays byte for byte from them.

Mutation operators:
- bytes: flip bits, overwrite runs with 0x00/0xFF, truncate, delete or duplicate a chunk, lie in a 4-byte
  length field (set one to a huge value);
- tags (through pydicom, written without validation): image size (Rows, Columns, NumberOfFrames up to
  10**9), bits (allocated/stored/representation), samples and photometric, Pixel Data emptied / cut /
  doubled, transfer syntax (bogus, private GE, compressed on native data, empty), IPP/IOP/PixelSpacing/
  SliceThickness NaN/inf/zero/degenerate, RescaleSlope/Intercept NaN/inf/0, empty character set, an
  unknown VR, nested sequences (deep), a huge private tag;
- series (a copy of a small real series): a byte-identical duplicate slice in another folder, a truncated
  partial copy, a slice with another orientation/position, a missing slice, a DICOMDIR, junk files.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

BYTE_OPS = ("flip", "run", "truncate", "delete", "duplicate", "length")
TAG_OPS = (
    "size",
    "frames",
    "bits",
    "samples",
    "pixeldata",
    "syntax",
    "geometry",
    "rescale",
    "charset",
    "unknown_vr",
    "nested",
    "private",
)
SERIES_OPS = ("dup_slice", "truncated_copy", "odd_slice", "drop_slice", "junk", "dicomdir", "mutate_one")

PRIVATE_SYNTAXES = [
    "1.2.840.113619.5.2",  # GE private implicit VR big endian
    "1.2.3.4.5",
    "",
    "not-a-uid",
    "1.2.840.10008.1.2.4.100",  # MPEG2: a video syntax
    "1.2.840.10008.1.2.5",  # RLE on data that is not RLE
]
BAD_FLOATS = ["nan", "inf", "-inf", "0", "-0", "1e308", "-1", "1e-320"]


def sources(shared: Path) -> dict[str, list[str]]:
    """Seed files by kind, relative to ``shared`` (``../shared/data``), in a stable order."""
    dicom = shared / "dicom"
    files = sorted(p for p in (dicom / "single").iterdir() if p.is_file())
    files += sorted(p for p in (dicom / "malformed").iterdir() if p.is_file())
    series_dirs = sorted(p.parent for p in dicom.glob("series/*/*/*") if p.is_file())
    series = sorted({d for d in series_dirs if 2 <= len([f for f in d.iterdir() if f.is_file()]) <= 40})
    # one slice of every series stands in as a single file too
    files += [sorted(f for f in d.iterdir() if f.is_file())[0] for d in series]
    nifti = sorted(p for p in (shared / "nifti").rglob("*") if p.is_file() and ".nii" in p.name)
    nifti = [p for p in nifti if p.stat().st_size < 8 << 20]
    rel = lambda ps: [str(p.relative_to(shared)) for p in ps]  # noqa: E731
    return {"file": rel(files), "series": rel(series), "nifti": rel(nifti)}


def make_case(seed: int, index: int, pool: dict[str, list[str]]) -> dict[str, Any]:
    """The ``index``-th case of a run: deterministic in (seed, index)."""
    rng = random.Random(f"{seed}:{index}")
    roll = rng.random()
    kind = "series" if roll < 0.15 and pool["series"] else "nifti" if roll < 0.25 and pool["nifti"] else "file"
    source = rng.choice(pool[kind])
    n_ops = rng.choice((1, 1, 1, 2, 3))
    if kind == "series":
        ops = [rng.choice(SERIES_OPS) for _ in range(rng.choice((1, 1, 2)))]
    elif kind == "nifti":
        ops = [rng.choice(BYTE_OPS + ("nifti_dims", "nifti_affine", "nifti_dtype")) for _ in range(n_ops)]
    else:
        ops = [rng.choice(BYTE_OPS + TAG_OPS + TAG_OPS) for _ in range(n_ops)]
    return {"kind": kind, "source": source, "ops": ops, "seed": rng.randrange(1 << 30)}


# --- materialising a case ---------------------------------------------------------------------------------


def materialise(case: dict[str, Any], shared: Path, workdir: Path) -> Path:
    """Write the case's mutated file(s) under ``workdir``; return the path to give the loader."""
    rng = random.Random(case["seed"])
    src = shared / case["source"]
    if case["kind"] == "series":
        target = workdir / "series"
        shutil.copytree(src, target)
        for op in case["ops"]:
            with contextlib.suppress(Exception):  # an operator that does not apply leaves the series as it is
                _series_op(op, target, rng)
        return target
    data = src.read_bytes()
    suffix = ".nii.gz" if src.name.endswith(".nii.gz") else ".nii" if src.suffix == ".nii" else ".dcm"
    for op in case["ops"]:
        data = _file_op(op, data, rng, suffix)
    out = workdir / f"case{suffix}"
    out.write_bytes(data)
    return out


def _file_op(op: str, data: bytes, rng: random.Random, suffix: str) -> bytes:
    try:
        return _apply(op, data, rng, suffix)
    except Exception:  # an operator that cannot apply to these bytes (an earlier op broke them): flip instead
        return _byte_op("flip", data, rng)


def _apply(op: str, data: bytes, rng: random.Random, suffix: str) -> bytes:
    if op in BYTE_OPS:
        return _byte_op(op, data, rng)
    if op.startswith("nifti_"):
        return _nifti_op(op, data, rng, suffix)
    return _tag_op(op, data, rng)


def _byte_op(op: str, data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    buf = bytearray(data)
    n = len(buf)
    if op == "flip":
        for _ in range(rng.choice((1, 2, 4, 16, 64))):
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
    elif op == "run":
        at = rng.randrange(n)
        buf[at : at + rng.choice((2, 4, 8, 64))] = bytes([rng.choice((0, 0xFF))]) * rng.choice((2, 4, 8, 64))
    elif op == "truncate":
        buf = buf[: rng.randrange(n)]
    elif op == "delete":
        at = rng.randrange(n)
        del buf[at : at + rng.choice((1, 2, 4, 100, 1000))]
    elif op == "duplicate":
        at = rng.randrange(n)
        chunk = buf[at : at + rng.choice((4, 8, 128, 1024))]
        buf[at:at] = chunk
    elif op == "length":
        # element headers early in the file carry 2- or 4-byte lengths: lie in one of them
        at = rng.randrange(min(n, 4096) - 4) if n > 8 else 0
        buf[at : at + 4] = struct.pack("<I", rng.choice((0xFFFFFFFF, 0x7FFFFFFF, 0x10000000, 0xFFFFFFF0, 3)))
    return bytes(buf)


def _read(data: bytes) -> Dataset | None:
    from io import BytesIO

    try:
        return pydicom.dcmread(BytesIO(data), force=True)
    except Exception:  # an earlier op broke the file: tag edits need a parseable file
        return None


def _write(ds: Dataset) -> bytes:
    """The data set's bytes, invalid values and all (writing validation is off while the mutator writes; the
    setting is restored before the code under test runs)."""
    from io import BytesIO

    settings = pydicom.config.settings
    saved = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        out = BytesIO()
        try:
            ds.save_as(out, enforce_file_format=False)
        except Exception:
            out = BytesIO()
            ds.save_as(out, implicit_vr=True, little_endian=True, enforce_file_format=False)
        return out.getvalue()
    except Exception:
        return b""
    finally:
        settings.writing_validation_mode = saved


def _set(ds: Dataset, keyword: str, vr: str, value: Any) -> None:
    ds.add(DataElement(pydicom.datadict.tag_for_keyword(keyword), vr, value, validation_mode=pydicom.config.IGNORE))


def _tag_op(op: str, data: bytes, rng: random.Random) -> bytes:
    ds = _read(data)
    if ds is None:
        return _byte_op("flip", data, rng)
    if op == "size":
        _set(ds, rng.choice(("Rows", "Columns")), "US", rng.choice((0, 1, 3, 65535, 4096, 2)))
    elif op == "frames":
        _set(ds, "NumberOfFrames", "IS", rng.choice(("0", "-1", "2", "100000", "1000000000", "x", "")))
    elif op == "bits":
        keyword = rng.choice(("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"))
        _set(ds, keyword, "US", rng.choice((0, 1, 7, 12, 17, 24, 32, 64, 255)))
    elif op == "samples":
        if rng.random() < 0.5:
            _set(ds, "SamplesPerPixel", "US", rng.choice((0, 2, 3, 4, 255)))
        else:
            _set(ds, "PhotometricInterpretation", "CS", rng.choice(("RGB", "YBR_FULL", "PALETTE COLOR", "BOGUS", "")))
    elif op == "pixeldata":
        if "PixelData" in ds:
            raw = ds.PixelData or b""
            choice = rng.choice(("empty", "cut", "double", "odd"))
            new = {"empty": b"", "cut": raw[: len(raw) // rng.choice((2, 3, 10))], "double": raw * 2}.get(
                choice, raw[:-1]
            )
            ds.PixelData = new
    elif op == "syntax":
        if not hasattr(ds, "file_meta"):
            ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = rng.choice(PRIVATE_SYNTAXES)
    elif op == "geometry":
        keyword = rng.choice(("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"))
        size = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}.get(keyword, 1)
        if rng.random() < 0.3 and keyword == "ImageOrientationPatient":
            values = rng.choice((["1", "0", "0", "1", "0", "0"], ["0"] * 6, ["1", "0", "0", "0.5", "0.5", "0"]))
        else:
            values = [rng.choice(BAD_FLOATS) for _ in range(size)]
        _set(ds, keyword, "DS", values if size > 1 else values[0])
    elif op == "rescale":
        _set(ds, rng.choice(("RescaleSlope", "RescaleIntercept")), "DS", rng.choice(BAD_FLOATS))
    elif op == "charset":
        _set(ds, "SpecificCharacterSet", "CS", rng.choice(("", "ISO_IR 999", "\\", "ISO 2022 IR 87\\")))
    elif op == "unknown_vr":
        buf = _write(ds)
        at = buf.find(b"CS", 200)  # an explicit-VR element after the File Meta: rename its VR
        if at > 0:
            buf = buf[:at] + rng.choice((b"ZZ", b"\x00\x00", b"Q!")) + buf[at + 2 :]
        return buf
    elif op == "nested":
        item: Dataset = Dataset()
        item.CodeValue = "X"
        for _ in range(rng.choice((2, 30, 200))):
            outer = Dataset()
            outer.ReferencedImageSequence = Sequence([item])
            item = outer
        ds.SourceImageSequence = Sequence([item])
    elif op == "private":
        ds.add_new(0x00991010, "OB", b"\x00" * rng.choice((1 << 10, 1 << 20, 8 << 20)))
    return _write(ds)


def _nifti_op(op: str, data: bytes, rng: random.Random, suffix: str) -> bytes:
    import gzip

    raw = gzip.decompress(data) if suffix == ".nii.gz" else data
    if len(raw) < 352:
        return data
    buf = bytearray(raw)
    if op == "nifti_dims":  # dim[0..7] at offset 40, int16 each
        slot = rng.randrange(0, 8)
        struct.pack_into("<h", buf, 40 + 2 * slot, rng.choice((0, -1, 1024, 32767, 8, 1)))
    elif op == "nifti_affine":  # pixdim at 76 (float32 x8), srow at 280 (float32 x12)
        at = rng.choice((76 + 4 * rng.randrange(8), 280 + 4 * rng.randrange(12)))
        struct.pack_into("<f", buf, at, rng.choice((float("nan"), float("inf"), 0.0, 1e30)))
    elif op == "nifti_dtype":  # datatype at 70, bitpix at 72
        struct.pack_into("<h", buf, rng.choice((70, 72)), rng.choice((0, 1, 3, 2048, 128, 1536, -5)))
    raw = bytes(buf)
    return gzip.compress(raw, mtime=0) if suffix == ".nii.gz" else raw


def _series_op(op: str, folder: Path, rng: random.Random) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        return
    victim = rng.choice(files)
    if op == "dup_slice":
        copy_dir = folder / "copy"
        copy_dir.mkdir(exist_ok=True)
        shutil.copy2(victim, copy_dir / victim.name)
    elif op == "truncated_copy":
        data = victim.read_bytes()
        (folder / f"partial_{victim.name}").write_bytes(data[: rng.randrange(200, max(201, len(data) - 1))])
    elif op == "odd_slice":
        ds = _read(victim.read_bytes())
        if ds is not None:
            if rng.random() < 0.5 and "ImageOrientationPatient" in ds:
                ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
            elif "ImagePositionPatient" in ds:
                ds.ImagePositionPatient = [float(v) + rng.choice((0.0, 0.3, 100.0)) for v in ds.ImagePositionPatient]
            victim.write_bytes(_write(ds))
    elif op == "drop_slice" and len(files) > 2:
        files[len(files) // 2].unlink()
    elif op == "junk":
        (folder / "notes.txt").write_text("not dicom")
        (folder / "IM0001").write_bytes(bytes(rng.randrange(256) for _ in range(300)))
    elif op == "dicomdir":
        (folder / "DICOMDIR").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\x00\x00\x00\x00")
    elif op == "mutate_one":
        victim.write_bytes(_tag_op(rng.choice(TAG_OPS), victim.read_bytes(), rng))
