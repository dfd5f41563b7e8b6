"""The ``medhybrid`` command line: parse, call the library, map domain errors to exit code 1."""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from medhybrid import __version__
from medhybrid.errors import ConfigError, MedHybridError

logger = logging.getLogger("medhybrid")
stderr = Console(stderr=True)
stdout = Console()

app = typer.Typer(
    name="medhybrid",
    help="Anomaly detection in medical images: ingest, train, infer, report, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold patient data
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Ingest and check data: scan folders, manifests, synthetic cohorts.", no_args_is_help=True)
app.add_typer(data_app, name="data")

F = TypeVar("F", bound=Callable[..., Any])


def domain_errors(func: F) -> F:
    """Turn a MedHybridError into one clear line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MedHybridError as exc:
            stderr.print(f"[bold red]error[/]: {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def configure_logging(verbosity: int) -> None:
    """Configure the root handler once: WARNING by default, INFO with -v, DEBUG with -vv.

    Python warnings (pydicom on odd header values, MONAI, torch) become log records of ``py.warnings``:
    hidden by default, shown with -v.
    """
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_medhybrid", False):
            root.removeHandler(handler)
    handler = RichHandler(console=stderr, show_path=False, rich_tracebacks=False, markup=False)
    handler._medhybrid = True  # type: ignore[attr-defined]
    handler.setLevel(level)  # a module may lower its logger's level for a file log (infer.log); not the console
    if verbosity <= 1:
        # Third-party libraries (pydicom's validation chatter, decoder tracebacks) are heard only with -vv,
        # their warnings with -v: every failure that matters reaches the user as a typed error or a QC
        # reason instead.
        warnings_too = ("py.warnings",) if verbosity == 1 else ()
        handler.addFilter(lambda record: record.name.split(".")[0] == "medhybrid" or record.name in warnings_too)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn goes to the "py.warnings" logger, not straight to stderr


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr; yields ``advance(n=1, label=None)``."""
    columns = [
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1, label: str | None = None) -> None:
            bar.update(task, advance=n, description=f"{description} {label}" if label else description)

        yield advance


def _version(value: bool) -> None:
    if value:
        stdout.print(f"medhybrid {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")] = 0,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """medhybrid: ResNet-Transformer hybrids for anomaly detection in CT, MR and X-ray."""
    configure_logging(verbose)


# --- data ----------------------------------------------------------------------------------------


@data_app.command("scan")
@domain_errors
def data_scan(
    folder: Annotated[Path, typer.Argument(help="Folder (any depth) of DICOM and/or NIfTI/NRRD/MHA/PNG files.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
    headers_only: Annotated[
        bool,
        typer.Option("--headers-only", help="Check headers and geometry only; do not decode pixel data."),
    ] = False,
    spacing_tolerance: Annotated[
        float, typer.Option(help="Largest relative deviation of slice spacing before a series is rejected.")
    ] = 0.01,
    tilt_tolerance: Annotated[float, typer.Option(help="Largest accepted gantry tilt, degrees.")] = 0.5,
) -> None:
    """List every study and series with modality, shape, spacing and QC verdict, and every rejected file.

    One bad file never stops the scan; the exit code is 0 whenever the folder exists.
    """
    from medhybrid.io.geometry import IngestOptions
    from medhybrid.io.scan import scan_folder

    options = IngestOptions(spacing_tolerance=spacing_tolerance, tilt_tolerance_deg=tilt_tolerance)
    with progress_bar("scanning", None) as advance:
        report = scan_folder(folder, options=options, decode=not headers_only, on_step=lambda s: advance(1, s))
    if as_json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
        return
    _print_scan(report)


def _print_scan(report: Any) -> None:
    table = Table(title=f"Studies under {report.root}", show_lines=False)
    for col in ("study", "series", "modality", "shape", "spacing (mm)", "QC", "reasons"):
        table.add_column(col, overflow="fold")
    colours = {"ok": "green", "warn": "yellow", "reject": "red"}
    for key, series_list in report.studies.items():
        for s in series_list:
            verdict = s["qc"]["verdict"]
            reasons = "; ".join(r["message"] for r in s["qc"]["reasons"] if r["level"] != "ok")
            spacing = "x".join(f"{v:.3g}" for v in s["spacing"]) if s.get("spacing") else "-"
            table.add_row(
                key,
                str(s.get("description") or Path(s["source"]).name),
                s["modality"],
                "x".join(str(v) for v in s["shape"]),
                spacing,
                f"[{colours[verdict]}]{verdict}[/]",
                reasons,
            )
    stdout.print(table)
    if report.rejected:
        rejected = Table(title="Rejected files")
        rejected.add_column("file", overflow="fold")
        rejected.add_column("reason", overflow="fold")
        for p in report.rejected:
            rejected.add_row(str(p.path), f"{p.code}: {p.reason}")
        stdout.print(rejected)
    counts = report.counts()
    stdout.print(
        f"{counts['studies']} studies, {counts['series']} series "
        f"({counts['series_ok']} ok, {counts['series_warn']} warn, {counts['series_reject']} reject), "
        f"{counts['rejected_files']} rejected files, {counts['skipped_files']} skipped (not images)"
    )


@data_app.command("inspect")
@domain_errors
def data_inspect(
    path: Annotated[Path, typer.Argument(help="One study: a DICOM folder or file, or a NIfTI/NRRD/MHA/PNG file.")],
    modality: Annotated[list[str] | None, typer.Option(help="Accepted modality (repeatable).")] = None,
    min_slices: Annotated[int, typer.Option(help="Fewest slices a series must have.")] = 1,
    series_description: Annotated[str | None, typer.Option(help="Regex searched in SeriesDescription.")] = None,
    largest: Annotated[bool, typer.Option(help="Among several matching series take the largest.")] = False,
    save: Annotated[Path | None, typer.Option(help="Write the loaded volume as NIfTI (.nii.gz).")] = None,
) -> None:
    """Load one study with the series selection rules and print its summary (JSON)."""
    from medhybrid.io.scan import load_study
    from medhybrid.io.select import SelectionRules

    rules = SelectionRules(
        modalities=tuple(modality or ()),
        min_slices=min_slices,
        description=series_description,
        largest=largest,
    )
    study = load_study(path, rules)
    if save is not None:
        from medhybrid.io.writers import save_nifti

        save_nifti(study.array, study.affine, save)
    sys.stdout.write(json.dumps(study.summary(), indent=2) + "\n")


@data_app.command("synth")
@domain_errors
def data_synth(
    out: Annotated[Path, typer.Argument(help="Output folder of the synthetic cohort.")],
    n: Annotated[int, typer.Option("--n", help="Number of studies.")] = 16,
    dims: Annotated[int, typer.Option("--dims", help="2 (single slices) or 3 (volumes).")] = 3,
    fmt: Annotated[str, typer.Option("--format", help="dicom, nifti or both.")] = "both",
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives identical files.")] = 0,
) -> None:
    """Write a deterministic synthetic cohort of body-like phantoms (HU), some with lesions and exact masks."""
    from medhybrid.data.synth import synthesize_cohort

    with progress_bar("synthesizing", n) as advance:
        manifest = synthesize_cohort(out, n=n, dims=dims, fmt=fmt, seed=seed, progress=advance)
    stdout.print(f"wrote {n} studies; manifest: {manifest}")


@data_app.command("validate")
@domain_errors
def data_validate(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV (see docs/manifests.md).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    no_geometry: Annotated[bool, typer.Option("--no-geometry", help="Skip mask-vs-image geometry checks.")] = False,
) -> None:
    """Check a manifest: files exist, labels consistent, masks match their images, splits do not leak.

    Exit code 1 if any error is found.
    """
    from medhybrid.io.manifest_validate import validate_manifest

    report = validate_manifest(manifest, check_geometry=not no_geometry)
    if as_json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        shown = 20  # the rest are usually the same problem again; --json lists all
        for level, problems in (("[yellow]warning[/]", report.warnings), ("[red]error[/]", report.errors)):
            for problem in problems[:shown]:
                stderr.print(f"{level}: {problem}", highlight=False, markup=True)
            if len(problems) > shown:
                stderr.print(f"{level}: ... and {len(problems) - shown} more (use --json for all)")
        summary = report.as_dict()
        stdout.print(
            f"{manifest}: {len(report.errors)} errors, {len(report.warnings)} warnings; "
            f"splits {summary.get('split_counts', {})}, labels {summary.get('label_counts', {})}",
            highlight=False,
        )
    if not report.ok:
        raise typer.Exit(1)


@data_app.command("import-medmnist")
@domain_errors
def data_import_medmnist(
    npz: Annotated[Path, typer.Argument(help="A MedMNIST .npz archive.")],
    out: Annotated[Path, typer.Argument(help="Output folder (images + manifest.csv).")],
) -> None:
    """Write every sample of every split as PNG (2D) or NIfTI (3D), and a manifest."""
    from medhybrid.data.importers import import_medmnist
    from medhybrid.io.readers import read_medmnist

    total = sum(len(labels) for _, labels in read_medmnist(npz).values())
    with progress_bar("importing", total) as advance:
        manifest = import_medmnist(npz, out, progress=advance)
    stdout.print(f"manifest: {manifest}")


@data_app.command("import-msd")
@domain_errors
def data_import_msd(
    dataset_dir: Annotated[Path, typer.Argument(help="A Medical Segmentation Decathlon task folder (dataset.json).")],
    out: Annotated[Path, typer.Argument(help="Output folder for manifest.csv.")],
    val_fraction: Annotated[float, typer.Option(help="Share of cases in the validation split.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the deterministic split.")] = 0,
    mask_kind: Annotated[
        str, typer.Option(help="What the labels are: lesion (abnormalities) or anatomy (normal structures).")
    ] = "lesion",
) -> None:
    """Write a manifest for an MSD task with a deterministic train/val split (files are not copied)."""
    from medhybrid.data.importers import import_msd

    manifest = import_msd(dataset_dir, out, val_fraction=val_fraction, seed=seed, mask_kind=mask_kind)
    stdout.print(f"manifest: {manifest}")


# --- models --------------------------------------------------------------------------------------


def _parse_input_size(first: str | None, extra: list[str]) -> tuple[int, ...] | None:
    """``--input-size 1 64 64 64`` (click hands us the first value, the rest arrive as extra args) or ``1,64,64,64``."""
    if first is None:
        if extra:
            raise ConfigError(f"unexpected arguments: {' '.join(extra)}")
        return None
    parts = [p for token in [first, *extra] for p in token.replace("x", ",").split(",") if p]
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"--input-size takes integers, got {' '.join([first, *extra])}", fix="e.g. --input-size 1 64 64 64"
        ) from None
    if len(size) not in (3, 4) or min(size) < 1:
        raise ConfigError(f"--input-size must be C H W or C D H W, got {size}", fix="e.g. --input-size 1 64 64 64")
    return size


@app.command("models", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@domain_errors
def models_cmd(
    ctx: typer.Context,
    input_size: Annotated[
        str | None,
        typer.Option(
            "--input-size",
            help="C D H W (3D) or C H W (2D); GFLOPs are counted for this input. "
            "Default: 1x64x64x64 for 3D models, 1x128x128 for 2D.",
        ),
    ] = None,
    family: Annotated[str | None, typer.Option("--family", help="Only this family (hybrid, resnet, ...).")] = None,
    task: Annotated[str | None, typer.Option("--task", help="Only models that do this task.")] = None,
    tiny: Annotated[bool, typer.Option("--tiny/--no-tiny", help="Include the test-sized variants.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Every registered model: family, spatial dims, tasks, parameters and GFLOPs for an input size."""
    from medhybrid.models import FAMILIES, TASKS, list_models
    from medhybrid.models.profile import summarize
    from medhybrid.runtime import configure_threads

    if family is not None and family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r}", fix=f"use one of {', '.join(FAMILIES)}")
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}", fix=f"use one of {', '.join(TASKS)}")
    configure_threads()
    size = _parse_input_size(input_size, list(ctx.args))
    dims = len(size) - 1 if size else None
    names = list_models(family=family, task=task, spatial_dims=dims, include_tiny=tiny)
    rows = []
    with progress_bar("counting FLOPs", len(names)) as advance:
        for name in names:
            rows.append(summarize(name, size))
            advance(label=name)
    if as_json:
        stdout.print_json(json.dumps([r.to_dict() for r in rows]))
        return
    table = Table("model", "family", "dims", "tasks", "params (M)", "input", "GFLOPs", "tokens")
    table.columns[0].no_wrap = True
    for r in rows:
        table.add_row(
            r.name,
            r.family,
            f"{r.spatial_dims}D",
            "+".join(t[:3] for t in r.tasks),
            f"{r.params_m:.2f}",
            "x".join(map(str, r.input_size or ())),
            f"{r.gflops:.2f}" if r.gflops is not None else "-",
            f"{'x'.join(map(str, r.token_grid))} = {math.prod(r.token_grid)}" if r.token_grid else "-",
        )
    stdout.print(table, width=max(stdout.width, 100))


@app.command("train")
@domain_errors
def train_cmd(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML (see pipelines/ and docs/training.md).")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key, e.g. --set train.batch_size=16 (repeatable).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run folder (default: runs/<pipeline name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last.pt.")] = False,
    folds: Annotated[
        int | None,
        typer.Option(
            "--folds",
            min=3,
            help="K-fold cross-validation: K fold models (each selects on its own inner fold), a pooled "
            "out-of-fold report with CIs in RUN/cv, and RUN as an ensemble for infer.",
        ),
    ] = None,
) -> None:
    """Train a model from a pipeline: validation every epoch, best.pt/last.pt, metrics, curves (torchrun-ready)."""
    from medhybrid.config import load_pipeline
    from medhybrid.train import train
    from medhybrid.train.distributed import from_env

    cfg = load_pipeline(pipeline, overrides)
    run_dir = out if out is not None else Path("runs") / cfg.name
    main_rank = from_env().is_main

    def show(record: dict[str, Any]) -> None:
        vals = " ".join(f"{k[4:]} {v:.4f}" for k, v in record.items() if k.startswith("val_") and isinstance(v, float))
        mark = " (best)" if record["best"] else ""
        stderr.print(
            f"epoch {record['epoch']:>3} {record['stage']}: train loss {record['train_loss']:.4f} | val {vals} "
            f"| {record['epoch_seconds']:.1f}s{mark}",
            highlight=False,
            markup=False,
        )

    if folds is not None:
        from medhybrid.train.folds import train_folds

        cv = train_folds(
            cfg,
            run_dir,
            folds,
            resume=resume,
            on_epoch=show,
            on_event=lambda msg: stderr.print(msg, highlight=False, markup=False),
        )
        if main_rank and cv.metrics:
            for line in cv_lines(cv.metrics):
                stdout.print(line, highlight=False, soft_wrap=True)
            stdout.print(f"out-of-fold report: {(run_dir / 'cv' / 'report.html').resolve()}", highlight=False)
            stdout.print(
                f"the {folds} fold models as one ensemble: medhybrid infer INPUT --model {run_dir}", highlight=False
            )
        return
    result = train(cfg, run_dir, resume=resume, on_epoch=show)
    if main_rank:
        best = f"{result.best_value:.4f}" if result.best_value is not None else "n/a"
        stdout.print(
            f"{result.status}: {len(result.history)} epochs; best {cfg.eval.select} {best} "
            f"at epoch {result.best_epoch} (on the selection split {cfg.data.val_split!r}: optimistic; "
            f"use --folds or evaluate on a held-out split); run folder {run_dir}",
            highlight=False,
        )


def cv_lines(m: dict[str, Any]) -> list[str]:
    """The pooled out-of-fold figures of a cross-validation run, one line each."""
    lines = [f"{m['folds']} folds, {m['n_studies']} out-of-fold studies ({m['n_failed']} failed)"]
    c = m.get("classification")
    if c:
        a, op = c["auroc"], c["at_operating_point"]
        per_fold = ", ".join("n/a" if v is None else f"{v:.3f}" for v in c["auroc_per_fold"])
        lines.append(
            f"out-of-fold AUROC {a['value']:.4f} (95 % CI {a['ci_low']:.4f}-{a['ci_high']:.4f}); per fold {per_fold}; "
            f"at each fold's threshold: sensitivity {op['sensitivity']:.3f}, specificity {op['specificity']:.3f}"
        )
    s = m.get("segmentation")
    if s:
        d, h = s["mean"]["dice"], s["mean"]["hd95"]
        lines.append(
            f"out-of-fold Dice {d['value']:.4f} ({d['ci_low']:.4f}-{d['ci_high']:.4f}), HD95 {h['value']:.2f} mm"
        )
    return lines


@app.command("infer")
@domain_errors
def infer_cmd(
    input_path: Annotated[
        Path,
        typer.Argument(
            metavar="INPUT", help="A folder of studies (DICOM and/or NIfTI, any depth), one study, or a manifest CSV."
        ),
    ],
    model: Annotated[Path, typer.Option("--model", "-m", help="Run folder (its best.pt) or a checkpoint file.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder: one sub-folder per study, index.html, summary.csv.")
    ],
    tta: Annotated[bool, typer.Option("--tta", help="Average over flips along each axis (slower, steadier).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo studies that already have a report.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Assess studies outside the model's scope (other modality, dimensions, spacing, field of view) "
            "instead of reporting them NOT ASSESSED; each report says it was forced.",
        ),
    ] = False,
    include_phi: Annotated[
        bool, typer.Option("--include-phi", help="Put PatientName/ID/BirthDate in reports and DICOM outputs.")
    ] = False,
    threshold: Annotated[
        float | None, typer.Option(help="Decision threshold (default: the operating point stored in the checkpoint).")
    ] = None,
    modality: Annotated[list[str] | None, typer.Option(help="Accepted modality (repeatable).")] = None,
    min_slices: Annotated[int, typer.Option(help="Fewest slices a series must have.")] = 1,
    series_description: Annotated[str | None, typer.Option(help="Regex searched in SeriesDescription.")] = None,
    largest: Annotated[bool, typer.Option(help="Among several matching series take the largest.")] = False,
    no_dicom_outputs: Annotated[
        bool, typer.Option("--no-dicom-outputs", help="Skip DICOM SEG/SR for DICOM input.")
    ] = False,
) -> None:
    """Infer every study and write, per study, report.json/html, mask, saliency and DICOM SEG/SR; then the worklist."""
    from medhybrid.infer.batch import InferOptions, run_inference
    from medhybrid.io.select import SelectionRules
    from medhybrid.runtime import configure_threads

    configure_threads()
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {threshold}", fix="pass a probability, e.g. 0.5")
    options = InferOptions(
        tta=tta,
        device=device,
        overwrite=overwrite,
        force=force,
        include_phi=include_phi,
        threshold=threshold,
        rules=SelectionRules(
            modalities=tuple(modality or ()), min_slices=min_slices, description=series_description, largest=largest
        ),
        dicom_outputs=not no_dicom_outputs,
    )

    def show(row: dict[str, Any]) -> None:
        if row["status"] == "failed":
            text = f"{row['study_key']}: FAILED ({row['error']}) {row['reason']}"
        else:
            score = row.get("probability")
            if row["status"] == "not_assessed":
                verdict = f"NOT ASSESSED ({row['reason']})"
            elif score not in ("", None):
                verdict = f"p={float(score):.3f} {row['decision']}"
            else:
                verdict = "no verdict (anatomy)"
            text = f"{row['study_key']}: {verdict}"
            text += " (already done)" if row["status"] == "skipped" else ""
        stderr.print(text, highlight=False, markup=False, soft_wrap=True)

    result = run_inference(input_path, model, out, options, on_study=show)
    not_assessed = sum(r.get("status") == "not_assessed" for r in result.done)
    stdout.print(
        f"{len(result.done)} studies reported ({len(result.skipped)} already done"
        + (f", {not_assessed} NOT ASSESSED: outside the model's scope" if not_assessed else "")
        + f"), {len(result.failed)} failed in {result.seconds:.1f} s",
        highlight=False,
    )
    stdout.print(f"worklist: {result.index.resolve()}", highlight=False, soft_wrap=True)
    if result.failed and not result.done:
        raise typer.Exit(1)


@app.command("evaluate")
@domain_errors
def evaluate_cmd(
    model: Annotated[Path, typer.Option("--model", "-m", help="Run folder (its best.pt) or a checkpoint file.")],
    manifest: Annotated[Path, typer.Option("--manifest", help="Manifest CSV with labels and/or masks.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for metrics.json, predictions.csv, report.html.")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    calibration_split: Annotated[
        str, typer.Option(help="Split the temperature and operating point are fitted on.")
    ] = "val",
    operating_point: Annotated[
        str | None,
        typer.Option(help="youden, sensitivity=0.9 or a probability (default: the pipeline's eval.operating_point)."),
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap replicates for the 95 % CIs.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap and of the cross-fit halves.")] = 0,
    tta: Annotated[bool, typer.Option("--tta", help="Average over flips along each axis.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    no_saliency: Annotated[bool, typer.Option("--no-saliency", help="Skip saliency maps and faithfulness.")] = False,
    max_faithfulness: Annotated[int, typer.Option(help="Most studies given a deletion curve.")] = 200,
    no_store_calibration: Annotated[
        bool,
        typer.Option(
            "--no-store-calibration",
            help="Do not store the fitted temperature and threshold (sidecar beside the checkpoint).",
        ),
    ] = False,
    nsd_tolerance: Annotated[float, typer.Option(help="NSD tolerance in mm.")] = 1.0,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N studies of each split.")] = None,
    shift_suite: Annotated[
        bool,
        typer.Option(
            "--shift-suite",
            help="Also evaluate under each acquisition shift (contrast, gamma, blur, noise, resolution; "
            "docs/evaluation.md) and report the AUROC drop with paired CIs (OUT/shift/shift.json).",
        ),
    ] = False,
) -> None:
    """Metrics with 95 % CIs (AUROC, rates at the operating point, ECE, Dice/HD95/NSD), saliency faithfulness,
    temperature scaling stored in the checkpoint; predictions.csv, metrics.json and report.html."""
    from medhybrid.evaluate.runner import EvaluateOptions, evaluate
    from medhybrid.runtime import configure_threads

    configure_threads()
    options = EvaluateOptions(
        split=split,
        calibration_split=calibration_split,
        operating_point=operating_point,
        n_boot=bootstrap,
        seed=seed,
        device=device,
        tta=tta,
        saliency=not no_saliency,
        max_faithfulness=max_faithfulness,
        store_calibration=not no_store_calibration,
        nsd_tolerance_mm=nsd_tolerance,
        limit=limit,
    )
    with progress_bar("evaluating", None) as advance:
        result = evaluate(model, manifest, out, options, on_study=lambda r: advance(1, r.study_id))
    m = result.metrics
    lines = [f"{m['n_studies']} studies of split {split!r}, {m['n_failed']} failed"]
    c = m.get("classification")
    if c:
        a, op = c["auroc"], c["at_operating_point"]
        text = (
            f"AUROC {a['value']:.4f} (95 % CI {a['ci_low']:.4f}-{a['ci_high']:.4f}); at threshold "
            f"{op['threshold']:.3f}: sensitivity {op['sensitivity']:.3f}, specificity {op['specificity']:.3f}, "
            f"F1 {op['f1']:.3f}"
        )
        if c.get("calibration"):
            before, after = c["calibration"]["before"]["ece"], c["calibration"]["after"]["ece"]
            text += f"; ECE {before:.4f} -> {after:.4f} (T = {c['temperature']:.3f})"
        lines.append(text)
    s = m.get("segmentation")
    if s:
        d, h, n = (s["mean"][k] for k in ("dice", "hd95", "nsd"))
        lines.append(
            f"Dice {d['value']:.4f} ({d['ci_low']:.4f}-{d['ci_high']:.4f}), HD95 {h['value']:.2f} mm, "
            f"NSD {n['value']:.4f}"
        )
    for method, f in (m.get("faithfulness") or {}).items():
        if isinstance(f, dict) and "faithfulness" in f:
            lines.append(f"faithfulness {method}: {f['faithfulness']['value']:+.4f} (deletion AUC vs random)")
    if (m.get("classification") or {}).get("temperature_rejected"):
        lines.append(f"warning: {m['classification']['temperature_rejected']}")
    if m.get("calibration_stored_in"):
        lines.append(f"temperature and operating point stored in {m['calibration_stored_in']}")
    if m.get("calibration_not_refitted"):
        lines.append(f"note: {m['calibration_not_refitted']}; the stored temperature and threshold were used")
    if (m.get("splits") or {}).get("warning"):
        lines.append(f"warning: {m['splits']['warning']}")
    lines.append(f"report: {(Path(out) / 'report.html').resolve()}")
    if shift_suite:
        from medhybrid.evaluate.shift import run_shift_suite

        with progress_bar("acquisition shifts", None) as advance:
            suite = run_shift_suite(
                model, manifest, Path(out) / "shift", options, on_study=lambda r: advance(1), clean=result
            )
        for name, r in suite["shifts"].items():
            lines.append(
                f"shift {name}: AUROC {r['auroc']:.4f}, drop {r['drop']:+.4f} "
                f"(95 % CI {r['drop_ci_low']:+.4f} to {r['drop_ci_high']:+.4f})"
            )
        lines.append(f"largest AUROC drop under shift: {suite['max_drop']:+.4f} (clean {suite['clean']['auroc']:.4f})")
    for line in lines:
        stdout.print(line, highlight=False, soft_wrap=True)
    if m["n_failed"] == m["n_studies"]:
        raise typer.Exit(1)


@app.command("compare")
@domain_errors
def compare_cmd(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML: the data, budget and seeds every model shares.")],
    models: Annotated[
        str, typer.Option(help="Registry names or LABEL=NAME, comma-separated; the first is the reference.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for runs, evaluations and the table.")],
    seeds: Annotated[int, typer.Option(min=1, help="Training seeds per model.")] = 1,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs per run (default: the pipeline's total).")] = None,
    model_args: Annotated[
        list[str] | None,
        typer.Option(
            "--model-args", help="NAME={yaml mapping}: constructor arguments of a model or label (repeatable)."
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="Split the models are reported on (default: test if the manifest has one, else val held out: "
            "the runs then select on a fifth of train). Never the split the runs select on."
        ),
    ] = None,
    folds: Annotated[
        int | None,
        typer.Option("--folds", min=3, help="Report pooled out-of-fold predictions of K-fold cross-validation runs."),
    ] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Pipeline override for every run.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap replicates.")] = 2000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Train and evaluate several models under the same data, budget and seeds; write compare.md/csv/json/png."""
    from medhybrid.evaluate.compare import CompareOptions, compare, parse_model_args
    from medhybrid.evaluate.compare_table import markdown_table
    from medhybrid.runtime import configure_threads

    configure_threads()
    options = CompareOptions(
        models=[m.strip() for m in models.split(",") if m.strip()],
        seeds=seeds,
        epochs=epochs,
        model_args=parse_model_args(model_args or []),
        split=split,
        folds=folds,
        overrides=list(overrides or []),
        n_boot=bootstrap,
        device=device,
    )
    result = compare(pipeline, out, options, on_event=lambda msg: stderr.print(msg, highlight=False, markup=False))
    stdout.print(markdown_table(result), highlight=False, markup=False, soft_wrap=True)
    stdout.print(f"table: {(Path(out) / 'compare.md').resolve()}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
