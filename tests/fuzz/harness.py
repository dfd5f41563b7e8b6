"""Mutation fuzzer of medhybrid's ingestion, each case in a time and memory bound.

Every case (``tests/fuzz/mutate.py``) is a mutated real file or series from ``../shared/data``; a worker
process runs three targets on it:

- ``load``: :func:`medhybrid.io.scan.load_study` (an image file or a DICOM file/folder) must return a
  study with finite voxels and a finite affine whose voxels are 1e-4 to 1e5 mm with axes perpendicular
  within 0.01 (|cos|), or raise a :class:`~medhybrid.errors.MedHybridError`;
- ``scan``: :func:`medhybrid.io.scan.scan_folder` over the case's folder must return (it never raises);
- ``cli``: ``medhybrid data scan --json`` over that folder must exit 0 and print one JSON document.

Outcomes: ``ok`` (a valid study), ``typed`` (a MedHybridError, by code), ``uncaught`` (any other exception,
including a decoder panic, which is a BaseException), ``invalid`` (a study with NaN/inf voxels or a bad
affine, loaded silently), ``hang`` (over ``--timeout`` s: the worker is killed) and ``crash`` (the worker
died, e.g. over its ``--memory`` address-space limit). Failures are written, as replayable specs, to
``--failures``; ``tests/fuzz/regressions.json`` keeps the ones found so far (``tests/test_fuzz.py`` replays
them in every run).

Usage:
    python -m tests.fuzz.harness --cases 20000 [--seed 1] [--workers 2] [--shared ../shared/data]
    python -m tests.fuzz.harness --replay tests/fuzz/regressions.json
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SHARED = REPO.parent / "shared" / "data"
FAILURES = ("uncaught", "invalid", "hang", "crash")


# --- the worker (one process, many cases) -----------------------------------------------------------------


def _bound_memory(limit_bytes: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))


def _check_study(study: Any) -> str | None:
    import numpy as np

    affine = np.asarray(study.affine, dtype=float)
    if not np.isfinite(affine).all():
        return "non-finite affine"
    linear = affine[:3, :3]
    norms = np.linalg.norm(linear, axis=0)
    if not (norms >= 1e-4).all() or not (norms <= 1e5).all():  # the documented voxel size range, mm
        return f"voxel sizes {norms.tolist()} mm"
    cosines = linear / norms
    # the documented shear tolerance (medhybrid.io.study.SHEAR_TOLERANCE): |cos| between two axes <= 0.01
    if np.abs(cosines.T @ cosines - np.eye(3)).max() > 1e-2:
        return "non-orthogonal affine"
    if not np.isfinite(study.array).all():
        return "non-finite voxels"
    return None


def run_case(case: dict[str, Any], shared: Path) -> dict[str, Any]:
    """Materialise and run one case in this process: ``{"target": outcome, ...}`` plus details."""
    from typer.testing import CliRunner

    from medhybrid.cli import app
    from medhybrid.errors import MedHybridError
    from medhybrid.io.scan import load_study, scan_folder
    from tests.fuzz.mutate import materialise

    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        with warnings.catch_warnings():  # the mutator's own reads of broken files: not the code under test
            warnings.simplefilter("ignore")
            path = materialise(case, shared, Path(tmp))
        folder = path if path.is_dir() else path.parent
        for target in ("load", "scan", "cli"):
            try:
                if target == "load":
                    problem = _check_study(load_study(path))
                    result[target] = "invalid" if problem else "ok"
                    if problem:
                        result[f"{target}_detail"] = problem
                elif target == "scan":
                    scan_folder(folder)
                    result[target] = "ok"
                else:
                    out = CliRunner().invoke(app, ["data", "scan", "--json", str(folder)], catch_exceptions=True)
                    if out.exception is not None and not isinstance(out.exception, SystemExit):
                        raise out.exception
                    if out.exit_code != 0:
                        raise RuntimeError(f"data scan exit {out.exit_code}: {out.output[-300:]}")
                    json.loads(out.stdout)
                    result[target] = "ok"
            except MedHybridError as exc:
                result[target] = "typed"
                result[f"{target}_code"] = exc.code
            except BaseException as exc:  # noqa: BLE001 - the fuzzer's job is to see every escape
                if isinstance(exc, KeyboardInterrupt):
                    raise
                result[target] = "uncaught"
                result[f"{target}_detail"] = f"{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:200]}"
                result[f"{target}_where"] = traceback.format_exc(limit=-3)[-600:]
    return result


def worker_main(shared: Path, memory: int) -> None:
    """Read one case per line on stdin, answer one JSON line per case on stdout."""
    if memory:
        _bound_memory(memory)
    import medhybrid.cli  # noqa: F401 - import once, before the first case is timed

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but answers on the pipe
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        case = json.loads(line)
        out.write(json.dumps(run_case(case, shared)) + "\n")
        out.flush()


# --- the parent: bounds, restarts, tally ------------------------------------------------------------------


@dataclass
class Tally:
    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def failed(self) -> int:
        return len(self.failures)

    def as_dict(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "outcomes": dict(sorted(self.outcomes.items())),
            "typed_codes": dict(self.codes.most_common()),
            "failures": self.failed(),
            "seconds": round(self.seconds, 1),
        }


class Worker:
    def __init__(self, shared: Path, memory: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fuzz.harness", "--worker", "--shared", str(shared), "--memory", str(memory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
            env=env,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("fuzz worker failed to start")

    def run(self, case: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"worker": "crash", "worker_detail": f"exit {self.proc.poll()}"}
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.proc.kill()
            self.proc.wait()
            return {"worker": "hang", "worker_detail": f"no answer in {timeout} s"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            return {"worker": "crash", "worker_detail": f"worker died (exit {code})"}
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()


def classify(answer: dict[str, Any]) -> list[str]:
    if "worker" in answer:
        return [answer["worker"]]
    return [answer[t] for t in ("load", "scan", "cli") if t in answer]


def fuzz(
    cases: list[dict[str, Any]], shared: Path, *, timeout: float = 10.0, memory: int = 2 << 30, workers: int = 1
) -> Tally:
    """Run ``cases`` over ``workers`` bounded worker processes (restarted after a hang or crash)."""
    tally = Tally()
    start = time.perf_counter()
    pool = [Worker(shared, memory) for _ in range(max(1, workers))]
    pending = list(enumerate(cases))
    try:
        # round-robin: each worker takes the next case; with 2 cores 2 workers halve the wall time
        import concurrent.futures as cf

        def drive(slot: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
            answers = []
            for _index, case in pending[slot :: len(pool)]:
                if not pool[slot].alive():
                    pool[slot] = Worker(shared, memory)
                answers.append((case, pool[slot].run(case, timeout)))
            return answers

        with cf.ThreadPoolExecutor(len(pool)) as ex:
            results = [a for chunk in ex.map(drive, range(len(pool))) for a in chunk]
    finally:
        for w in pool:
            w.close()
    for case, answer in results:
        tally.cases += 1
        outcomes = classify(answer)
        tally.outcomes.update(outcomes)
        tally.codes.update(v for k, v in answer.items() if k.endswith("_code"))
        if any(o in FAILURES for o in outcomes):
            tally.failures.append({"case": case, "answer": answer})
    tally.seconds = time.perf_counter() - start
    return tally


def generate(n: int, seed: int, shared: Path) -> list[dict[str, Any]]:
    from tests.fuzz.mutate import make_case, sources

    pool = sources(shared)
    return [make_case(seed, i, pool) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per case")
    parser.add_argument("--memory", type=int, default=2 << 30, help="address-space limit per worker, bytes")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--replay", type=Path, help="run the cases of a failures/regressions JSON file")
    parser.add_argument("--failures", type=Path, default=Path("fuzz_failures.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.shared, args.memory)
        return 0
    if not args.shared.is_dir():
        print(f"{args.shared}: shared data not found (set --shared)", file=sys.stderr)
        return 2
    if args.replay:
        cases = [item.get("case", item) for item in json.loads(args.replay.read_text())]
    else:
        cases = generate(args.cases, args.seed, args.shared)
    tally = fuzz(cases, args.shared, timeout=args.timeout, memory=args.memory, workers=args.workers)
    if tally.failures:
        args.failures.write_text(json.dumps(tally.failures, indent=1) + "\n")
    print(json.dumps(tally.as_dict(), indent=1))
    if tally.failures:
        print(f"{tally.failed()} failing cases written to {args.failures}", file=sys.stderr)
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
