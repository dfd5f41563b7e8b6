"""Inference latency of every registered (non-tiny) model on this CPU, against an fp32 matmul peak.

Inputs: 3D models one 1x64^3 volume (batch 1), 2D models a batch of 32 1x128^2 images. Each model runs in
eager PyTorch (``inference_mode``); the default 3D segmentation hybrid and MONAI's UNETR also run
compiled (``torch.compile`` with Inductor freezing) and through ONNX Runtime, and each is scored in its
fastest mode. ``achieved GFLOP/s`` = forward FLOPs (torch's flop counter: convolutions and matmuls, a
multiply-add = 2) / median latency; ``peak fraction`` divides that by the best fp32 ``torch.mm``
throughput measured in the same run (1024-3072 square matrices).

The last line printed (with ``--json``) is one JSON object with ``matmul_peak_gflops``,
``hybrid_seg3d_ms``, ``unetr_ms``, ``latency_ratio_vs_unetr`` and ``hybrid_seg3d_peak_fraction``.

Usage: python benchmarks/models.py [--json] [--repeats 5] [--only NAME ...] [--no-compile] [--no-onnx]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from medhybrid.models import create_model, get_entry, list_models
from medhybrid.models.export import export_onnx, onnx_session
from medhybrid.models.profile import forward_gflops
from medhybrid.runtime import compile_for_inference, configure_threads, seed_everything

HYBRID_SEG3D = "hybrid_r18_3d"
UNETR = "unetr_3d"
INPUTS = {3: (1, 1, 64, 64, 64), 2: (32, 1, 128, 128)}


def median_ms(fn: Callable[[], object], repeats: int, budget_s: float = 20.0) -> float:
    """Median wall time of ``fn`` after one warm-up call; stops early (>= 3 runs) past ``budget_s``."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 5) -> dict[int, float]:
    """fp32 ``torch.mm`` GFLOP/s per square size (median of ``repeats``)."""
    out = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        ms = median_ms(lambda a=a, b=b: torch.mm(a, b), repeats)
        out[n] = 2 * n**3 / (ms / 1e3) / 1e9
    return out


def run_modes(
    model: torch.nn.Module, name: str, x: torch.Tensor, repeats: int, modes: list[str]
) -> dict[str, dict[str, float]]:
    """Latency of one model in each requested mode; returns ``{mode: {"ms": .., "setup_s": ..}}``."""
    model.eval()
    results: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        results["eager"] = {"ms": median_ms(lambda: model(x), repeats), "setup_s": 0.0}
    if "compile" in modes:
        t = time.perf_counter()
        compiled = compile_for_inference(model)
        with torch.no_grad():
            compiled(x)  # compiles
            setup = time.perf_counter() - t
            results["compile"] = {"ms": median_ms(lambda: compiled(x), repeats), "setup_s": setup}
    if "onnx" in modes:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            path = export_onnx(model, x, Path(tmp) / f"{name}.onnx")
            session = onnx_session(path)
            setup = time.perf_counter() - t
            feed = {"x": x.numpy()}
            results["onnx"] = {"ms": median_ms(lambda: session.run(None, feed), repeats), "setup_s": setup}  # type: ignore[attr-defined]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="benchmark only these models (the pair is always run)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile for the pair")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime for the pair")
    args = parser.parse_args()

    threads = configure_threads()
    peaks = matmul_peak()
    peak = max(peaks.values())
    log = sys.stderr
    print(f"threads {threads}; fp32 matmul GFLOP/s " + ", ".join(f"{n}: {g:.0f}" for n, g in peaks.items()), file=log)

    pair_modes = [m for m, off in (("compile", args.no_compile), ("onnx", args.no_onnx)) if not off]
    names = args.only or list_models(include_tiny=False)
    names = sorted(set(names) | {HYBRID_SEG3D, UNETR})
    rows: dict[str, dict[str, object]] = {}
    for name in names:
        dims = get_entry(name).spatial_dims
        x = torch.randn(*INPUTS[dims])
        seed_everything(0)
        model = create_model(name)
        gflops = forward_gflops(model, x)
        modes = run_modes(model, name, x, args.repeats, pair_modes if name in (HYBRID_SEG3D, UNETR) else [])
        best_mode = min(modes, key=lambda m: modes[m]["ms"])
        ms = modes[best_mode]["ms"]
        rows[name] = {
            "family": get_entry(name).family,
            "input": "x".join(map(str, x.shape)),
            "gflops": round(gflops, 2),
            "ms": round(ms, 1),
            "mode": best_mode,
            "eager_ms": round(modes["eager"]["ms"], 1),
            "gflops_per_s": round(gflops / (ms / 1e3), 1),
            "peak_fraction": round(gflops / (ms / 1e3) / peak, 3),
            "modes": {m: {k: round(v, 2) for k, v in r.items()} for m, r in modes.items()},
        }
        print(
            f"{name:22s} {rows[name]['input']:>16s} {gflops:8.2f} GF {ms:9.1f} ms ({best_mode}) "
            f"{rows[name]['gflops_per_s']:7.1f} GF/s {rows[name]['peak_fraction']:.2f} of peak",
            file=log,
        )

    hybrid, unetr = rows[HYBRID_SEG3D], rows[UNETR]
    summary = {
        "threads": threads,
        "matmul_peak_gflops": round(peak, 1),
        "hybrid_seg3d": HYBRID_SEG3D,
        "hybrid_seg3d_ms": hybrid["ms"],
        "hybrid_seg3d_mode": hybrid["mode"],
        "unetr_ms": unetr["ms"],
        "unetr_mode": unetr["mode"],
        "latency_ratio_vs_unetr": round(float(hybrid["ms"]) / float(unetr["ms"]), 3),  # type: ignore[arg-type]
        "hybrid_seg3d_peak_fraction": hybrid["peak_fraction"],
        "eager_latency_ratio_vs_unetr": round(float(hybrid["eager_ms"]) / float(unetr["eager_ms"]), 3),  # type: ignore[arg-type]
        "models": rows,
    }
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
