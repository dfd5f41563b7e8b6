"""Fuzzing of ingestion in the suite (tests/fuzz): every mutated real file gives a study or a typed error,
within 10 s and 2 GiB per case. ``make fuzz`` runs the long campaign (20,000 cases)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import FAILURES, fuzz, generate, run_case
from tests.fuzz.mutate import BYTE_OPS, TAG_OPS, sources

REGRESSIONS = Path(__file__).parent / "fuzz" / "regressions.json"
CI_CASES = 2000


def _failures(tally: Any) -> str:
    return json.dumps(tally.failures[:5], indent=1)


def test_every_crash_found_so_far_stays_fixed(shared_data: Path) -> None:
    """Each case in regressions.json once escaped untyped, hung, crashed or loaded silently wrong."""
    cases = [item["case"] for item in json.loads(REGRESSIONS.read_text())]
    assert len(cases) >= 30
    tally = fuzz(cases, shared_data, workers=2)
    assert tally.cases == len(cases)
    assert not tally.failures, _failures(tally)


def test_ci_sized_mutation_campaign(shared_data: Path) -> None:
    tally = fuzz(generate(CI_CASES, seed=7, shared=shared_data), shared_data, workers=2)
    print(json.dumps(tally.as_dict()))
    assert tally.cases == CI_CASES
    assert not any(tally.outcomes[o] for o in FAILURES), _failures(tally)
    # the campaign reaches every outcome worth testing: clean loads and several kinds of typed refusal
    assert tally.outcomes["ok"] > 0 and tally.outcomes["typed"] > 0
    assert {"corrupt_pixel_data", "image_read", "no_series"} <= set(tally.codes)


@pytest.fixture(scope="module")
def pool(shared_data: Path) -> dict[str, list[str]]:
    return sources(shared_data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    index=st.integers(min_value=0, max_value=10_000),
    ops=st.lists(st.sampled_from(TAG_OPS + BYTE_OPS), min_size=1, max_size=4),
    seed=st.integers(min_value=0, max_value=2**30),
)
def test_hypothesis_tag_edits_give_a_study_or_a_typed_error(
    shared_data: Path, pool: dict[str, list[str]], index: int, ops: list[str], seed: int
) -> None:
    """Hypothesis drives the same mutators in-process (it shrinks a failure to its fewest operations)."""
    source = pool["file"][index % len(pool["file"])]
    answer = run_case({"kind": "file", "source": source, "ops": ops, "seed": seed}, shared_data)
    assert not set(answer.values()) & set(FAILURES), answer
