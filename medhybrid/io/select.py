"""Choose the one series of a study to analyse, by explicit rules.

A study often holds several series (localizers, reformats, contrast phases). medhybrid never silently
takes the first: the rules filter the candidates, and if more than one remains (and ``largest`` is not
set) the caller gets an :class:`~medhybrid.errors.AmbiguousSeriesError` listing them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from medhybrid.errors import AmbiguousSeriesError, ConfigError, NoSeriesError
from medhybrid.io.dicom import DicomSeries
from medhybrid.io.study import Verdict


@dataclass(frozen=True)
class SelectionRules:
    """Series selection rules.

    Attributes:
        modalities: accepted modalities (e.g. ``("CT",)``); empty accepts all.
        min_slices: fewest slices a candidate must have.
        description: regular expression searched (case-insensitive) in SeriesDescription.
        largest: among several candidates, take the one with most voxels (ties stay ambiguous).
        allow_warn: accept series whose QC verdict is ``warn`` (``reject`` is never selected).
    """

    modalities: tuple[str, ...] = ()
    min_slices: int = 1
    description: str | None = None
    largest: bool = False
    allow_warn: bool = True

    def __post_init__(self) -> None:
        if self.min_slices < 1:
            raise ConfigError(f"min_slices must be >= 1, got {self.min_slices}")
        if self.description is not None:
            try:
                re.compile(self.description)
            except re.error as exc:
                raise ConfigError(f"series description pattern {self.description!r} is invalid: {exc}") from None

    def why_not(self, series: DicomSeries) -> str | None:
        """The first rule ``series`` fails, or None if it is a candidate."""
        if series.qc.verdict is Verdict.REJECT:
            return "QC reject"
        if series.qc.verdict is Verdict.WARN and not self.allow_warn:
            return "QC warn"
        if self.modalities and series.modality not in {m.upper() for m in self.modalities}:
            return f"modality {series.modality} not in {list(self.modalities)}"
        if series.n_slices < self.min_slices:
            return f"{series.n_slices} slices < {self.min_slices}"
        if self.description and not re.search(self.description, series.description, re.IGNORECASE):
            return f"description {series.description!r} does not match {self.description!r}"
        return None


def describe(series: DicomSeries) -> str:
    """One PHI-free line naming a series for error messages."""
    return (
        f"#{series.headers[0].safe_metadata.get('SeriesNumber', '?')} {series.modality} "
        f"{series.description!r} {series.n_slices} slices, QC {series.qc.verdict.value} "
        f"(uid ...{series.series_uid[-12:]})"
    )


def select_series(series: Sequence[DicomSeries], rules: SelectionRules | None = None) -> DicomSeries:
    """The one series of one study that the rules pick.

    Raises:
        NoSeriesError: nothing matches (the message lists every series and why it was left out).
        AmbiguousSeriesError: several match (the message lists them and the rules that would decide).
    """
    rules = rules or SelectionRules()
    if not series:
        raise NoSeriesError("the study holds no DICOM image series")
    verdicts = [(s, rules.why_not(s)) for s in series]
    candidates = [s for s, why in verdicts if why is None]
    if not candidates:
        listing = "; ".join(f"{describe(s)}: {why}" for s, why in verdicts)
        raise NoSeriesError(
            f"no series matches the selection rules ({listing})",
            path=series[0].headers[0].path.parent,
            fix="relax the rules (modality, min slices, description) or fix the rejected series",
        )
    if len(candidates) == 1:
        return candidates[0]
    if rules.largest:
        sizes = sorted(((_voxels(s), i) for i, s in enumerate(candidates)), reverse=True)
        if sizes[0][0] > sizes[1][0]:
            return candidates[sizes[0][1]]
    listing = "; ".join(describe(s) for s in candidates)
    raise AmbiguousSeriesError(
        f"{len(candidates)} series match: {listing}",
        path=candidates[0].headers[0].path.parent,
        fix="add a rule: --modality, --min-slices, --series-description REGEX or --largest",
    )


def _voxels(series: DicomSeries) -> int:
    h = series.headers[0]
    return h.rows * h.cols * series.n_slices
