"""The package runs on the oldest Python that ``pyproject.toml`` claims (``requires-python``).

CI runs one interpreter (3.11), so a 3.11-only name (``datetime.UTC``, ``tomllib``, ``typing.Self``, ...)
would pass every other test and break on 3.10 at import time. vermin reads the source and knows in which
Python version each stdlib module, member and syntax appeared.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = (REPO / "pyproject.toml").read_text()


def setting(key: str) -> str:
    """A ``key = "value"`` line of pyproject.toml (tomllib is 3.11+, and this file must run on the floor too)."""
    match = re.search(rf'^{re.escape(key)}\s*=\s*"([^"]+)"', PYPROJECT, flags=re.MULTILINE)
    assert match, f"{key} not found in pyproject.toml"
    return match.group(1)


def floor_version() -> str:
    match = re.fullmatch(r">=\s*(\d+\.\d+)", setting("requires-python").strip())
    assert match, "requires-python is not of the form >=X.Y"
    return match.group(1)


def test_sources_need_no_python_newer_than_the_declared_floor() -> None:
    vermin = str(Path(sys.executable).with_name("vermin"))
    # --exclude long: vermin takes the tensor method `.long()` for Python 2's `long`
    options = ["--no-tips", "--violations", "--eval-annotations", "--exclude", "long", f"-t={floor_version()}-"]
    proc = subprocess.run(
        [vermin, *options, "medhybrid", "benchmarks", "tests"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_mypy_and_ruff_target_the_same_floor() -> None:
    floor = floor_version()
    assert setting("python_version") == floor  # [tool.mypy]
    assert setting("target-version") == "py" + floor.replace(".", "")  # [tool.ruff]
