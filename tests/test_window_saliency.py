"""Grad-CAM over a large scan explains the windows that carry the score (medhybrid/infer/window_saliency.py)."""

from __future__ import annotations

import math

import pytest
import torch

from medhybrid.infer.window_saliency import MAX_EXPLAINED, chosen_windows, explain_windows, threshold_log_odds
from medhybrid.infer.windows import windowed


def test_the_windows_at_or_above_the_operating_point_are_chosen_strongest_first() -> None:
    margins = {(0, 0): -3.0, (8, 0): 0.5, (16, 0): 2.0, (24, 0): 0.0}
    assert chosen_windows(margins, 0.0) == {(8, 0), (16, 0), (24, 0)}
    assert chosen_windows(margins, 5.0) == {(16, 0)}  # none reaches it: the strongest window alone
    many = {(i,): float(i) for i in range(100)}
    assert chosen_windows(many, 0.0) == {(i,) for i in range(100 - MAX_EXPLAINED, 100)}


def test_the_threshold_is_on_calibrated_probabilities() -> None:
    assert threshold_log_odds(0.5, 2.0) == 0.0
    margin = threshold_log_odds(0.8, 2.0)
    assert 1.0 / (1.0 + math.exp(-margin / 2.0)) == pytest.approx(0.8)


def test_the_blend_is_every_windows_map_with_the_unexplained_ones_zero() -> None:
    """A stand-in model: log-odds = the window's peak - 1; Grad-CAM = the window itself + 1. Two bright
    spots, one above the operating point (0.5, log-odds 0) and one below: the two-pass map equals the
    one-pass blend in which each window below the operating point returns zeros."""

    def forward(t: torch.Tensor) -> dict[str, torch.Tensor]:
        peak = t.flatten(1).amax(1) - 1.0
        return {"logits": torch.stack([torch.zeros_like(peak), peak], 1), "seg": t.clone()}

    def gradcam(t: torch.Tensor) -> torch.Tensor:
        return t + 1.0

    x = torch.rand(1, 1, 64, 48, 32) * 0.5
    x[0, 0, 10, 10, 10] = 3.0  # strong: its windows are explained
    x[0, 0, 50, 40, 25] = 0.8  # weak: log-odds -0.2, below the operating point
    out = explain_windows(
        forward, gradcam, x, (16, 16, 16), threshold=0.5, temperature=1.0, overlap=0.5, sw_batch_size=4
    )

    def reference(t: torch.Tensor) -> dict[str, torch.Tensor]:
        keep = (t.flatten(1).amax(1) - 1.0 >= 0.0).float().reshape(-1, 1, 1, 1, 1)
        return {"gradcam": gradcam(t) * keep}

    expected = windowed(reference, x, (16, 16, 16), overlap=0.5, sw_batch_size=4)["gradcam"]
    torch.testing.assert_close(out["gradcam"], expected)
    assert float(out["gradcam"][0, 0, 10, 10, 10]) > 0 and float(out["gradcam"][0, 0, 50, 40, 25]) == 0.0
    assert float(out["logits"][0, 1]) == pytest.approx(2.0)  # the study's logits: the strongest window
    assert out["seg"].shape == x.shape
    one = explain_windows(
        forward,
        gradcam,
        x[..., :16, :16, :16],
        (16, 16, 16),
        threshold=0.5,
        temperature=1.0,
        overlap=0.5,
        sw_batch_size=4,
    )
    torch.testing.assert_close(one["gradcam"], gradcam(x[..., :16, :16, :16]))  # one window: explained whole


def test_a_classifier_over_a_large_scan_has_grad_cam_on_few_windows_and_attention_on_all(tiny_run) -> None:
    """The tiny model over the 96 x 80 x 48 grid of test_windows' large scan (45 windows): Grad-CAM runs on
    at most MAX_EXPLAINED of them, attention rollout (forward only) on every one."""
    import numpy as np

    from medhybrid.data.synth import synth_study
    from medhybrid.infer.predictor import Predictor
    from medhybrid.io.study import Study

    s = synth_study(0, 1)
    big = np.full((192, 160, 48), -1000.0, np.float32)
    big[120:184, 90:154, 10:42] = s.image
    affine = s.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([120.0, 90.0, 10.0])
    predictor = Predictor(tiny_run, device="cpu")
    prepared = predictor.preprocess(Study("big", big, affine, "CT", tiny_run, "nifti"))
    member = predictor.members[0]
    explained: list[int] = []
    full = member.explainer.__call__

    def counting(t: torch.Tensor):  # type: ignore[no-untyped-def]
        explained.append(t.shape[0])
        return full(t)

    member.explainer = type("Counting", (), {"__call__": staticmethod(counting), "methods": full.__self__.methods})()
    pred = predictor.run(prepared)
    assert 1 <= sum(explained) <= MAX_EXPLAINED
    assert set(pred.saliency) == {"gradcam", "attention"}
    for values in pred.saliency.values():
        assert tuple(values.shape[1:]) == (96, 80, 48)
    # attention everywhere the body is; Grad-CAM only on the windows explained
    body = prepared.x[0, 0] > prepared.x.amin()
    assert float((pred.saliency["attention"][0][body] > 0).float().mean()) > 0.99
    assert float((pred.saliency["gradcam"][0][body] == 0).float().mean()) > 0.0
