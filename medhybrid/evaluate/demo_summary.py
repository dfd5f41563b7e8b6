"""The last lines of ``make demo``: what the demo model achieved, in numbers a new user can check.

``python -m medhybrid.evaluate.demo_summary EVALUATION REPORTS NEW_MANIFEST`` prints, from ``evaluate``'s
``metrics.json`` on the cohort's held-out test split (which chose nothing: the epoch was chosen on val,
the temperature and threshold fitted on val), the AUROC and lesion Dice with their 95 % CIs, and, from
``infer``'s ``summary.csv`` on the new studies (another seed: unseen phantoms) against their truth, the
worklist's AUROC and how many lesion studies it ranks first. Exit status 0 whatever the figures: they are
reported, not gated (the demo's acceptance targets are in docs/benchmarks.md).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from sklearn.metrics import roc_auc_score


def summary_lines(evaluation: Path, reports: Path, new_manifest: Path) -> list[str]:
    m = json.loads((evaluation / "metrics.json").read_text())
    lines = []
    c, s = m.get("classification"), m.get("segmentation")
    if c:
        a = c["auroc"]
        lines.append(
            f"demo: held-out test split ({m['n_studies']} studies): AUROC {a['value']:.3f} "
            f"(95 % CI {a['ci_low']:.3f}-{a['ci_high']:.3f})"
            + (
                f", lesion Dice {s['mean']['dice']['value']:.3f} (95 % CI {s['mean']['dice']['ci_low']:.3f}-"
                f"{s['mean']['dice']['ci_high']:.3f})"
                if s
                else ""
            )
        )
    truth = {r["study_id"]: int(r["label"]) for r in csv.DictReader(new_manifest.open())}
    rows = [r for r in csv.DictReader((reports / "summary.csv").open()) if r.get("probability") not in ("", None)]
    scored = [(float(r["probability"]), truth[Path(r["source"]).name]) for r in rows if Path(r["source"]).name in truth]
    if scored and len({label for _, label in scored}) == 2:
        ranked = [label for _, label in sorted(scored, key=lambda t: -t[0])]
        n_lesion = sum(ranked)
        auroc = roc_auc_score([label for _, label in scored], [p for p, _ in scored])
        lines.append(
            f"demo: {len(scored)} new studies: worklist AUROC {auroc:.3f}; the top {n_lesion} of the worklist hold "
            f"{sum(ranked[:n_lesion])} of the {n_lesion} lesion studies"
        )
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write("usage: python -m medhybrid.evaluate.demo_summary EVALUATION REPORTS NEW_MANIFEST\n")
        return 2
    for line in summary_lines(*(Path(a) for a in argv)):
        sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
