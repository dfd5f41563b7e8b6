"""The interactive viewer in ``report.html``: every slice of the study, in its acquisition plane and (3D)
the two reformatted planes, with the mask and each saliency map as overlays, window/level presets and
drag, orientation letters, a mm scale bar, the value and RAS position under the cursor, and a findings
list that jumps to each lesion.

The page stays self-contained (no network, opens from ``file://``): the arrays are embedded in the page
and drawn by a small vanilla-JS script (``assets/viewer.js``, canvas 2D) inlined with its CSS.

What is embedded:
  - the volume in the display frame of :class:`~medhybrid.infer.render.DisplayFrame` (the one display
    convention of the reports: axial seen from the feet, patient right on the image's left), quantised
    to uint16 with a linear map the page states and the cursor applies, so it shows real HU/values;
  - the mask as uint8 labels, each saliency map as uint8 in [0, 255] on a grid :data:`SALIENCY_STEP` times
    coarser per axis (the maps are smooth; the volume keeps the budget);
  - each array zlib-compressed (inflated by the browser's own ``DecompressionStream``), as a base64 data URI.
When the arrays exceed :data:`VIEWER_BUDGET`, the volume is reduced by integer block factors, the finest
axis first (the mask keeps a block's highest label, the others its mean), and the page says what was done.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from nibabel.orientations import inv_ornt_aff
from scipy import ndimage

from medhybrid.config import CT_WINDOWS
from medhybrid.infer.render import MASK_COLOURS, SALIENCY_LUT, SALIENCY_TITLES, DisplayFrame, _e, mask_colour
from medhybrid.infer.viewer_data import (
    VIEWER_BUDGET,
    Embedded,
    fit_budget,
)
from medhybrid.io.study import Study, image_plane

logger = logging.getLogger(__name__)

MAX_FINDINGS = 10  # components listed per class, largest first
# Display-frame (LPS for a volume) axes of each plane: (column axis, sign), (row axis, sign), slice axis.
# Radiological convention: patient right on the image's left; anterior (axial) or superior (others) on top.
PLANES: dict[str, tuple[tuple[int, int], tuple[int, int], int]] = {
    "axial": ((0, 1), (1, 1), 2),
    "coronal": ((0, 1), (2, -1), 1),
    "sagittal": ((1, 1), (2, -1), 0),
}
PRESET_NAMES = {"ct_soft_tissue": "Soft tissue", "ct_lung": "Lung", "ct_bone": "Bone", "ct_brain": "Brain"}
NOT_ORIENTED = ("png", "medmnist")  # sources without patient geometry: no letters, no millimetres


@dataclass(frozen=True)
class Finding:
    """One connected component of a lesion class, at its voxel nearest the centroid (display frame)."""

    name: str
    rank: int
    of: int
    volume_ml: float
    at: tuple[int, int, int]


# --- geometry -----------------------------------------------------------------------------------------
def display_world(frame: DisplayFrame, affine: np.ndarray, native_shape: Sequence[int]) -> np.ndarray:
    """4x4 from a display-frame voxel index to RAS mm (``frame(array)[x, y, z]`` lies there)."""
    if frame.transform is None:
        return np.asarray(affine, dtype=float)
    return np.asarray(affine, dtype=float) @ inv_ornt_aff(frame.transform, tuple(native_shape[:3]))


def _native_axis(frame: DisplayFrame, axis: int) -> tuple[int, bool]:
    """The native axis shown along display ``axis``, and whether it is reversed."""
    if frame.transform is None:
        return axis, False
    i = int(np.flatnonzero(frame.transform[:, 0] == axis)[0])
    return i, bool(frame.transform[i, 1] < 0)


def _letter(direction: np.ndarray) -> str:
    a = int(np.argmax(np.abs(direction)))
    return "RAS"[a] if direction[a] > 0 else "LPI"[a]


def edge_letters(world: np.ndarray, col: tuple[int, int], row: tuple[int, int]) -> dict[str, str]:
    """Patient direction letters on a view's edges: toward which side the screen's right and bottom point."""
    right = col[1] * world[:3, col[0]]
    down = row[1] * world[:3, row[0]]
    return {"left": _letter(-right), "right": _letter(right), "top": _letter(-down), "bottom": _letter(down)}


# --- findings ------------------------------------------------------------------------------------------
def lesion_findings(labels: np.ndarray, names: Mapping[int, str], voxel_ml: float) -> list[Finding]:
    """Each class's connected components (full connectivity, as ``measure_lesions``), largest first, at most
    :data:`MAX_FINDINGS` each, located at the component's voxel nearest its centroid (so a jump there lands
    on the lesion in every plane)."""
    out: list[Finding] = []
    full = ndimage.generate_binary_structure(3, 3)
    for label, name in sorted(names.items()):
        where = labels == label
        if not where.any():
            continue
        box = ndimage.find_objects(where.view(np.uint8))[0]
        comps, n = ndimage.label(where[box], structure=full)
        sizes = np.bincount(comps.ravel())[1:]
        boxes = ndimage.find_objects(comps)  # each component's own box: its voxels without a scan of the rest
        for rank, c in enumerate(np.argsort(-sizes, kind="stable")[:MAX_FINDINGS], 1):
            own = boxes[c]
            voxels = np.argwhere(comps[own] == c + 1)
            nearest = voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))]
            at = tuple(int(v + o.start + s.start) for v, o, s in zip(nearest, own, box, strict=True))
            out.append(Finding(name, rank, int(n), float(sizes[c]) * voxel_ml, (at[0], at[1], at[2])))
    return out


# --- the page section ----------------------------------------------------------------------------------
def viewer_html(
    study: Study,
    labels: np.ndarray | None,
    saliency: Mapping[str, np.ndarray],
    frame: DisplayFrame,
    window: tuple[float, float],
    *,
    mask_names: Mapping[int, str] | None = None,
    finding_labels: Mapping[int, str] | None = None,
    mask_title: str = "Lesion mask",
    instance_numbers: Sequence[int | None] | None = None,
    budget: int = VIEWER_BUDGET,
) -> str:
    """The viewer's section of ``report.html`` (HTML with its data, CSS and script inlined).

    Args:
        study: the scan (native ``(I, J, K[, C])`` array, affine, modality).
        labels: native uint8 label map or None; saliency: method -> native uint8 map.
        frame: the reports' display frame of this study; window: its default ``(low, high)``.
        mask_names: label -> name for the legend and cursor; finding_labels: the lesion classes
            (``report.lesions``) listed as findings.
        instance_numbers: DICOM InstanceNumber of each native slice ``k``, if known.
        budget: base64 characters the embedded arrays may take.
    """
    oriented = study.source_format not in NOT_ORIENTED
    volume = frame(study.array.mean(axis=3) if study.array.ndim == 4 else study.array)
    lab = frame(labels) if labels is not None else None
    sal = {k: frame(v) for k, v in saliency.items()}
    emb, reduced = fit_budget(volume, lab, sal, frame.spacing, budget)
    f = emb.factors
    world = display_world(frame, study.affine, study.spatial_shape) @ np.array(
        [[f[0], 0, 0, (f[0] - 1) / 2], [0, f[1], 0, (f[1] - 1) / 2], [0, 0, f[2], (f[2] - 1) / 2], [0, 0, 0, 1]]
    )
    voxel_ml = float(np.prod(study.spacing)) / 1000.0
    findings = lesion_findings(lab, finding_labels, voxel_ml) if lab is not None and finding_labels else []
    numbers = None
    if instance_numbers and len(instance_numbers) == study.spatial_shape[2] and None not in instance_numbers:
        numbers = [int(n) for n in instance_numbers if n is not None]
    start = [c // fa for c, fa in zip(findings[0].at, f, strict=True)] if findings else [n // 2 for n in emb.shape]
    views: list[dict[str, Any]] = []
    for name in _plane_order(study, oriented):
        col, row, axis = PLANES.get(name, PLANES["axial"])
        title = name.capitalize() if oriented or name == "image" else f"Stored axis {'ijk'[axis]}"
        views.append(
            {
                "id": name,
                "title": title,
                "col": col,
                "row": row,
                "slice": axis,
                "letters": edge_letters(world, col, row) if oriented else None,
                "labels": _slice_labels(frame, axis, volume.shape[axis], f[axis], numbers),
                "start": start[axis],
            }
        )
    overlays: list[dict[str, Any]] = []
    if lab is not None:
        names = {int(k): str(v) for k, v in (mask_names or {}).items()}
        # one colour per uint8 label (the palette in turn, as the key slices paint it)
        colours = [[int(c) for c in rgb] for rgb in [MASK_COLOURS[0], *(mask_colour(k) for k in range(1, 256))]]
        overlays.append({"id": "mask", "kind": "labels", "title": mask_title, "colours": colours, "names": names})
    overlays += [{"id": m, "kind": "heat", "title": SALIENCY_TITLES.get(m, m)} for m in sal]
    unit = "HU" if study.modality == "CT" else ""
    data = {
        "shape": list(emb.shape),
        "spacing": [frame.spacing[a] * f[a] for a in range(3)],
        "affine": world.tolist(),
        "oriented": oriented,
        "image": {"slope": emb.slope, "intercept": emb.intercept, "unit": unit},
        "lut": [int(v) for v in np.rint(SALIENCY_LUT).ravel()],
        "overlays": overlays,
        "views": views,
        "data": emb.payload,
        "grids": emb.grids,
    }
    logger.debug("viewer of %s: block factors %s, %d characters of data", study.key, f, emb.chars)
    return "\n".join(
        [
            '<section id="mh-viewer" class="mh-viewer" data-ready="0">',
            f"<style>{inline_asset('viewer.css')}</style>",
            "<h2>Viewer</h2>",
            f'<p class="muted">{_e(_note(study, frame, emb, unit, oriented, budget))}</p>',
            _controls(_presets(study.modality, window, reduced), window, overlays, lab),
            _views_html(views, emb.shape, oriented),
            '<p class="mh-cursor muted">Scroll (wheel, arrow keys) through the slices; click a point to show it in '
            "every plane.</p>",
            _findings_html(findings, views[0], f),
            '<p class="mh-status muted">The viewer needs JavaScript; the key slices below are static.</p>',
            f'<script type="application/json" id="mh-viewer-data">{_json_for_script(data)}</script>',
            f"<script>{inline_asset('viewer.js')}</script>",
            "</section>",
        ]
    )


def _presets(modality: str, window: tuple[float, float], reduced: np.ndarray) -> list[tuple[str, float, float]]:
    """Window presets ``(name, low, high)``: CT's four (and the pipeline's window if another), else percentiles."""
    if modality == "CT":
        presets = [(PRESET_NAMES[k], lv - w / 2, lv + w / 2) for k, (lv, w) in CT_WINDOWS.items()]
        if not any(np.allclose((lo, hi), window) for _, lo, hi in presets):
            presets.insert(0, ("Pipeline", *window))
        return presets
    sample = reduced[:: max(1, reduced.shape[0] // 128), :: max(1, reduced.shape[1] // 128)]
    out = []
    for name, q in (("Auto (0.5-99.5 %)", (0.5, 99.5)), ("Auto (2-98 %)", (2.0, 98.0)), ("Full range", (0, 100))):
        lo, hi = (float(v) for v in np.percentile(sample if q[0] else reduced, q))
        out.append((name, lo, hi if hi > lo else lo + 1.0))
    return out


def _slice_labels(
    frame: DisplayFrame, axis: int, n_full: int, factor: int, instance_numbers: Sequence[int] | None
) -> list[str]:
    """What each shown slice along display ``axis`` is called: the DICOM InstanceNumber(s) on the stacking
    axis when known, else 1-based native indices; a range when a shown slice is a block of several."""
    native, reversed_ = _native_axis(frame, axis)
    numbers = list(instance_numbers) if native == 2 and instance_numbers else None
    prefix = "Instance" if numbers else "Slice"
    out = []
    for start in range(0, n_full, factor):
        idx = [n_full - 1 - d if reversed_ else d for d in range(start, min(start + factor, n_full))]
        values = sorted(numbers[i] for i in idx) if numbers else sorted(i + 1 for i in idx)
        out.append(f"{prefix} {values[0]}" if values[0] == values[-1] else f"{prefix} {values[0]}-{values[-1]}")
    return out


def _plane_order(study: Study, oriented: bool) -> list[str]:
    """The acquisition plane first (a 2D image has only its own)."""
    if study.is_2d:
        return ["image"]
    first = image_plane(study.affine) if oriented else "axial"
    return [first, *(p for p in PLANES if p != first)]


def _note(study: Study, frame: DisplayFrame, emb: Embedded, unit: str, oriented: bool, budget: int) -> str:
    """What the viewer shows, in the native axis order: the grid, any reduction, the value map."""
    shown, factors = [0, 0, 0], [1, 1, 1]
    for d in range(3):
        i = _native_axis(frame, d)[0]
        shown[i], factors[i] = emb.shape[d], emb.factors[d]
    spacing = "x".join(f"{study.spacing[i] * factors[i]:.3g}" for i in range(3))
    grid = "x".join(map(str, shown)) + f" voxels of {spacing} mm"
    if emb.factors == (1, 1, 1):
        text = f"Volume shown at full resolution: {grid}."
    else:
        text = (
            f"Volume shown at {grid}, from {'x'.join(map(str, study.spatial_shape))} (each shown voxel is the mean of "
            f"a {'x'.join(map(str, factors))} block; the mask shows a block's highest label), to keep this page "
            f"within {budget / 1e6:.0f} MB of embedded data."
        )
    sign = "-" if emb.intercept < 0 else "+"
    value = ("q" if emb.slope == 1.0 else f"{_fmt(emb.slope)} q") + f" {sign} {_fmt(abs(emb.intercept))}"
    exact = f"steps of {_fmt(emb.slope)}"
    if emb.integral and emb.slope == 1.0:
        exact = "exact" if emb.factors == (1, 1, 1) else "block means rounded to 1 unit"
    text += f" Values are embedded as uint16 q with value = {value}{(' ' + unit) if unit else ''} ({exact})."
    if any(k not in ("image", "mask") and max(g["step"]) > 1 for k, g in emb.grids.items()):
        text += " Saliency maps are embedded at half that resolution per axis (they are smooth)."
    if study.array.ndim == 4:
        text += f" The {study.array.shape[3]} channels are averaged."
    if not oriented:
        text += " This image has no patient geometry: no orientation letters or millimetres (1 mm pixels assumed)."
    elif not study.is_2d:
        text += " Views in the radiological convention: patient right on the image's left."
    return text


def _controls(
    presets: list[tuple[str, float, float]],
    window: tuple[float, float],
    overlays: list[dict[str, Any]],
    labels: np.ndarray | None,
) -> str:
    """Window presets (the default one marked ``on``), overlay toggles with opacity, the colour legend."""
    default = next((k for k, (_, lo, hi) in enumerate(presets) if np.allclose((lo, hi), window)), 0)
    buttons = "".join(
        f'<button type="button" class="mh-preset{" on" if k == default else ""}" data-low="{lo!r}" '
        f'data-high="{hi!r}">{_e(name)}</button>'
        for k, (name, lo, hi) in enumerate(presets)
    )
    out = [
        f'<div class="mh-bar"><span>Window</span>{buttons}<span class="mh-wl"></span>'
        '<span class="muted">(drag on an image: right widens, up raises the level)</span></div>'
    ]
    if not overlays:
        return out[0]
    out.append('<div class="mh-bar"><span>Overlays</span>')
    for o in overlays:
        on, opacity = (" checked", 40) if o["kind"] == "labels" else ("", 60)
        out.append(
            f'<label><input type="checkbox" class="mh-toggle" data-overlay="{_e(o["id"])}"{on}> {_e(o["title"])}'
            f'</label><input type="range" class="mh-opacity" data-overlay="{_e(o["id"])}" min="0" max="100" '
            f'value="{opacity}" aria-label="{_e(o["title"])} opacity">'
        )
    out.append('</div><div class="mh-bar mh-legend">')
    for o in overlays:
        if o["kind"] == "labels":
            present = set(np.flatnonzero(np.bincount(labels.ravel())).tolist()) if labels is not None else set()
            for k in sorted((set(o["names"]) | present) - {0}):
                rgb = ",".join(map(str, o["colours"][k % len(o["colours"])]))
                name = o["names"].get(k, f"label {k}")
                out.append(f'<span><span class="mh-swatch" style="background:rgb({rgb})"></span>{_e(name)}</span>')
    if any(o["kind"] == "heat" for o in overlays):
        stops = ",".join(
            f"rgb({','.join(str(int(c)) for c in SALIENCY_LUT[i])}) {i / 255:.0%}"
            for i in np.linspace(0, 255, 9).astype(int)
        )
        out.append(f'<span>saliency 0 <span class="mh-heat" style="background:linear-gradient(90deg,{stops})">')
        out.append("</span> 1</span>")
    out.append("</div>")
    return "".join(out)


def _views_html(views: list[dict[str, Any]], shape: tuple[int, int, int], oriented: bool) -> str:
    out = ['<div class="mh-views">']
    for n, v in enumerate(views):
        role = " (acquired)" if n == 0 and len(views) > 1 and oriented else ""
        letters = "".join(f'<span class="mh-o mh-{k}">{_e(c)}</span>' for k, c in (v["letters"] or {}).items())
        depth = shape[v["slice"]]
        out.append(
            f'<div class="mh-view" data-view="{_e(v["id"])}"><div class="mh-title">{_e(v["title"])}{role} · '
            f'<span class="mh-slice"></span></div><div class="mh-frame"><canvas tabindex="0" '
            f'aria-label="{_e(v["title"])} view"></canvas>{letters}</div><input type="range" class="mh-scroll" '
            f'min="0" max="{depth - 1}" aria-label="{_e(v["title"])} slice"{" hidden" if depth == 1 else ""}></div>'
        )
    out.append("</div>")
    return "".join(out)


def _findings_html(findings: list[Finding], primary: dict[str, Any], factors: tuple[int, int, int]) -> str:
    """The findings list: each button jumps every view to its component (shown-grid voxel in ``data-at``)."""
    if not findings:
        return ""
    out = ['<h3>Go to a finding</h3><ol class="mh-findings">']
    for fd in findings:
        at = [c // f for c, f in zip(fd.at, factors, strict=True)]
        where = f"{primary['title'].lower()} {primary['labels'][at[primary['slice']]].lower()}"
        out.append(
            f'<li><button type="button" data-at="{at[0]},{at[1]},{at[2]}">{_e(fd.name)} {fd.rank} of {fd.of}: '
            f"{fd.volume_ml:.2f} mL, {_e(where)}</button></li>"
        )
    out.append("</ol>")
    return "".join(out)


def inline_asset(name: str) -> str:
    text = resources.files("medhybrid.infer").joinpath(f"assets/{name}").read_text(encoding="utf-8")
    if "</" in text:  # inlined in <script>/<style>: a closing tag would end it early
        raise ValueError(f"assets/{name} must not contain '</'")
    return text


def _json_for_script(data: Any) -> str:
    text = json.dumps(data, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _fmt(value: float) -> str:
    return f"{value:.4g}"
