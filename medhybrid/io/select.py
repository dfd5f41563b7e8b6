"""Choose the one series of a study to analyse, by explicit rules.

A study often holds several series (localizers, reformats, contrast phases). medhybrid never silently
takes the first: the rules filter the candidates, and if more than one remains (and ``largest`` is not
set) the caller gets an :class:`~medhybrid.errors.AmbiguousSeriesError` listing them.

:func:`select_for_model` adds what the model knows: among several candidates the ones of the model's
modality decide (a CT model given a study with a CT and its MR localizers takes the CT), and a study with no
series of that modality is not an error but a study outside the model's scope (reported NOT ASSESSED).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
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


@dataclass(frozen=True)
class SeriesChoice:
    """The series to load and, when none of the study's series is of the model's modality, why the study is
    outside the model's scope (``out_of_scope``: one PHI-free line); the series is then the one shown."""

    series: DicomSeries
    out_of_scope: str | None = None


def select_for_model(
    series: Sequence[DicomSeries], rules: SelectionRules, modalities: Sequence[str] = ()
) -> SeriesChoice:
    """:func:`select_series`, then, where it fails and the user set no modality rule, the model's modalities:

    - several candidates, of which exactly one is of a modality in ``modalities``: that one;
    - no loadable candidate of those modalities: the largest candidate (most voxels, then lowest series
      number), marked out of scope, so the study is reported NOT ASSESSED with what it holds.

    Raises:
        NoSeriesError, AmbiguousSeriesError: as :func:`select_series`, where the model's modality does not
        decide (several series of the model's modality, or nothing loadable at all).
    """
    try:
        return SeriesChoice(select_series(series, rules))
    except (NoSeriesError, AmbiguousSeriesError):
        wanted = tuple(m.upper() for m in modalities)
        if rules.modalities or not wanted:
            raise
        candidates = [s for s in series if rules.why_not(s) is None]
        if any(s.modality in wanted for s in candidates):
            return SeriesChoice(select_series(series, dataclasses.replace(rules, modalities=wanted)))
        if not candidates:
            raise
        shown = max(candidates, key=lambda s: (_voxels(s), -_series_number(s)))
        held = ", ".join(f"{n} {m}" for m, n in sorted(Counter(s.modality for s in candidates).items()))
        return SeriesChoice(
            shown,
            f"the study holds no {'/'.join(wanted)} series ({held}); the model was trained on {', '.join(wanted)}",
        )


def _series_number(series: DicomSeries) -> int:
    try:
        return int(series.headers[0].safe_metadata.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        return 0


def _voxels(series: DicomSeries) -> int:
    h = series.headers[0]
    return h.rows * h.cols * series.n_slices
