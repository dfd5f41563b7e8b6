"""Whole-scan coverage (medhybrid/infer/windows.py): a scan larger than the model's input is seen window
by window, never centre-cropped; a classifier's study score is the max over windows; training's
validation, evaluate and infer aggregate the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medhybrid.data.synth import synth_study
from medhybrid.infer.predictor import Predictor
from medhybrid.infer.windows import abnormal_margin, strongest_window, windowed
from medhybrid.io.study import Study


def bright_spot_fn(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A stand-in model: abnormality log-odds = the window's maximum intensity; mask = the intensity."""
    peak = t.flatten(1).amax(1)
    return {"logits": torch.stack([torch.zeros_like(peak), peak], 1), "seg": t.clone()}


def test_a_spot_anywhere_gives_the_same_study_score_and_the_whole_grid_is_blended() -> None:
    for corner in [(2, 2, 2), (60, 3, 30), (33, 61, 1)]:
        x = torch.zeros(1, 1, 64, 64, 32)
        x[(0, 0, *corner)] = 5.0
        out = windowed(bright_spot_fn, x, (16, 16, 16))
        assert out["logits"].shape == (1, 2) and float(out["logits"][0, 1]) == 5.0  # max over windows
        assert out["seg"].shape == x.shape  # every voxel covered, none cropped
        assert float(out["seg"][(0, 0, *corner)]) == 5.0  # blended back where it lies


def test_one_window_is_one_pass() -> None:
    calls: list[tuple[int, ...]] = []

    def fn(t: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(tuple(t.shape))
        return bright_spot_fn(t)

    windowed(fn, torch.zeros(1, 1, 16, 16, 16), (16, 16, 16))
    assert calls == [(1, 1, 16, 16, 16)]


def test_empty_surroundings_get_the_blank_windows_answer_without_being_windowed() -> None:
    """A 24^3 body in the corner of a 96 x 96 x 32 scan of air: only the body's box is windowed (8 windows,
    not the 363 of the whole scan), and every voxel outside it carries the model's output for an air window."""
    calls: list[int] = []

    def fn(t: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(t.shape[0])
        mean = t.flatten(1).mean(1)
        return {"logits": torch.stack([torch.zeros_like(mean), mean], 1), "seg": t + 10.0}

    x = torch.full((1, 1, 96, 96, 32), -1.0)
    x[..., 4:28, 6:30, 4:28] = torch.rand(24, 24, 24)
    out = windowed(fn, x, (16, 16, 16), sw_batch_size=1)
    assert sum(calls) == 2 * 2 * 2 + 1  # the 24^3 box at stride 8: 2 windows per axis; and one blank window
    assert out["seg"].shape == x.shape
    torch.testing.assert_close(out["seg"][..., 4:28, 6:30, 4:28], x[..., 4:28, 6:30, 4:28] + 10.0)
    assert torch.all(out["seg"][..., 40:, :, :] == 9.0)  # air (-1) + 10: the blank window's answer
    calls.clear()
    whole = windowed(fn, x.clamp(min=0.0) + 0.01 * torch.rand_like(x), (16, 16, 16), sw_batch_size=1)
    assert sum(calls) == 11 * 11 * 3 and whole["seg"].shape == x.shape  # noisy background: windowed whole


def test_an_air_window_can_be_the_strongest() -> None:
    """The blank window's logits are a candidate: a model that calls air abnormal says so for the study."""

    def fn(t: torch.Tensor) -> dict[str, torch.Tensor]:
        air = (t < 0).float().flatten(1).mean(1)
        return {"logits": torch.stack([torch.zeros_like(air), 3.0 * air], 1), "seg": t.clone()}

    x = torch.full((1, 1, 64, 64, 16), -1.0)
    x[..., :16, :16, :] = 1.0
    assert float(windowed(fn, x, (16, 16, 16))["logits"][0, 1]) == 3.0


def test_the_strongest_window_is_by_log_odds_of_any_abnormal_class() -> None:
    logits = torch.tensor([[0.0, 1.0, -5.0], [3.0, 2.0, 2.5], [0.0, -1.0, 1.5]])
    margins = abnormal_margin(logits)
    assert torch.allclose(margins, torch.logsumexp(logits[:, 1:], 1) - logits[:, 0])
    assert torch.equal(strongest_window(logits), logits[2:3])


def test_a_large_scan_is_covered_whole_by_the_checkpoint_preprocessing(tiny_run: Path) -> None:
    """The tiny model (spacing 1.5 x 1.5 x 2.5 mm, input 32^3) given a 192 x 160 x 48 voxel scan at its
    native 0.75 mm: the model input is the whole field of view at the model's spacing (96 x 80 x 48), not
    the 32^3 centre crop the old preprocessing took, and the prediction maps back over all of it."""
    s = synth_study(0, 1)
    big = np.full((192, 160, 48), -1000.0, np.float32)
    big[120:184, 90:154, 10:42] = s.image  # the phantom off centre: a centre crop would miss its lesion
    affine = s.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([120.0, 90.0, 10.0])
    study = Study("big", big, affine, "CT", Path("big"), "nifti")
    predictor = Predictor(tiny_run, device="cpu", saliency=())
    prepared = predictor.preprocess(study)
    assert tuple(prepared.x.shape[2:]) == (96, 80, 48)
    assert not predictor.one_window(prepared.x)
    pred = predictor.run(prepared, explain=False)
    assert pred.seg_probs is not None and tuple(pred.seg_probs.shape[1:]) == (96, 80, 48)
    assert pred.logits is not None and pred.probability is not None
    # the score is the max over windows: at least that of the window holding the phantom's centre
    window = prepared.x[..., 64:96, 48:80, 16:48]  # one of the windows (stride 16)
    with torch.no_grad():
        alone = predictor.members[0].model(window)["logits"].float()
    assert float(abnormal_margin(torch.as_tensor(pred.logits)[None])[0]) >= float(abnormal_margin(alone)[0]) - 1e-4


def test_saliency_of_a_batch_of_windows_is_each_windows_own() -> None:
    """Inference explains windows four at a time: in eval mode every window's Grad-CAM and rollout must be
    what it would be alone (no batch statistics, no gradient shared between windows)."""
    from medhybrid.infer.saliency import Explainer
    from medhybrid.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("hybrid_tiny_3d", num_classes=2, seg_classes=2, img_size=(32, 32, 32)).eval()
    explainer = Explainer(model)
    x = torch.randn(3, 1, 32, 32, 32)
    batched = explainer(x)
    for i in range(3):
        alone = explainer(x[i : i + 1])
        for method in ("gradcam", "attention"):
            torch.testing.assert_close(batched[method][i : i + 1], alone[method], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched["outputs"]["logits"][i : i + 1], alone["outputs"]["logits"])
