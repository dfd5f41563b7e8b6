"""Whole-scan inference: a model applied over windows of its input size, window evidence aggregated.

A model sees inputs of one size: its training patch (segmentation trained on patches) or its
``spatial_size`` (classification and multitask at a physical ``spacing``). A scan larger than that is
covered window by window with MONAI's ``sliding_window_inference``: every voxel of the field of view is
seen, none is cropped away. The spatial outputs (mask logits or probabilities, raw saliency maps) are
blended with Gaussian weights, as MONAI does.

Classification logits are not spatial, so they are aggregated here: the study's logits are those of the
window with the strongest evidence of abnormality, the largest log-odds ``logsumexp(logit[1:]) -
logit[0]``: the **max over windows** of ``p(abnormal)``. For two classes the same window wins at every
temperature, so temperature scaling and the operating point fitted on these logits stay valid. A lesion
anywhere in the scan raises the study's score; a large normal scan is not diluted into "normal" by
averaging (noisy-OR would instead grow with the number of windows, so a bigger scan would look more
abnormal). Training's validation (:class:`medhybrid.train.evaluate.Validator`), ``evaluate`` and
``infer`` all call :func:`windowed`, so the operating point stored with the weights was chosen on the
score inference reports.

A scan that fits in one window (padded to it by the preprocessing) is one pass, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference

WindowFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]
LOGITS = "logits"
_COUNT = "_windows"  # a spatial stand-in when a model has no spatial output (MONAI blends only spatial maps)


def abnormal_margin(logits: torch.Tensor) -> torch.Tensor:
    """Log-odds of abnormality per row of ``(N, C)`` logits: any abnormal class against class 0."""
    return torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]


def strongest_window(logits: torch.Tensor) -> torch.Tensor:
    """The row of ``(N, C)`` window logits with the most abnormality evidence, as ``(1, C)``."""
    return logits[int(torch.argmax(abnormal_margin(logits)))][None]


def fits(x: torch.Tensor, window: Sequence[int] | None) -> bool:
    """True when ``x`` (``(B, C, *spatial)``) is one window: no sliding needed."""
    return window is None or all(s <= w for s, w in zip(x.shape[2:], window, strict=True))


def windowed(
    fn: WindowFn,
    x: torch.Tensor,
    window: Sequence[int] | None,
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
) -> dict[str, torch.Tensor]:
    """``fn`` over ``x`` (batch of one) window by window: spatial outputs blended, ``logits`` of the
    strongest window (see the module docstring). ``fn`` maps ``(b, C, *window)`` to a dict of optional
    ``logits`` ``(b, K)`` and spatial outputs ``(b, *, *window)``."""
    if fits(x, window):
        return fn(x)
    assert window is not None
    if x.shape[0] != 1:
        raise ValueError(f"windowed inference takes one study at a time, got a batch of {x.shape[0]}")
    collected: list[torch.Tensor] = []

    def spatial(t: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(fn(t))
        logits = out.pop(LOGITS, None)
        if logits is not None:
            collected.append(logits.detach().float())
        if not out:
            out[_COUNT] = torch.ones((t.shape[0], 1, *t.shape[2:]), device=t.device)
        return out

    blended = sliding_window_inference(
        x,
        roi_size=tuple(window),
        sw_batch_size=sw_batch_size,
        predictor=spatial,
        overlap=overlap,
        mode="gaussian",
    )
    assert isinstance(blended, dict)
    result = {str(k): v for k, v in blended.items() if k != _COUNT}
    if collected:
        result[LOGITS] = strongest_window(torch.cat(collected))
    return result
