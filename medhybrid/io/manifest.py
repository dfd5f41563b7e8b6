"""The manifest: a CSV listing the studies of a data set, with an optional JSON sidecar.

CSV schema (UTF-8, header on line 1; see ``docs/manifests.md``)
------------------------------------------------------------------
* ``study_id`` (required, non-empty): the study's identifier.
* ``image`` (required, non-empty): an image file (NIfTI, NRRD, MHA, PNG) or a DICOM folder.
* ``label`` (may be empty): integer class; empty for segmentation-only data.
* ``mask`` (may be empty): a label-map file in the image's geometry.
* ``split``: ``train``, ``val`` or ``test`` (other non-empty names are allowed but reported).
* ``patient_id`` (optional column, may be empty): the patient a study belongs to. Where set, a patient
  may not span splits (``data validate``), cross-validation folds keep a patient's studies together, and
  bootstrap CIs resample patients instead of studies.
* any further column is kept, as text, in :attr:`ManifestRow.extra`.

Paths are relative to the manifest's folder (absolute paths are allowed). The sidecar is the JSON file
with the manifest's stem next to it (``manifest.csv`` -> ``manifest.json``)::

    {"label_names": {"0": "normal", "1": "pneumonia"}, "mask_label_names": {"0": "background"},
     "task": "classification | segmentation | multitask", "source": "...",
     "mask_kind": "anatomy | lesion", "mask_label_kinds": {"2": "lesion"}}

``mask_kind`` says what the mask labels are (default ``lesion``), ``mask_label_kinds`` overrides it per
label (see :mod:`medhybrid.evaluate.study_score`).

Validation lives in :mod:`medhybrid.io.manifest_validate` (``validate_manifest``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medhybrid.errors import ManifestError
from medhybrid.io.writers import atomic_write_bytes

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("study_id", "image", "label", "mask", "split")
PATIENT_COLUMN = "patient_id"  # optional
KNOWN_SPLITS: tuple[str, ...] = ("train", "val", "test")
TASKS: tuple[str, ...] = ("classification", "segmentation", "multitask")
AFFINE_ATOL_MM = 1e-3  # mask vs image affine tolerance


@dataclass
class ManifestRow:
    """One study of a manifest.

    Attributes:
        study_id: identifier, non-empty.
        image: absolute, normalised path of the image file or DICOM folder.
        label: integer class, or ``None`` (segmentation-only data).
        mask: absolute, normalised path of the label map, or ``None``.
        split: ``train``, ``val``, ``test`` or another name (reported by validation); may be empty.
        extra: the other columns, as text.
        line: the CSV line the row was read from (``None`` for rows built in code).
        patient_id: the patient (optional column; ``None`` when absent or empty).
    """

    study_id: str
    image: Path
    label: int | None = None
    mask: Path | None = None
    split: str = "train"
    extra: dict[str, str] = field(default_factory=dict)
    line: int | None = field(default=None, compare=False)
    patient_id: str | None = None

    @property
    def group(self) -> str:
        """The unit of independent sampling: the patient where known, else the study itself."""
        return f"patient:{self.patient_id}" if self.patient_id else f"study:{self.study_id}"


@dataclass
class Manifest:
    """A manifest file read into memory (see the module docstring for the format)."""

    path: Path
    rows: list[ManifestRow]
    label_names: dict[int, str] = field(default_factory=dict)
    mask_label_names: dict[int, str] = field(default_factory=dict)
    task: str | None = None
    source: str | None = None
    sidecar: dict[str, Any] = field(default_factory=dict)
    mask_kind: str | None = None
    mask_label_kinds: dict[int, str] = field(default_factory=dict)

    @property
    def has_patients(self) -> bool:
        """Some row names its patient (then folds and bootstraps group by patient)."""
        return any(r.patient_id for r in self.rows)

    def split(self, name: str) -> list[ManifestRow]:
        """The rows of one split, in file order."""
        return [r for r in self.rows if r.split == name]

    def splits(self) -> list[str]:
        """The split names present: train, val, test first, then the others alphabetically."""
        return sorted({r.split for r in self.rows}, key=_split_rank)

    def label_counts(self, split: str | None = None) -> dict[int, int]:
        """Number of labelled rows per label, over one split or (``None``) the whole manifest."""
        counts: dict[int, int] = {}
        for r in self.rows:
            if r.label is not None and (split is None or r.split == split):
                counts[r.label] = counts.get(r.label, 0) + 1
        return dict(sorted(counts.items()))


def _split_rank(name: str) -> tuple[int, str]:
    return (KNOWN_SPLITS.index(name) if name in KNOWN_SPLITS else len(KNOWN_SPLITS), name)


def sidecar_path(manifest_path: Path) -> Path:
    """The sidecar JSON of a manifest: same folder, same stem, ``.json``."""
    return Path(manifest_path).with_suffix(".json")


# --- reading -----------------------------------------------------------------------------------


def read_manifest(path: Path) -> Manifest:
    """Read a manifest CSV and its sidecar JSON (if any).

    Raises:
        ManifestError: the file is missing or unreadable, a required column is missing, a row has the
            wrong number of fields, an empty ``study_id`` or ``image``, or a label that is not an
            integer (the message names the file and line); or the sidecar is not valid JSON of the
            documented shape.
    """
    path = Path(path)
    base = path.parent.resolve()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError("manifest not found", path=path, fix="check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot be read ({exc})", path=path, fix="give a UTF-8 CSV file") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise ManifestError("empty file, no header", path=path, fix=_header_fix()) from None
    except csv.Error as exc:
        raise ManifestError(f"line 1: {exc}", path=path) from None
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ManifestError(f"line 1: missing column(s) {missing}; header is {header}", path=path, fix=_header_fix())
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise ManifestError(f"line 1: repeated column(s) {dupes}", path=path, fix="give each column once")
    rows: list[ManifestRow] = []
    try:
        for values in reader:
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue  # blank line
            if len(values) != len(header):
                raise ManifestError(
                    f"line {line}: {len(values)} fields but the header has {len(header)}",
                    path=path,
                    fix="quote fields that contain commas",
                )
            rows.append(_parse_row(dict(zip(header, values, strict=True)), line, base, path))
    except csv.Error as exc:
        raise ManifestError(f"line {reader.line_num}: {exc}", path=path) from None
    manifest = Manifest(path=path, rows=rows)
    _read_sidecar(manifest)
    logger.debug("read %d rows from %s", len(rows), path)
    return manifest


def _header_fix() -> str:
    return "the first line must name the columns " + ",".join(REQUIRED_COLUMNS)


def _parse_row(record: dict[str, str], line: int, base: Path, path: Path) -> ManifestRow:
    values = {k: v.strip() for k, v in record.items()}
    study_id = values.pop("study_id")
    if not study_id:
        raise ManifestError(f"line {line}: empty study_id", path=path, fix="give every row a study_id")
    image = values.pop("image")
    if not image:
        raise ManifestError(f"line {line}: empty image ({study_id})", path=path, fix="give every row an image")
    label_text = values.pop("label")
    mask = values.pop("mask")
    return ManifestRow(
        study_id=study_id,
        image=_resolve(image, base),
        label=_parse_label(label_text, line, path),
        mask=_resolve(mask, base) if mask else None,
        split=values.pop("split"),
        patient_id=values.pop(PATIENT_COLUMN, "") or None,
        extra=values,
        line=line,
    )


def _parse_label(text: str, line: int, path: Path) -> int | None:
    """An integer label; integral decimals such as ``1.0`` (as pandas writes them) are accepted."""
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if number.is_integer():
        return int(number)
    raise ManifestError(
        f"line {line}: label {text!r} is not an integer",
        path=path,
        fix="use integer class labels (or leave empty)",
    )


def _resolve(text: str, base: Path) -> Path:
    """Absolute, lexically normalised path (``base`` is already physical, so ``..`` stays correct)."""
    return Path(os.path.normpath(base / Path(text).expanduser()))


def _read_sidecar(manifest: Manifest) -> None:
    side = sidecar_path(manifest.path)
    if not side.is_file():
        return
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"sidecar is not valid JSON ({exc})", path=side, fix="repair or remove it") from None
    if not isinstance(data, dict):
        raise ManifestError("sidecar must hold a JSON object", path=side, fix="see docs/manifests.md")
    manifest.sidecar = data
    manifest.label_names = _names(data.get("label_names"), "label_names", side)
    manifest.mask_label_names = _names(data.get("mask_label_names"), "mask_label_names", side)
    for key in ("task", "source"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise ManifestError(f"{key!r} must be a string, got {value!r}", path=side)
    manifest.task = data.get("task")
    manifest.source = data.get("source")
    kind = data.get("mask_kind")
    if kind is not None and kind not in ("anatomy", "lesion"):
        raise ManifestError(f"mask_kind must be 'anatomy' or 'lesion', got {kind!r}", path=side)
    manifest.mask_kind = kind
    kinds = _names(data.get("mask_label_kinds"), "mask_label_kinds", side)
    bad = {k: v for k, v in kinds.items() if v not in ("anatomy", "lesion")}
    if bad:
        raise ManifestError(f"mask_label_kinds: {bad} are not 'anatomy' or 'lesion'", path=side)
    manifest.mask_label_kinds = kinds


def _names(value: Any, key: str, side: Path) -> dict[int, str]:
    if value is None:
        return {}
    fix = f'write {key} as {{"0": "name", "1": "name"}}'
    if not isinstance(value, dict):
        raise ManifestError(f"{key} must be an object", path=side, fix=fix)
    names: dict[int, str] = {}
    for k, v in value.items():
        try:
            names[int(k)] = str(v)
        except (TypeError, ValueError):
            raise ManifestError(f"{key}: key {k!r} is not an integer", path=side, fix=fix) from None
    return dict(sorted(names.items()))


def pseudonymous_patients(rows: Iterable[ManifestRow]) -> list[ManifestRow]:
    """Copies of ``rows`` whose ``patient_id`` is replaced by ``patient_00001``, ``patient_00002``, ... in
    order of first appearance: the grouping survives (folds, clustered CIs) but no identifier is copied
    into the manifests medhybrid writes for its own runs (cross-validation folds, held-out splits)."""
    alias: dict[str, str] = {}
    out = []
    for r in rows:
        pid = alias.setdefault(r.patient_id, f"patient_{len(alias) + 1:05d}") if r.patient_id else None
        out.append(ManifestRow(r.study_id, r.image, r.label, r.mask, r.split, dict(r.extra), patient_id=pid))
    return out


# --- writing -----------------------------------------------------------------------------------


def write_manifest(
    path: Path, rows: Iterable[ManifestRow], *, sidecar: dict[str, Any] | None = None, sort: bool = True
) -> Path:
    """Write a manifest CSV (and, if given, its sidecar JSON) atomically.

    Paths are written relative to the manifest's folder with forward slashes (absolute where no relative
    path exists, e.g. another drive); a relative path in a row is taken as relative to the working
    directory, as Python takes it. Extra columns are written as given (text). Rows are sorted by split
    (train, val, test, others) then study_id, so the output does not depend on the input order
    (``sort=False`` keeps the given order). Extra columns follow the required
    ones, in first-seen order. The sidecar is left untouched when ``sidecar`` is ``None``.

    Returns:
        the manifest path.
    """
    path = Path(path)
    base = path.parent.resolve()
    ordered = sorted(rows, key=lambda r: (_split_rank(r.split), r.study_id, str(r.image))) if sort else list(rows)
    extra_cols: list[str] = [PATIENT_COLUMN] if any(r.patient_id for r in ordered) else []
    for r in ordered:
        extra_cols.extend(k for k in r.extra if k not in extra_cols and k not in REQUIRED_COLUMNS)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*REQUIRED_COLUMNS, *extra_cols])
    for r in ordered:
        writer.writerow(
            [
                r.study_id,
                _relative(r.image, base),
                "" if r.label is None else str(int(r.label)),
                "" if r.mask is None else _relative(r.mask, base),
                r.split,
                *((r.patient_id or "") if c == PATIENT_COLUMN else str(r.extra.get(c, "")) for c in extra_cols),
            ]
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"), fsync=True)
    if sidecar is not None:
        text = json.dumps(sidecar, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        atomic_write_bytes(sidecar_path(path), text.encode("utf-8"), fsync=True)
    logger.info("wrote %d rows to %s", len(ordered), path)
    return path


def _relative(target: Path, base: Path) -> str:
    # a relative path in a ManifestRow means what it means to Python: relative to the working directory
    target = Path(target).absolute()
    # resolve the folders (base is physical too) but keep a file-level symlink as given
    physical = target.parent.resolve() / target.name
    try:
        return Path(os.path.relpath(physical, base)).as_posix()
    except ValueError:  # no relative path (another drive on Windows)
        return target.as_posix()
