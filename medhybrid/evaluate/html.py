"""``report.html`` of ``medhybrid evaluate``: the numbers of ``metrics.json`` with their plots (matplotlib,
embedded as PNG, so the page is one self-contained file)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from matplotlib.axes import Axes

from medhybrid.infer.render import _e, _page, _table, data_uri
from medhybrid.plotting import PngFigure


def _figure(draw: Callable[[Axes], None], size: tuple[float, float] = (4.2, 3.6)) -> str:
    with PngFigure(figsize=size, dpi=110) as f:
        draw(f.axes)
        f.axes.grid(alpha=0.3)
        png = f.png()
    return f'<img alt="plot" src="{data_uri(png)}">'


def _ci(entry: dict[str, Any] | None, digits: int = 3) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    lo, hi = entry.get("ci_low"), entry.get("ci_high")
    ci = f" ({lo:.{digits}f}-{hi:.{digits}f})" if lo is not None and hi is not None else ""
    return f"{entry['value']:.{digits}f}{ci}"


def _num(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _classification(c: dict[str, Any]) -> str:
    op = c.get("at_operating_point", {})
    rows = [
        ("Studies", c["n"]),
        ("AUROC (95 % CI)", _ci(c.get("auroc"))),
        ("Average precision", _num(c.get("average_precision"))),
        ("Protocol", c.get("protocol")),
        ("Score", c.get("score")),
        ("AUROC, AP, curves on", c.get("rank_metrics_on")),
        ("Temperature", _num(c.get("temperature"))),
        ("Threshold (mean over folds)", _num(op.get("threshold"))),
    ]
    rows += [
        (k.upper() if len(k) == 3 else k.capitalize(), _num(op.get(k)))
        for k in ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")
    ]
    rows += [("TP / FP / TN / FN", f"{op.get('tp')} / {op.get('fp')} / {op.get('tn')} / {op.get('fn')}")]
    cal = c.get("calibration", {})
    rows += [("ECE raw -> calibrated", f"{_num(cal['before']['ece'])} -> {_num(cal['after']['ece'])}")] if cal else []
    plots = []
    if "roc_curve" in c:

        def roc(ax: Axes) -> None:
            r = c["roc_curve"]
            ax.plot(r["x"], r["y"], label=f"AUROC {_ci(c['auroc'])}")
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            if op.get("sensitivity") is not None and op.get("specificity") is not None:
                ax.plot([1 - op["specificity"]], [op["sensitivity"]], "o", label="operating point")
            ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
            ax.legend(fontsize=7, loc="lower right")

        def pr(ax: Axes) -> None:
            r = c["pr_curve"]
            ax.plot(r["x"], r["y"], label=f"AP {_num(c.get('average_precision'))}")
            ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall", ylim=(0, 1.02))
            ax.legend(fontsize=7, loc="lower left")

        plots += [_figure(roc), _figure(pr)]
    if cal:

        def reliability(ax: Axes) -> None:
            for key, style in (("before", "s--"), ("after", "o-")):
                b = cal[key]
                pts = [(x, y) for x, y in zip(b["confidence"], b["accuracy"], strict=True) if x is not None]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    name = "raw" if key == "before" else "calibrated"
                    ax.plot(xs, ys, style, ms=4, label=f"{name} ECE {b['ece']:.3f}")
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set(xlabel="confidence", ylabel="accuracy", title="Reliability", xlim=(0, 1), ylim=(0, 1.02))
            ax.legend(fontsize=7, loc="upper left")

        plots.append(_figure(reliability))
    return "<h2>Classification</h2>" + _table(rows) + "".join(plots)


def _segmentation(s: dict[str, Any]) -> str:
    head = "<tr><th>class</th><th>Dice</th><th>HD95 (mm)</th><th>NSD</th><th>n</th></tr>"
    body = ""
    for name, m in [*s["per_class"].items(), ("mean over classes", s["mean"])]:
        body += (
            f"<tr><td>{_e(name)}</td><td>{_ci(m['dice'])}</td><td>{_ci(m['hd95'], 2)}</td>"
            f"<td>{_ci(m['nsd'])}</td><td>{m['dice'].get('n')}</td></tr>"
        )
    names = list(s["per_class"])

    def bars(ax: Axes) -> None:
        for i, metric in enumerate(("dice", "nsd")):
            vals = [s["per_class"][n][metric] for n in names]
            xs = [j + i * 0.38 for j in range(len(names))]
            err = [[v["value"] - v["ci_low"] for v in vals], [v["ci_high"] - v["value"] for v in vals]]
            ax.bar(xs, [v["value"] for v in vals], width=0.36, yerr=err, capsize=3, label=metric)
        ax.set_xticks([j + 0.19 for j in range(len(names))], names, fontsize=7)
        ax.set(ylim=(0, 1.05), title="Mean with 95 % CI")
        ax.legend(fontsize=7)

    rule = (
        f"<p>Empty-mask rule: {_e(s.get('empty_mask_rule'))}; NSD tolerance {s.get('nsd_tolerance_mm')} mm; "
        f"{s.get('n_both_empty', 0)} (study, class) pairs empty on both sides.</p>"
    )
    return f"<h2>Segmentation</h2><table>{head}{body}</table>{rule}{_figure(bars)}"


def _faithfulness(f: dict[str, Any]) -> str:
    methods = [m for m in f if isinstance(f[m], dict) and "mean_curve" in f[m]]
    rows = [(m, f"deletion AUC {_ci(f[m]['auc'])}; faithfulness {_ci(f[m].get('faithfulness'))}") for m in methods]

    def curves(ax: Axes) -> None:
        for m in methods:
            ys = f[m]["mean_curve"]
            xs = [i / (len(ys) - 1) for i in range(len(ys))]
            ax.plot(xs, ys, "k--" if m == "random" else "-", label=m)
        ax.set(xlabel="fraction of voxels removed", ylabel="P(abnormal) / intact", title="Deletion curves")
        ax.legend(fontsize=7)

    intro = (
        f"<p>{f['n']} studies ({_e(f.get('selection'))}). Faithfulness = AUC(random) - AUC(map): above 0, "
        "removing the salient voxels lowers the score faster than removing random ones.</p>"
    )
    return "<h2>Saliency faithfulness</h2>" + intro + _table(rows) + _figure(curves)


def _splits_text(splits: dict[str, Any]) -> str:
    return (
        f"evaluated on {splits.get('evaluated')}; temperature and threshold fitted on {splits.get('calibration')}; "
        f"model trained on {splits.get('training')}, epoch selected on {splits.get('selection')}"
    )


def evaluation_html(result: dict[str, Any]) -> bytes:
    """The page for one ``metrics.json`` dict."""
    model = result["model"]
    parts = [
        f"<h1>Evaluation: {_e(model['name'])} on {_e(result['split'])}</h1>",
        _table(
            [
                ("Model", f"{model['name']} ({model['task']})"),
                ("Checkpoint", model["checkpoint"]),
                ("Weights SHA-256", model["weights_sha256"]),
                ("Manifest", result["manifest"]),
                ("Studies", f"{result['n_studies']} ({result['n_failed']} failed)"),
                ("Splits", _splits_text(result.get("splits") or {})),
                (
                    "Bootstrap",
                    f"{result['bootstrap']['n_boot']} replicates, seed {result['bootstrap']['seed']}, "
                    f"{result['bootstrap'].get('method', 'BCa')} 95 % CI, resampling "
                    f"{result['bootstrap'].get('resampling', 'studies')} (stratified by class for AUROC)",
                ),
                ("medhybrid", result["medhybrid_version"]),
            ]
        ),
    ]
    warning = (result.get("splits") or {}).get("warning")
    if warning:
        parts.append(f'<div class="banner">{_e(warning)}</div>')
    if "classification" in result:
        parts.append(_classification(result["classification"]))
    if "segmentation" in result:
        parts.append(_segmentation(result["segmentation"]))
    if "faithfulness" in result:
        parts.append(_faithfulness(result["faithfulness"]))
    if result["failed"]:
        parts.append("<h2>Failed studies</h2>" + _table([(f["study_id"], f["error"]) for f in result["failed"]]))
    return _page(f"evaluation {model['name']}", "".join(parts))
