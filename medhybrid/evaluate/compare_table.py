"""The tables and the plot of ``medhybrid compare`` (``compare.md``, ``compare.csv``, ``compare.png``) from
its result dict."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from typing import Any


def _fmt_ci(e: dict[str, Any] | None, d: int = 3) -> str:
    if not e or e.get("value") is None or not math.isfinite(e["value"]):
        return "n/a"
    sd = f" ±{e['seed_sd']:.{d}f}" if len(e.get("seeds", [])) > 1 else ""
    return f"{e['value']:.{d}f} ({e['ci_low']:.{d}f}-{e['ci_high']:.{d}f}){sd}"


def _columns(result: dict[str, Any]) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
    def f(key: str, d: int = 3) -> Callable[[dict[str, Any]], str]:
        return lambda r: "n/a" if r.get(key) is None else f"{r[key]:.{d}f}"

    def delta(r: dict[str, Any]) -> str:
        e = r.get("delta_vs_first")
        if not e:
            return "(reference)"
        return f"{e['value']:+.3f} ({e['ci_low']:+.3f} to {e['ci_high']:+.3f})"

    if result["task"] == "classification":
        metric = [
            ("AUROC (95 % CI) ±seed sd", lambda r: _fmt_ci(r["auroc"])),
            ("ΔAUROC vs " + result["reference"], delta),
            ("accuracy", f("accuracy")),
            ("F1", f("f1")),
            ("sens.", f("sensitivity")),
            ("spec.", f("specificity")),
        ]
    else:
        metric = [
            ("Dice (95 % CI) ±seed sd", lambda r: _fmt_ci(r["dice"])),
            ("ΔDice vs " + result["reference"], delta),
            ("HD95 mm", lambda r: _fmt_ci(r["hd95"], 2)),
            ("NSD", lambda r: _fmt_ci(r["nsd"])),
        ]
    return [
        ("model", lambda r: f"`{r['model']}`"),
        *metric,
        ("params (M)", lambda r: f"{r['params'] / 1e6:.2f}"),
        ("GFLOPs", lambda r: "n/a" if r.get("gflops") is None else f"{r['gflops']:.3g}"),
        ("latency ms", f("latency_ms", 1)),
        ("train min", lambda r: "n/a" if r["train_seconds"] is None else f"{r['train_seconds'] / 60:.1f}"),
        ("s/study", f("seconds_per_study", 3)),
    ]


def markdown_table(result: dict[str, Any]) -> str:
    cols = _columns(result)
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fn(r) for _, fn in cols) + " |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def csv_table(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = _columns(result)
    w.writerow([c for c, _ in cols])
    for r in result["rows"]:
        w.writerow([fn(r).strip("`") for _, fn in cols])
    return buf.getvalue()


def plot(result: dict[str, Any]) -> bytes:
    """Task metric with its CI per model, and the metric against training time."""
    from medhybrid.plotting import PngFigure

    key = "auroc" if result["task"] == "classification" else "dice"
    rows = result["rows"]
    with PngFigure(1, 2, figsize=(9, 3.6), dpi=110) as f:
        a1, a2 = f.axes
        vals = [r[key]["value"] for r in rows]
        err = [[r[key]["value"] - r[key]["ci_low"] for r in rows], [r[key]["ci_high"] - r[key]["value"] for r in rows]]
        a1.bar(range(len(rows)), vals, yerr=err, capsize=4, color="#4c72b0")
        a1.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=20, ha="right", fontsize=7)
        lo = min(r[key]["ci_low"] for r in rows)
        a1.set(ylim=(max(0.0, lo - 0.05), 1.0), ylabel=key, title=f"{key} on {result['split']} (95 % CI)")
        for r in rows:
            a2.scatter([(r["train_seconds"] or 0) / 60], [r[key]["value"]])
            a2.annotate(r["model"], ((r["train_seconds"] or 0) / 60, r[key]["value"]), fontsize=7)
        a2.set(xlabel="training minutes", ylabel=key, title="metric vs training time")
        for ax in (a1, a2):
            ax.grid(alpha=0.3)
        return f.png()
