"""DICOM series -> validated volume: medhybrid against SimpleITK's ImageSeriesReader on the same files.

Both sides start from a folder path and end with a NumPy array of the volume:
- medhybrid: ``load_study(folder)`` - discovery, header parsing, grouping, every geometry check, series
  selection, pixel decode and rescale to float32 (HU).
- SimpleITK: ``GetGDCMSeriesIDs`` + ``GetGDCMSeriesFileNames`` + ``ImageSeriesReader.Execute`` +
  ``GetArrayViewFromImage`` (a view, no copy; no geometry validation, no float conversion).

Timings are medians of alternating repeats after one warm-up each (files in the page cache). The last
line printed is one JSON object; ``ratio_vs_simpleitk`` is SimpleITK's time divided by ours (> 1: we are
faster) on the main synthetic CT case.

Usage: python benchmarks/ingest.py [--slices 120] [--size 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medhybrid.io.dicom_write import derive_uid, write_dicom_series
from medhybrid.io.scan import load_study

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDHYBRID_SHARED_DATA", REPO.parent / "shared" / "data"))


def read_ours(folder: Path) -> np.ndarray:
    return load_study(folder).array


_KEEP_ALIVE: list[sitk.Image] = []


def read_sitk(folder: Path) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    (series_id,) = reader.GetGDCMSeriesIDs(str(folder))
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series_id))
    image = reader.Execute()
    _KEEP_ALIVE[:] = [image]  # a view is only valid while its image lives
    return sitk.GetArrayViewFromImage(image)


def timed(fn: Callable[[Path], np.ndarray], folder: Path) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn(folder)
    return time.perf_counter() - start, out


def compare(folder: Path, repeats: int) -> dict[str, float | int | bool | str]:
    _, ours = timed(read_ours, folder)  # warm-up (page cache, imports)
    theirs = np.array(timed(read_sitk, folder)[1])  # copy now: later calls release this view's image
    t_ours, t_sitk = [], []
    for _ in range(repeats):
        t_ours.append(timed(read_ours, folder)[0])
        t_sitk.append(timed(read_sitk, folder)[0])
    theirs_ijk = np.asarray(theirs).transpose(2, 1, 0)
    same = ours.shape == theirs_ijk.shape and (
        np.allclose(ours, theirs_ijk) or np.allclose(ours, theirs_ijk[:, :, ::-1])
    )
    m_ours, m_sitk = statistics.median(t_ours), statistics.median(t_sitk)
    n = int(ours.shape[2])
    return {
        "folder": folder.name,
        "shape": "x".join(str(s) for s in ours.shape),
        "n_slices": n,
        "ours_s": round(m_ours, 4),
        "simpleitk_s": round(m_sitk, 4),
        "ratio_vs_simpleitk": round(m_sitk / m_ours, 3),
        "slices_per_s": round(n / m_ours, 1),
        "values_match": bool(same),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    sitk.ProcessObject_SetGlobalWarningDisplay(False)

    results = []
    with tempfile.TemporaryDirectory(prefix="medhybrid-bench-") as tmp:
        folder = Path(tmp) / "ct"
        rng = np.random.default_rng(0)
        volume = rng.normal(0.0, 200.0, size=(args.size, args.size, args.slices)).round()
        affine = np.diag([-0.7, -0.7, 1.25, 1.0])
        write_dicom_series(volume, affine, folder, study_uid=derive_uid("bench"), series_uid=derive_uid("bench", "s"))
        results.append(compare(folder, args.repeats))
    real = SHARED / "dicom" / "series" / "tcia_pgbm_study3"
    if real.is_dir():
        for series_dir in sorted(p for p in real.iterdir() if p.is_dir()):
            results.append(compare(series_dir, args.repeats))
    else:
        print(f"(real TCIA series not found under {real}; synthetic case only)", file=sys.stderr)

    for r in results:
        print(
            f"{r['folder']:>24} {r['shape']:>14}  medhybrid {r['ours_s'] * 1000:8.1f} ms  "
            f"SimpleITK {r['simpleitk_s'] * 1000:8.1f} ms  ratio {r['ratio_vs_simpleitk']:5.2f}  "
            f"{r['slices_per_s']:8.1f} slices/s  values match: {r['values_match']}"
        )
    main_case = results[0]
    summary = {
        "ratio_vs_simpleitk": main_case["ratio_vs_simpleitk"],
        "slices_per_s": main_case["slices_per_s"],
        "ours_ms": round(float(main_case["ours_s"]) * 1000, 1),
        "simpleitk_ms": round(float(main_case["simpleitk_s"]) * 1000, 1),
        "shape": main_case["shape"],
        "values_match": all(r["values_match"] for r in results),
        "real_series_ratio_median": (
            round(statistics.median(float(r["ratio_vs_simpleitk"]) for r in results[1:]), 3)
            if len(results) > 1
            else None
        ),
        "cases": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
