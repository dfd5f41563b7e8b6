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

**Empty surroundings are not windowed.** Voxels at the scan's minimum after preprocessing (air below a CT
window's floor, a reader's zero padding) carry nothing; a CT's body fills half of its field of view or
less. The windows cover the bounding box of the voxels above that minimum (at least one window wide, any
channel); everything outside it gets the model's outputs for one window of that constant value (spatial
outputs averaged per channel, its logits one more candidate for the study's strongest window), which is
what every window lying wholly outside would have returned. A scan with no such surroundings (MR's noisy
background, a CT cropped to the body) is windowed whole, exactly as before. nnU-Net crops to the
nonzero region before planning for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference

WindowFn = Callable[..., dict[str, torch.Tensor]]
Starts = list[tuple[int, ...]]  # each window's first voxel per spatial axis, in the scan's frame
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


def foreground_box(x: torch.Tensor, window: Sequence[int]) -> tuple[slice, ...] | None:
    """The spatial bounding box of the voxels of ``x`` (``(1, C, *spatial)``) above its minimum, grown to at
    least ``window`` per axis (centred, kept inside the scan); ``None`` when that box is the whole scan or
    no voxel is above the minimum."""
    above = (x > x.amin()).any(dim=1)[0]
    if not bool(above.any()):
        return None
    box: list[slice] = []
    dims = above.ndim
    for axis, (size, win) in enumerate(zip(above.shape, window, strict=True)):
        hit = torch.nonzero(above.any(dim=tuple(d for d in range(dims) if d != axis))).flatten()
        lo, hi = int(hit[0]), int(hit[-1]) + 1
        if hi - lo < win:  # widen to one window, centred on the content, inside the scan
            lo = max(0, min(lo - (win - (hi - lo)) // 2, size - win))
            hi = min(size, lo + win)
        box.append(slice(lo, hi))
    if all(b.start == 0 and b.stop == n for b, n in zip(box, above.shape, strict=True)):
        return None
    return tuple(box)


def windowed(
    fn: WindowFn,
    x: torch.Tensor,
    window: Sequence[int] | None,
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    with_starts: bool = False,
) -> dict[str, torch.Tensor]:
    """``fn`` over ``x`` (batch of one) window by window: spatial outputs blended, ``logits`` of the
    strongest window (see the module docstring). ``fn`` maps ``(b, C, *window)`` to a dict of optional
    ``logits`` ``(b, K)`` and spatial outputs ``(b, *, *window)``.

    With ``with_starts`` ``fn`` is called as ``fn(windows, starts)``: ``starts`` names each window by its
    first voxel in ``x`` (a window of MONAI's padding may start below 0), and is ``None`` for the blank
    window and for a scan that is one window. Two calls on the same ``x`` see the same windows, so a
    second pass can single out windows the first one scored (:mod:`medhybrid.infer.window_saliency`)."""
    if fits(x, window):
        return fn(x, None) if with_starts else fn(x)
    assert window is not None
    if x.shape[0] != 1:
        raise ValueError(f"windowed inference takes one study at a time, got a batch of {x.shape[0]}")
    collected: list[torch.Tensor] = []
    box = foreground_box(x, window)

    region = x if box is None else x[(slice(None), slice(None)) + box]
    offset = [0] * len(window) if box is None else [b.start for b in box]
    # MONAI pads an axis shorter than the window by half the difference in front
    pad = [max(w - n, 0) // 2 for w, n in zip(window, region.shape[2:], strict=True)]

    def spatial(t: torch.Tensor, where: list[list[slice]] | None = None) -> dict[str, torch.Tensor]:
        if with_starts:
            starts = (
                None
                if where is None
                else [tuple(int(sl.start) + o - p for sl, o, p in zip(w[2:], offset, pad, strict=True)) for w in where]
            )
            out = dict(fn(t, starts))
        else:
            out = dict(fn(t))
        logits = out.pop(LOGITS, None)
        if logits is not None:
            collected.append(logits.detach().float())
        if not out:
            out[_COUNT] = torch.ones((t.shape[0], 1, *t.shape[2:]), device=t.device)
        return out

    blended = sliding_window_inference(
        region,
        roi_size=tuple(window),
        sw_batch_size=sw_batch_size,
        predictor=spatial,
        overlap=overlap,
        mode="gaussian",
        with_coord=with_starts,
    )
    assert isinstance(blended, dict)
    result = {str(k): v for k, v in blended.items() if k != _COUNT}
    if box is not None:
        # the model's answer for an empty window stands for every voxel outside the box
        blank = spatial(torch.full((1, x.shape[1], *window), float(x.amin()), dtype=x.dtype, device=x.device))
        for key, inner in result.items():
            fill = blank[key].detach().to(inner.dtype).flatten(2).mean(-1)
            full = fill.reshape(*fill.shape, *(1,) * len(window)).expand(*fill.shape, *x.shape[2:]).clone()
            full[(slice(None), slice(None)) + box] = inner
            result[key] = full
    if collected:
        result[LOGITS] = strongest_window(torch.cat(collected))
    return result
