"""The last lines of `make demo` (medhybrid/evaluate/demo_summary.py) state the held-out figures and how the
worklist ranks the new lesion studies, computed from the files the demo wrote."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from medhybrid.evaluate.demo_summary import summary_lines


def test_demo_summary_reports_test_figures_and_the_worklist_ranking(tmp_path: Path) -> None:
    ev, rep = tmp_path / "evaluation", tmp_path / "reports"
    ev.mkdir()
    rep.mkdir()
    ci = {"value": 0.9, "ci_low": 0.8, "ci_high": 0.97}
    metrics = {"n_studies": 40, "classification": {"auroc": ci}, "segmentation": {"mean": {"dice": ci}}}
    (ev / "metrics.json").write_text(json.dumps(metrics))
    truth = {"a": 1, "b": 0, "c": 1, "d": 0, "e": 0}
    with (tmp_path / "manifest.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_id", "label"])
        w.writerows(truth.items())
    scores = {"a": 0.9, "b": 0.8, "c": 0.3, "d": 0.1}  # "e" NOT ASSESSED: no score, left out
    with (rep / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_key", "probability", "source"])
        w.writerows([(f"s{k}", scores.get(k, ""), f"dicom/{k}") for k in truth])
    first, second = summary_lines(ev, rep, tmp_path / "manifest.csv")
    assert first == (
        "demo: held-out test split (40 studies): AUROC 0.900 (95 % CI 0.800-0.970), lesion Dice 0.900 "
        "(95 % CI 0.800-0.970)"
    )
    # ranked a (1), b (0), c (1), d (0): the top 2 hold 1 of the 2 lesion studies; AUROC 3 of 4 pairs
    assert (
        second == "demo: 4 new studies: worklist AUROC 0.750; the top 2 of the worklist hold 1 of the 2 lesion studies"
    )
