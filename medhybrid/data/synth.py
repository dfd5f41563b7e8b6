"""A deterministic synthetic cohort of body-like CT phantoms: the embedded default for the demo and tests.

Every study is an axial CT-like volume in HU: air, an elliptical body with a subcutaneous fat rim, two
lungs in the upper body, a liver-like organ in the lower body, a vertebral body with discs, and Gaussian
noise (sigma 8-12 HU). Exactly half the studies are abnormal (label 1) and carry 1-3 ellipsoidal lesions in
soft tissue or liver, 3-7.5 mm semi-axes in plane (about 0.1-1.8 mL), 40-120 HU brighter or darker than
the tissue around them (contrast-to-noise 3-15): visible to a reader at a soft-tissue window, small
against a 48 x 48 x 80 mm body, and at the low end of size and contrast not obvious. Their mask is exactly
the set of voxels the lesions changed (painted before the noise).

Study ``i`` depends only on ``(seed, i, dims)``, never on ``n``; the same arguments give byte-identical
files. Output layout under ``out``::

    manifest.csv, manifest.json
    nifti/<study_id>.nii.gz        image, int16 HU        (fmt nifti/both)
    nifti/<study_id>_mask.nii.gz   lesion mask, uint8     (always)
    dicom/<study_id>/IM0001.dcm..  CT series              (fmt dicom/both)

The DICOM headers carry fake but realistic-looking patient names, IDs and birth dates, so that PHI
handling has something to find; none of them appears in the manifests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medhybrid.errors import ConfigError
from medhybrid.io.dicom_write import derive_uid, write_dicom_series
from medhybrid.io.manifest import ManifestRow, write_manifest
from medhybrid.io.writers import atomic_write_bytes, nifti_bytes

logger = logging.getLogger(__name__)

SHAPE_3D = (64, 64, 32)
SHAPE_2D = (128, 128, 1)
PIXEL_MM = 0.75
SLICE_MM = 2.5
HU_MIN, HU_MAX = -1024, 3071  # the range a 12-bit CT with intercept -1024 stores

AIR, FAT, SOFT, LIVER, LUNG = -1000.0, -100.0, 40.0, 60.0, -850.0
BONE, RIB, DISC, CANAL = 700.0, 500.0, 90.0, 20.0
LABEL_NAMES = {"0": "normal", "1": "abnormal"}
MASK_LABEL_NAMES = {"0": "background", "1": "lesion"}
FORMATS = ("dicom", "nifti", "both")
SPLIT_FRACTIONS = (("train", 0.6), ("val", 0.2), ("test", 0.2))
LESION_COUNT = (1, 3)  # lesions per abnormal study, inclusive
LESION_RADIUS = (4.0, 10.0)  # in-plane semi-axes, voxels (3-7.5 mm)
LESION_CONTRAST = (40.0, 120.0)  # |HU change|, either sign

# Fake identities (DICOM only): realistic-looking so that PHI checks have something to find.
_LAST = ("DOE", "SMITH", "MILLER", "GARCIA", "NGUYEN", "JOHNSON", "MARTIN", "BROWN", "WILSON", "MOORE", "LEE")
_FIRST = (
    "JANE",
    "JOHN",
    "MARIA",
    "ROBERT",
    "LINDA",
    "DAVID",
    "SUSAN",
    "JAMES",
    "KAREN",
    "PAUL",
    "ANNA",
    "EVA",
)


@dataclass
class SynthStudy:
    """One synthetic study before it is written.

    Attributes:
        study_id: ``synth_0003`` style id.
        image: int16 HU, shape ``(I, J, K)`` (K = 1 for 2D).
        mask: uint8 lesion mask, same shape; exactly ``clean != background``.
        label: 1 when the study has lesions, else 0.
        affine: 4x4 voxel-to-RAS.
        background: the noise-free phantom without lesions, float32, same shape.
        clean: the noise-free phantom with lesions, float32, same shape.
    """

    study_id: str
    image: np.ndarray
    mask: np.ndarray
    label: int
    affine: np.ndarray
    background: np.ndarray
    clean: np.ndarray


def synth_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """Axial voxel-to-RAS affine centred on the origin (i -> patient left, j -> posterior, k -> head).

    All entries are binary-exact, so DICOM DS strings and NIfTI float32 headers round-trip exactly.
    """
    affine = np.diag([-PIXEL_MM, -PIXEL_MM, SLICE_MM, 1.0])
    lps_origin = -0.5 * np.array([(shape[0] - 1) * PIXEL_MM, (shape[1] - 1) * PIXEL_MM, (shape[2] - 1) * SLICE_MM])
    affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ lps_origin
    return affine


def study_label(seed: int, index: int) -> int:
    """Label of study ``index``: within each pair (0, 1), (2, 3), ... exactly one is abnormal."""
    pair_rng = np.random.default_rng([seed, 1, index // 2])
    abnormal_slot = int(pair_rng.integers(2))
    return int(index % 2 == abnormal_slot)


def synth_study(seed: int, index: int, dims: int = 3) -> SynthStudy:
    """Build study ``index`` of the cohort ``seed`` in memory (deterministic, independent of ``n``)."""
    rng = np.random.default_rng([seed, 0, index, dims])
    label = study_label(seed, index)
    shape = SHAPE_3D if dims == 3 else SHAPE_2D
    # body height of each slice, inferior (0) to superior (1); a 2D study is one slice at a random height
    levels = np.linspace(0.0, 1.0, shape[2]) if dims == 3 else np.array([rng.uniform(0.3, 0.85)])
    background, tissue = _phantom(rng, shape, levels)
    clean = background.copy()
    if label:
        _paint_lesions(rng, clean, tissue, dims)
    mask = (clean != background).astype(np.uint8)
    noise = rng.normal(0.0, rng.uniform(8.0, 12.0), size=shape)
    image = np.clip(np.rint(clean + noise), HU_MIN, HU_MAX).astype(np.int16)
    return SynthStudy(
        study_id=f"synth_{index:04d}",
        image=image,
        mask=mask,
        label=label,
        affine=synth_affine(shape),
        background=background,
        clean=clean,
    )


def _phantom(
    rng: np.random.Generator, shape: tuple[int, int, int], levels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free body phantom in HU and a boolean map of where lesions may go (soft tissue, liver).

    Args:
        levels: body height of each slice, 0 (inferior) .. 1 (superior), shape (K,).

    Returns:
        ``(hu, tissue)``, both shape ``shape``; hu float32.
    """
    n_i, n_j, _ = shape
    # normalised in-plane coordinates in [-1, 1]: u toward patient left, v toward posterior
    u = ((np.arange(n_i) - (n_i - 1) / 2) / (n_i / 2))[:, None, None]
    v = ((np.arange(n_j) - (n_j - 1) / 2) / (n_j / 2))[None, :, None]
    w = levels[None, None, :]
    size = rng.uniform(0.88, 1.04)
    a = 0.86 * size * rng.uniform(0.95, 1.05) * (1.0 + 0.04 * np.sin(np.pi * w))  # half width
    b = 0.62 * size * rng.uniform(0.93, 1.07) * (1.0 + 0.03 * np.cos(np.pi * w))  # half depth
    cu, cv = rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)
    bu, bv = u - cu, v - cv

    hu = np.full(shape, AIR, dtype=np.float32)
    body = (bu / a) ** 2 + (bv / b) ** 2 <= 1.0
    rim = rng.uniform(0.07, 0.13)
    inner = (bu / (a - rim)) ** 2 + (bv / (b - rim)) ** 2 <= 1.0
    hu[body] = FAT
    hu[inner] = SOFT

    # liver: right side (u < 0), anterior, lower body, fading out toward the diaphragm
    liver_top = rng.uniform(0.5, 0.6)
    liver_scale = np.clip((liver_top - w) / 0.15, 0.0, 1.0) ** 0.5
    lu, lv = -0.33 * a, -0.08 * b
    liver_a, liver_b = 0.42 * a * liver_scale + 1e-6, 0.55 * b * liver_scale + 1e-6
    liver = inner & (((bu - lu) / liver_a) ** 2 + ((bv - lv) / liver_b) ** 2 <= 1.0)
    hu[liver] = LIVER

    # lungs: both sides, upper body, growing from the diaphragm upward
    lung_base = liver_top - rng.uniform(0.0, 0.05)
    lung_scale = np.clip((w - lung_base) / 0.2, 0.0, 1.0) ** 0.5
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        la = 0.3 * a * lung_scale * rng.uniform(0.9, 1.1) + 1e-6
        lb = 0.62 * b * lung_scale * rng.uniform(0.9, 1.1) + 1e-6
        lungs |= ((bu - side * 0.42 * a) / la) ** 2 + ((bv + 0.02 * b) / lb) ** 2 <= 1.0
    hu[lungs & inner] = LUNG

    # spine: vertebral body with a disc every third of the height, spinal canal behind it
    radius = 0.14 * b * rng.uniform(0.9, 1.1)
    sv = 0.6 * b
    vertebra = inner & (bu**2 + (bv - sv) ** 2 <= radius**2)
    disc = np.mod(w * 3.0 + rng.uniform(0.0, 1.0), 1.0) < 0.09
    canal = inner & (bu**2 + (bv - sv - 1.45 * radius) ** 2 <= (0.5 * radius) ** 2)
    hu[vertebra] = BONE
    hu[vertebra & disc] = DISC
    hu[canal] = CANAL
    # ribs in the chest: bone dots just inside the fat rim, clear of the spine and the sternum
    chest = lung_scale > 0.3
    for t in np.pi * np.array([0.12, 0.35, 0.65, 0.88, 1.12, 1.35, 1.65, 1.88]):
        ru, rv = (a - rim - 0.06) * np.cos(t), (b - rim - 0.06) * np.sin(t)
        hu[chest & ((bu - ru) ** 2 + (bv - rv) ** 2 <= 0.045**2)] = RIB
    tissue = (hu == SOFT) | (hu == LIVER)
    return hu, tissue


def _paint_lesions(rng: np.random.Generator, hu: np.ndarray, tissue: np.ndarray, dims: int) -> None:
    """Paint LESION_COUNT ellipsoids (in-plane semi-axes LESION_RADIUS voxels, through-plane scaled to the
    same size in mm, contrast +/- LESION_CONTRAST HU) into ``hu`` in place,
    only where ``tissue`` is True; each lesion sets ``tissue value + contrast``."""
    base = hu.copy()
    candidates = np.argwhere(tissue)
    n_i, n_j, n_k = hu.shape
    ii = np.arange(n_i)[:, None, None]
    jj = np.arange(n_j)[None, :, None]
    kk = np.arange(n_k)[None, None, :]
    for _ in range(int(rng.integers(LESION_COUNT[0], LESION_COUNT[1] + 1))):
        ci, cj, ck = candidates[rng.integers(len(candidates))]
        ri, rj = rng.uniform(*LESION_RADIUS, size=2)
        rk = max(1.0, 0.5 * (ri + rj) * PIXEL_MM / SLICE_MM * rng.uniform(0.8, 1.2)) if dims == 3 else 1.0
        contrast = rng.uniform(*LESION_CONTRAST) * (1.0 if rng.random() < 0.5 else -1.0)
        inside = ((ii - ci) / ri) ** 2 + ((jj - cj) / rj) ** 2 + ((kk - ck) / rk) ** 2 <= 1.0
        inside &= tissue
        hu[inside] = base[inside] + np.float32(round(contrast))


def _fake_identity(index: int) -> tuple[str, str, str]:
    """(PatientName, PatientID, PatientBirthDate) for study ``index``: fake, deterministic."""
    name = f"{_LAST[index % len(_LAST)]}^{_FIRST[(index * 5 + 3) % len(_FIRST)]}"
    year = 1940 + (index * 7) % 55
    month = 1 + (index * 5) % 12
    day = 1 + (index * 11) % 28
    return name, f"SYN{index:04d}", f"{year:04d}{month:02d}{day:02d}"


def assign_splits(labels: list[int], seed: int) -> list[str]:
    """Stratified ~60/20/20 train/val/test split of studies with ``labels`` (deterministic).

    Within each label the counts follow the largest-remainder rule; ties between val and test
    alternate between labels so that small cohorts still get both.
    """
    rng = np.random.default_rng([seed, 2])
    splits = [""] * len(labels)
    for g, label in enumerate(sorted(set(labels))):
        members = [i for i, lab in enumerate(labels) if lab == label]
        order = [members[p] for p in rng.permutation(len(members))]
        quotas = [len(members) * f for _, f in SPLIT_FRACTIONS]
        counts = [int(q) for q in quotas]
        tie_order = [0, 1, 2] if g % 2 == 0 else [0, 2, 1]
        by_remainder = sorted(range(3), key=lambda s: (-(quotas[s] - counts[s]), tie_order.index(s)))
        for s in by_remainder[: len(members) - sum(counts)]:
            counts[s] += 1
        start = 0
        for (name, _), count in zip(SPLIT_FRACTIONS, counts, strict=True):
            for i in order[start : start + count]:
                splits[i] = name
            start += count
    return splits


def synthesize_cohort(
    out: Path,
    n: int = 16,
    dims: int = 3,
    fmt: str = "both",
    seed: int = 0,
    progress: Callable[[], None] | None = None,
) -> Path:
    """Write a synthetic cohort of ``n`` studies under ``out`` and return the path of ``manifest.csv``.

    Args:
        n: number of studies (>= 1).
        dims: 3 for (64, 64, 32) volumes at 0.75 x 0.75 x 2.5 mm, 2 for one 128 x 128 axial slice.
        fmt: ``dicom``, ``nifti`` or ``both`` (masks are always NIfTI).
        seed: cohort seed; study ``i`` is the same for any ``n``.
        progress: called once per study written.

    Raises:
        ConfigError: invalid arguments.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n must be a whole number >= 1, got {n!r}", fix="pass e.g. --n 16")
    if dims not in (2, 3):
        raise ConfigError(f"dims must be 2 or 3, got {dims!r}", fix="pass --dims 2 or --dims 3")
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}", fix="pass --format both")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a whole number >= 0, got {seed!r}", fix="pass e.g. --seed 0")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("output exists and is not a folder", path=out, fix="choose another output folder")
    (out / "nifti").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    labels: list[int] = []
    for index in range(n):
        study = synth_study(seed, index, dims)
        sid = study.study_id
        row = {"study_id": sid, "label": str(study.label), "mask": f"nifti/{sid}_mask.nii.gz"}
        atomic_write_bytes(out / row["mask"], nifti_bytes(study.mask, study.affine, description="medhybrid synth"))
        if fmt in ("nifti", "both"):
            row["image"] = f"nifti/{sid}.nii.gz"
            atomic_write_bytes(
                out / row["image"], nifti_bytes(study.image, study.affine, description="medhybrid synth")
            )
        if fmt in ("dicom", "both"):
            row["dicom"] = f"dicom/{sid}"
            row.setdefault("image", row["dicom"])
            name, patient_id, birth = _fake_identity(index)
            write_dicom_series(
                study.image,
                study.affine,
                out / row["dicom"],
                study_uid=derive_uid("medhybrid-synth", str(seed), str(dims), sid, "study"),
                series_uid=derive_uid("medhybrid-synth", str(seed), str(dims), sid, "series"),
                series_description=f"SYNTH {'CHEST-ABDOMEN' if dims == 3 else 'AXIAL SLICE'}",
                patient_name=name,
                patient_id=patient_id,
                patient_birth_date=birth,
                extra={"StudyDescription": "SYNTHETIC PHANTOM", "BodyPartExamined": "CHEST"},
            )
        rows.append(row)
        labels.append(study.label)
        if progress is not None:
            progress()
    for row, split in zip(rows, assign_splits(labels, seed), strict=True):
        row["split"] = split
    manifest_rows = [
        ManifestRow(
            study_id=row["study_id"],
            image=out / row["image"],
            label=int(row["label"]),
            mask=out / row["mask"],
            split=row["split"],
            extra={"dicom": row["dicom"]} if "dicom" in row else {},
        )
        for row in rows
    ]
    sidecar = {
        "label_names": LABEL_NAMES,
        "mask_label_names": MASK_LABEL_NAMES,
        "mask_kind": "lesion",
        "task": "multitask",
        "source": "medhybrid synth",
        "seed": int(seed),
        "dims": int(dims),
    }
    manifest = write_manifest(out / "manifest.csv", manifest_rows, sidecar=sidecar, sort=False)  # study order
    logger.info("wrote %d synthetic %dD studies (%s) to %s", n, dims, fmt, out)
    return manifest
