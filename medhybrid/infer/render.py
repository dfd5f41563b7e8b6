"""Pictures and pages for radiologist review: key slices with overlays, ``report.html``, ``index.html``.

Images are composed with NumPy and encoded with Pillow (no matplotlib figures: a figure costs ~100 ms,
more than the model on a small study); matplotlib provides the colour maps only. ``report.html`` is
self-contained (PNG images embedded as data URIs, inline CSS; its one script, the viewer of
:mod:`medhybrid.infer.viewer`, is inlined with its data), so it opens offline from ``file://`` and can be
mailed or archived as one file. Every string from the input is HTML-escaped.

Display convention: 3D scans are shown as axial slices the way a radiologist reads them, seen from the
feet: patient right on the image's left, anterior at the top (the array is reoriented to LPS for display
only, with nibabel's orientation tools); MedMNIST volumes, which have no geometry, are shown as stored.
2D images are shown in their display frame (:func:`medhybrid.io.study.display_affine`), the frame the
model saw them in: as stored for a PNG, a geometry-less DICOM or a standard DX/CR.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from PIL import Image

from medhybrid.config import CT_WINDOWS
from medhybrid.infer.scope import SPACING_FACTOR
from medhybrid.io.study import display_affine

PANEL_PX = 512  # key-slice panels: the long side in pixels (a CT slice's own 512)
THUMB_PX = 96
MASK_COLOURS = np.array(
    [[0, 0, 0], [255, 64, 64], [64, 200, 255], [255, 210, 0], [120, 255, 120], [255, 120, 255]], dtype=np.float32
)
SALIENCY_LUT = (matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)
SALIENCY_TITLES = {
    "gradcam": "Grad-CAM (encoder, last stage)",
    "attention": "Attention rollout (Transformer)",
}


# --- display geometry ------------------------------------------------------------------------------
class DisplayFrame:
    """Reorients native ``(I, J, K)`` arrays for display (see the module docstring): a 2D image
    (``two_d``) into its display frame, a volume into axial LPS unless ``reorient`` is False."""

    def __init__(self, affine: np.ndarray, spacing: Sequence[float], *, two_d: bool, reorient: bool = True) -> None:
        if two_d:  # the display frame's axes are (screen right, screen down) = nibabel's ("R", "A")
            self.transform = ornt_transform(io_orientation(display_affine(affine)), axcodes2ornt(("R", "A", "S")))
        elif reorient:
            self.transform = ornt_transform(io_orientation(affine), axcodes2ornt(("L", "P", "S")))
        else:
            self.transform = None
        sp = np.asarray(spacing, dtype=float)
        self.spacing: tuple[float, ...] = tuple(float(v) for v in sp)
        if self.transform is not None:
            # ornt_transform gives, per input axis, the output axis: spacing follows the axes
            order = np.empty(3, dtype=int)
            order[self.transform[:, 0].astype(int)] = np.arange(3)
            self.spacing = tuple(float(sp[i]) for i in order)

    def __call__(self, array: np.ndarray) -> np.ndarray:
        return array if self.transform is None else apply_orientation(array, self.transform)


def window_for(modality: str, intensity: str | None, volume: np.ndarray) -> tuple[float, float]:
    """Display window ``(low, high)``: the pipeline's CT window, soft tissue for other CT, else the
    0.5-99.5 percentiles (on a subsample)."""
    if intensity in CT_WINDOWS:
        level, width = CT_WINDOWS[intensity]
    elif modality == "CT":
        level, width = CT_WINDOWS["ct_soft_tissue"]
    else:
        sample = volume[:: max(1, volume.shape[0] // 128), :: max(1, volume.shape[1] // 128)]
        lo, hi = np.percentile(sample, [0.5, 99.5])
        return float(lo), float(hi if hi > lo else lo + 1.0)
    return level - width / 2, level + width / 2


def key_slices(labels: np.ndarray | None, saliency: np.ndarray | None, depth: int, n: int = 3) -> list[int]:
    """Display-space slice indices to show: the slices of largest lesion area, at least ``depth / 8``
    apart; without a lesion, the most salient slice; else the middle one."""
    if labels is not None and labels.any():
        area = np.count_nonzero(labels, axis=(0, 1)).astype(float)
        chosen: list[int] = []
        gap = max(2, depth // 8)
        for z in np.argsort(-area, kind="stable"):
            if area[z] <= 0 or len(chosen) == n:
                break
            if all(abs(int(z) - c) >= gap for c in chosen):
                chosen.append(int(z))
        return sorted(chosen)
    if saliency is not None and saliency.any():
        return [int(np.argmax(saliency.sum(axis=(0, 1), dtype=np.float64)))]
    return [depth // 2]


# --- pictures -----------------------------------------------------------------------------------------
def grey(slice_2d: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return np.clip((slice_2d.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0) * 255.0


def mask_colour(label: int) -> np.ndarray:
    """RGB of mask label ``label`` >= 1: the palette's colours in turn (0, background, has none)."""
    return MASK_COLOURS[1 + (label - 1) % (len(MASK_COLOURS) - 1)]


def overlay_mask(base: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Grey ``(H, W)`` + labels -> RGB: each class filled at 35 % and outlined opaque."""
    from scipy import ndimage

    rgb = np.repeat(base[..., None], 3, axis=2)
    for label in np.unique(labels):
        if label == 0:
            continue
        where = labels == label
        colour = mask_colour(int(label))
        rgb[where] = 0.65 * rgb[where] + 0.35 * colour
        edge = where & ~ndimage.binary_erosion(where)
        rgb[edge] = colour
    return rgb


def overlay_saliency(base: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """Grey + a saliency map in [0, 255] -> RGB, the colour map blended in proportion to the saliency."""
    s = saliency.astype(np.float32) / 255.0
    colour = SALIENCY_LUT[np.clip(saliency, 0, 255).astype(np.uint8)]
    alpha = (0.7 * s)[..., None]
    return (1 - alpha) * base[..., None] + alpha * colour


def to_png(rgb_or_grey: np.ndarray, spacing: tuple[float, float], max_px: int = PANEL_PX) -> bytes:
    """A display-space slice ``(X, Y[, 3])`` (x = columns) as PNG, rows = y, aspect from the pixel spacing."""
    img = np.clip(np.swapaxes(rgb_or_grey, 0, 1), 0, 255).astype(np.uint8)
    h, w = img.shape[:2]
    height_mm, width_mm = h * spacing[1], w * spacing[0]
    scale = max_px / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    pil = Image.fromarray(img)
    pil = pil.resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_panels(
    volume: np.ndarray,
    labels: np.ndarray | None,
    saliency: dict[str, np.ndarray],
    frame: DisplayFrame,
    window: tuple[float, float],
    mask_title: str = "Lesion mask",
) -> tuple[list[dict[str, Any]], bytes]:
    """Key-slice panels and a thumbnail.

    Args:
        volume: native ``(I, J, K)`` (channels are averaged for display).
        labels: native label map or None.
        saliency: method -> native uint8 map.

    Returns:
        One dict per key slice (``slice``: display index, ``panels``: list of (title, PNG bytes)) and
        the thumbnail PNG.
    """
    vol = frame(volume.mean(axis=3) if volume.ndim == 4 else volume)
    lab = frame(labels) if labels is not None else None
    sal = {k: frame(v) for k, v in saliency.items()}
    first_sal = next(iter(sal.values()), None)
    zs = key_slices(lab, first_sal, vol.shape[2])
    spacing = (frame.spacing[0], frame.spacing[1])
    slices: list[dict[str, Any]] = []
    thumb = b""
    for z in zs:
        base = grey(vol[:, :, z], window)
        panels = [("Image", to_png(base, spacing))]
        if lab is not None:
            with_mask = overlay_mask(base, lab[:, :, z])
            panels.append((mask_title, to_png(with_mask, spacing)))
            if not thumb:
                thumb = to_png(with_mask, spacing, THUMB_PX)
        for method, values in sal.items():
            panels.append((SALIENCY_TITLES[method], to_png(overlay_saliency(base, values[:, :, z]), spacing)))
        if not thumb:
            thumb = to_png(base, spacing, THUMB_PX)
        slices.append({"slice": int(z), "of": int(vol.shape[2]), "panels": panels})
    return slices, thumb


def _panel_legend(report: dict[str, Any]) -> str:
    """What the key slices' colours mean: each mask label's colour and name, and the saliency colour bar."""
    items = []
    for entry in [*report.get("lesions", []), *report.get("structures", [])]:
        rgb = mask_colour(int(entry["label"])).astype(int)
        items.append(
            f'<span class="swatch" style="background:rgb({rgb[0]},{rgb[1]},{rgb[2]})"></span>'
            f"{_e(str(entry['name']))} (label {int(entry['label'])})"
        )
    stops = ",".join(
        f"rgb({int(c[0])},{int(c[1])},{int(c[2])}) {100 * i / 8:.0f}%" for i, c in enumerate(SALIENCY_LUT[::32])
    )
    items.append(
        f'Saliency <span class="bar" style="background:linear-gradient(to right,{stops})"></span>'
        " low to high, scaled per study (0 to 1); blended over the image at up to 70 % opacity"
    )
    return '<p class="muted legend">Legend: ' + " &middot; ".join(items) + "</p>"


# --- pages ---------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1b1f24;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid #ddd}
.muted{color:#5b6570;font-size:13px} table{border-collapse:collapse;font-size:14px}
td,th{border:1px solid #d5d9de;padding:4px 8px;text-align:left;vertical-align:top}
.badge{display:inline-block;padding:4px 10px;border-radius:4px;font-weight:600;color:#fff}
.abnormal{background:#c62828} .normal{background:#2e7d32} .failed{background:#6d4c41} .none{background:#546e7a}
.not_assessed{background:#ef6c00}
.prob{font-size:32px;font-weight:700;margin-right:12px}
.warn{color:#8a5a00} .reject{color:#b00020} .ok{color:#2e7d32}
figure{display:inline-block;margin:0 8px 8px 0;vertical-align:top} figcaption{font-size:12px;color:#5b6570}
figure img{max-width:min(512px,90vw);height:auto}
.legend .swatch{display:inline-block;width:12px;height:12px;margin:0 4px -2px 0;border:1px solid #888}
.legend .bar{display:inline-block;width:120px;height:10px;margin:0 4px -1px 4px;border:1px solid #888}
img{image-rendering:auto;background:#000} .thumb{background:#000}
tr.sel td{background:#e8f0fe;outline:1px solid #8ab4f8} th[data-type]{cursor:pointer} .controls{margin:8px 0}
th[aria-sort=descending]::after{content:" \\25BC"} th[aria-sort=ascending]::after{content:" \\25B2"}
.banner{background:#fff4e5;border:1px solid #f0c36d;padding:8px 12px;margin:12px 0;font-size:13px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str) -> bytes:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n"
    ).encode()


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _scope_text(scope: dict[str, Any]) -> str:
    """The checkpoint's declared scope (medhybrid/infer/scope.py) in one line."""
    parts = [", ".join(scope.get("modalities") or []) or "any modality", f"{scope.get('spatial_dims', 3)}D"]
    if scope.get("body_parts"):
        parts.append("body parts " + ", ".join(scope["body_parts"]))
    lo, hi = scope.get("spacing_min"), scope.get("spacing_max")
    if lo and hi:
        ranges = " x ".join(f"{a:.3g}-{b:.3g}" for a, b in zip(lo, hi, strict=False))
        parts.append(f"native spacing {ranges} mm (x{SPACING_FACTOR:g} either way)")
    return "; ".join(parts)


def _calibration_text(calibration: dict[str, Any]) -> str:
    if not calibration.get("temperature"):
        return "none (raw softmax probabilities)"
    text = f"temperature {calibration['temperature']:.3f}, fitted on {calibration.get('fitted_on', '?')}"
    if calibration.get("ece_before") is not None:
        text += f" (ECE {calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f})"
    if calibration.get("temperature_rejected"):
        text += f"; warning: {calibration['temperature_rejected']}"
    return text


def _verdict(report: dict[str, Any]) -> list[str]:
    """The score and decision at the top of a report, or why there is none."""
    if report["decision"] == "not_assessed":
        reasons = (report.get("assessment") or {}).get("reasons") or []
        return [
            '<p><span class="badge not_assessed">NOT ASSESSED</span></p>',
            '<p class="muted">This study is outside what the model was trained on, so it gives no verdict '
            "(not normal, not abnormal):</p>",
            "<ul>" + "".join(f"<li>{_e(r['message'])}</li>" for r in reasons) + "</ul>",
        ]
    if report["decision"] is None:
        return [
            '<p><span class="badge none">NO VERDICT</span></p>',
            '<p class="muted">This model segments anatomy (normal structures): it measures them and gives no '
            "abnormality verdict.</p>",
        ]
    decision, op = report["decision"], report["operating_point"]
    what = (
        "Probability of abnormality"
        if report.get("score_method") in (None, "classifier")
        else f"Lesion score ({report['score_method']}; not a calibrated probability)"
    )
    return [
        f'<p><span class="prob">{report["probability"]:.3f}</span>'
        f'<span class="badge {_e(decision)}">{_e(decision.upper())}</span></p>',
        f'<p class="muted">{_e(what)}; called abnormal at &ge; {op["threshold"]:.3f} '
        f"(operating point: {_e(op['method'])}"
        + (
            f", validation sensitivity {op['sensitivity']:.2f}, specificity {op['specificity']:.2f}"
            if op.get("sensitivity") is not None and op.get("specificity") is not None
            else ""
        )
        + ").</p>",
    ]


def _cv_text(cv: dict[str, Any]) -> str:
    parts = []
    for key in ("auroc", "dice"):
        e = cv.get(key)
        if e and e.get("value") is not None:
            parts.append(
                f"{key.upper() if key == 'auroc' else 'Dice'} {e['value']:.3f} ({e['ci_low']:.3f}-{e['ci_high']:.3f})"
            )
    return f"{', '.join(parts) or 'n/a'} over {cv.get('n')} studies, {cv.get('folds')} folds, pooled out-of-fold"


def report_html(report: dict[str, Any], slices: list[dict[str, Any]], card: dict[str, Any], viewer: str = "") -> bytes:
    """``report.html`` from the report dict (``StudyReport.model_dump``), the key-slice panels, the model card
    and the interactive viewer's section (:func:`medhybrid.infer.viewer.viewer_html`; none when empty)."""
    parts = [
        f"<h1>Study {_e(report['study_key'])}</h1>",
        f'<div class="muted">{_e(report["source"]["format"].upper())} {_e(report["source"]["modality"])} · '
        f"{_e(report['source']['path'])}</div>",
        '<div class="banner">Research use only. This is decision support for radiologist review, '
        "not a diagnosis.</div>",
        *_verdict(report),
    ]
    if report.get("patient"):
        parts.append("<h2>Patient</h2>" + _table(list(report["patient"].items())))
    qc = report["qc"]
    parts.append("<h2>Quality control</h2>")
    if qc:
        parts.append(
            "<ul>"
            + "".join(
                f'<li class="{_e(f["level"])}"><b>{_e(f["level"].upper())}</b> {_e(f["code"])}: {_e(f["message"])}</li>'
                for f in qc
            )
            + "</ul>"
        )
    else:
        parts.append('<p class="ok">No QC findings.</p>')
    for title, measured in (("Findings", report["lesions"]), ("Structures (anatomy)", report.get("structures") or [])):
        if not measured:
            continue
        parts.append(
            f"<h2>{title}</h2><table><tr><th>Class</th><th>Volume (mL)</th><th>Components</th>"
            "<th>Largest (mL)</th></tr>"
        )
        parts += [
            f"<tr><td>{_e(m['name'])}</td><td>{m['volume_ml']:.2f}</td><td>{m['components']}</td>"
            f"<td>{m['largest_component_ml']:.2f}</td></tr>"
            for m in measured
        ]
        parts.append("</table>")
    if report.get("class_probabilities"):
        parts.append(
            "<h2>Class probabilities</h2>" + _table([(k, f"{v:.3f}") for k, v in report["class_probabilities"].items()])
        )
    if viewer:
        parts.append(viewer)
    parts.append("<h2>Key slices</h2>")
    for s in slices:
        parts.append(f'<div><div class="muted">Slice {s["slice"] + 1} of {s["of"]}</div>')
        for title, png in s["panels"]:
            parts.append(
                f'<figure><img src="{data_uri(png)}" alt="{_e(title)}"><figcaption>{_e(title)}</figcaption></figure>'
            )
        parts.append("</div>")
    if slices:
        parts.append(_panel_legend(report))
    orientation = (
        "The image as displayed (its display frame, which the model saw)."
        if report["source"]["shape"][2] == 1
        else "Axial slices seen from the feet: patient right on the image's left, anterior at the top."
    )
    parts.append(f'<p class="muted">{_e(orientation)} Saliency shows where the model looked, not where disease is.</p>')
    outputs = report["outputs"]
    files = [("Report (JSON)", "report.json")]
    if outputs.get("mask"):
        files.append(("Mask (NIfTI)", outputs["mask"]))
    files += [(f"Saliency: {s['method']} (NIfTI)", s["file"]) for s in outputs.get("saliency", [])]
    if outputs.get("dicom_seg"):
        files.append(("DICOM SEG", outputs["dicom_seg"]))
    if outputs.get("dicom_sr"):
        files.append(("DICOM SR", outputs["dicom_sr"]))
    parts.append("<h2>Files</h2><ul>" + "".join(f'<li><a href="{_e(f)}">{_e(t)}</a></li>' for t, f in files) + "</ul>")
    model = report["model"]
    selection = card.get("selection_split") or {}
    validation = ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in (selection.get("metrics") or {}).items()
        if not isinstance(v, list)
    )
    rows = [
        ("Model", model["name"]),
        ("Task", model["task"]),
        ("Weights SHA-256", model["weights_sha256"]),
        ("Pipeline", card.get("pipeline")),
        ("Classes", ", ".join(f"{k}: {v}" for k, v in card.get("label_names", {}).items())),
        (
            "Mask classes",
            ", ".join(
                f"{k}: {v} ({card.get('mask_kinds', {}).get(k, 'lesion')})"
                for k, v in card.get("mask_label_names", {}).items()
                if int(k) != 0
            ),
        ),
        ("Study score", card.get("score") or "none (no abnormality verdict)"),
        ("Trained", f"{card.get('trained_epochs')} epochs, best at epoch {card.get('best_epoch')}"),
        (
            f"Selection split '{selection.get('split', 'val')}' (best epoch)",
            f"{validation or 'n/a'} ({selection.get('note', '')})",
        ),
    ]
    if card.get("ensemble"):
        ens = card["ensemble"]
        rows.append(("Ensemble", f"{ens['members']} {ens['kind']}: {ens['combination']}"))
    if card.get("cross_validation"):
        rows.append(("Cross-validation (out-of-fold)", _cv_text(card["cross_validation"])))
    rows += [
        ("Training manifest SHA-256", card.get("manifest_sha256")),
        ("Calibration", _calibration_text(card.get("calibration") or {})),
        ("Scope (what it may assess)", _scope_text(card.get("scope") or {})),
        ("Preprocessing", ", ".join(f"{k}={v}" for k, v in card.get("preprocessing", {}).items())),
        ("Intended use", card.get("intended_use")),
        ("medhybrid", model["medhybrid_version"]),
        ("Test-time augmentation", "flips" if report["tta"] else "off"),
    ]
    parts.append("<h2>Model card</h2>" + _table(rows))
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in report["timings_s"].items())
    parts.append(f'<p class="muted">Timings: {_e(timings)}</p>')
    return _page(f"medhybrid report {report['study_key']}", "\n".join(parts))


_DECISION_TEXT = {"not_assessed": "NOT ASSESSED", "none": "no verdict"}


def _threshold_text(threshold: float | None) -> str:
    return "no verdict (anatomy)" if threshold is None else f"threshold {threshold:.3f}"


def index_html(rows: Sequence[dict[str, Any]], failed: Sequence[dict[str, Any]], meta: dict[str, Any]) -> bytes:
    """The worklist: studies by descending probability (NOT ASSESSED ones after, with no score), then the
    failures with their reasons. Sortable by any column, filterable by text and decision, keyboard
    navigable (``assets/worklist.js``, inlined: the page needs no network)."""
    from medhybrid.infer.viewer import inline_asset  # viewer imports this module

    decisions = sorted({str(r.get("decision") or "none") for r in rows})
    options = "".join(f'<option value="{_e(d)}">{_e(_DECISION_TEXT.get(d, d))}</option>' for d in decisions)
    parts = [
        "<h1>medhybrid worklist</h1>",
        f'<div class="muted">{len(rows)} studies reported, {len(failed)} failed · model {_e(meta.get("model"))} · '
        f"{_threshold_text(meta.get('threshold'))} · input {_e(meta.get('input'))}</div>",
        '<div class="banner">Research use only: sorted by the study score (probability of abnormality) for '
        "review.</div>",
        '<div class="controls"><input id="filter" type="search" placeholder="filter (/)" aria-label="filter rows"> '
        f'<select id="decision-filter" aria-label="decision"><option value="">all decisions</option>{options}'
        '</select> <span id="shown" class="muted"></span> <span class="muted">· click a header to sort · '
        "j/k or arrows to move, Enter to open</span></div>",
        '<table id="worklist"><thead><tr><th data-type="number">#</th><th>Image</th><th data-type="text">Study</th>'
        '<th data-type="number">Score</th><th data-type="text">Decision</th><th data-type="number">Lesion (mL)</th>'
        '<th data-type="text">QC</th><th data-type="text">Source</th></tr></thead><tbody>',
    ]
    for n, r in enumerate(rows, 1):
        key = _e(r["study_key"])
        thumb = f'<img class="thumb" src="{key}/thumb.png" alt="thumbnail">' if r.get("thumbnail") else ""
        has_score = r.get("probability") not in ("", None)
        score = f"{float(r['probability']):.3f}" if has_score else "n/a"
        badge = str(r.get("decision") or "none")
        decision = _DECISION_TEXT.get(badge, badge)
        lesion = r.get("lesion_ml", "")
        parts.append(
            f'<tr data-decision="{_e(badge)}"><td>{n}</td><td><a href="{key}/report.html">{thumb}</a></td>'
            f'<td><a href="{key}/report.html">{key}</a></td>'
            f'<td data-v="{_e(r["probability"]) if has_score else ""}">{score}</td>'
            f'<td><span class="badge {_e(badge)}">{_e(decision)}</span></td>'
            f'<td data-v="{_e(lesion)}">{_e(lesion)}</td><td class="{_e(r["qc_verdict"])}">{_e(r["qc_verdict"])}</td>'
            f'<td class="muted">{_e(r["source"])}</td></tr>'
        )
    parts.append("</tbody></table>")
    if failed:
        parts.append("<h2>Failed</h2><table><tr><th>Study</th><th>Source</th><th>Error</th><th>Reason</th></tr>")
        parts += [
            f'<tr><td>{_e(f["study_key"])}</td><td class="muted">{_e(f["source"])}</td>'
            f'<td><span class="badge failed">{_e(f["error"])}</span></td><td>{_e(f["reason"])}</td></tr>'
            for f in failed
        ]
        parts.append("</table>")
    parts.append(f"<script>{inline_asset('worklist.js')}</script>")
    return _page("medhybrid worklist", "\n".join(parts))
