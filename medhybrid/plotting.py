"""Headless matplotlib figures as PNG bytes: the one place that picks the backend and closes figures.

Import lazily (matplotlib costs about half a second to import), from the code that draws::

    with PngFigure(1, 2, figsize=(9, 3.6)) as f:
        left, right = f.axes
        ...
        png = f.png()
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


class PngFigure:
    """A pyplot figure with its axes (``plt.subplots`` arguments), closed when the ``with`` block ends,
    whether drawing succeeded or not."""

    def __init__(self, nrows: int = 1, ncols: int = 1, **subplots: Any) -> None:
        self.fig, self.axes = plt.subplots(nrows, ncols, **subplots)

    def __enter__(self) -> PngFigure:
        return self

    def __exit__(self, *exc: object) -> None:
        plt.close(self.fig)

    def png(self, *, dpi: float | None = None) -> bytes:
        """The figure, laid out tightly, as PNG bytes (``dpi``: the figure's own when None)."""
        self.fig.tight_layout()
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()
