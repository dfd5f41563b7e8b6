"""Grad-CAM over a large scan: explain the windows that carry the study's score, not every window.

A classifier's study score is its strongest window (:mod:`medhybrid.infer.windows`), so what explains the
score is that window and those that came close. Explaining every window costs a backward pass each (on a
512 x 512 x 300 CT, about 500 windows: most of the model step) and mostly maps windows the model calls
normal, which the per-study scaling then shows at full brightness beside the real evidence.

Two passes over the same windows:

1. every window forward without gradients: outputs, attention rollout (a forward-only map, kept for all
   windows) and each window's abnormality log-odds, by the window's position;
2. Grad-CAM on the windows **at or above the operating point** (calibrated probability, as the study is
   called), strongest first, at most :data:`MAX_EXPLAINED`, and always the strongest window; every other
   window contributes a zero map to MONAI's Gaussian blend. The result equals the blend of all windows'
   maps where those of windows below the operating point are set to zero.

A scan that is one window, and a segmentation-only model (its Grad-CAM score is the mean foreground
log-odds of every window, not one window's), keep the single pass that explains everything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from medhybrid.infer.windows import Starts, abnormal_margin, fits, windowed

MAX_EXPLAINED = 32  # windows given a Grad-CAM pass per study: 32 x 32^3 covers any lesion the cohort has

Pass = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def chosen_windows(margins: dict[tuple[int, ...], float], threshold_margin: float) -> set[tuple[int, ...]]:
    """Starts of the windows to explain: log-odds at or above ``threshold_margin``, strongest first, at most
    :data:`MAX_EXPLAINED`, and the strongest window even when none reaches it."""
    ranked = sorted(margins, key=lambda k: -margins[k])
    above = [k for k in ranked if margins[k] >= threshold_margin][:MAX_EXPLAINED]
    return set(above or ranked[:1])


def threshold_log_odds(threshold: float, temperature: float) -> float:
    """The raw log-odds at which a window's calibrated probability ``sigmoid(margin / T)`` is ``threshold``."""
    t = min(max(threshold, 1e-12), 1.0 - 1e-12)
    return math.log(t / (1.0 - t)) * temperature


def explain_windows(
    forward: Pass,
    gradcam: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    window: Sequence[int],
    *,
    threshold: float,
    temperature: float,
    overlap: float,
    sw_batch_size: int,
) -> dict[str, torch.Tensor]:
    """The two passes of the module docstring over ``x`` ``(1, C, *spatial)``.

    Args:
        forward: a window batch -> the model's ``logits``, ``seg`` and forward-only maps (attention), no grad.
        gradcam: a window batch -> its raw Grad-CAM maps ``(b, 1, *window)``.
        threshold, temperature: the operating point on calibrated probabilities, and the temperature.

    Returns:
        ``forward``'s blended outputs (``logits`` of the strongest window) and the blended ``gradcam``.
    """
    if fits(x, window):  # one window: it is the study's score, explained as it is
        return {**forward(x), "gradcam": gradcam(x).float()}
    margins: dict[tuple[int, ...], float] = {}

    @torch.no_grad()
    def first(t: torch.Tensor, starts: Starts | None) -> dict[str, torch.Tensor]:
        out = forward(t)
        if starts is not None:
            margins.update(zip(starts, abnormal_margin(out["logits"].float()).tolist(), strict=True))
        return out

    result = windowed(first, x, window, overlap=overlap, sw_batch_size=sw_batch_size, with_starts=True)
    explain = chosen_windows(margins, threshold_log_odds(threshold, temperature))

    def second(t: torch.Tensor, starts: Starts | None) -> dict[str, torch.Tensor]:
        cam = torch.zeros((t.shape[0], 1, *t.shape[2:]), dtype=torch.float32, device=t.device)
        rows = [i for i, s in enumerate(starts or ()) if s in explain]
        if rows:
            cam[rows] = gradcam(t[rows]).float()
        return {"gradcam": cam}

    result["gradcam"] = windowed(second, x, window, overlap=overlap, sw_batch_size=sw_batch_size, with_starts=True)[
        "gradcam"
    ]
    return result
