"""Checkpoint integrity and safety: the weights digest recorded at save and checked at load, edited or
mistyped fields as one typed error naming the field, and a checkpoint that would run code when unpickled
refused on every path that loads one (train --resume, pretrained weights, infer, evaluate)."""

from __future__ import annotations

import ast
import logging
import os
import pickle
import shlex
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from medhybrid.cli import app
from medhybrid.config import load_pipeline
from medhybrid.errors import CheckpointError
from medhybrid.infer.predictor import Predictor
from medhybrid.train import load_checkpoint, load_pretrained, train
from medhybrid.train.checkpoint import DIGEST_KEY, RESUME_REQUIRED, save_checkpoint, weights_digest
from tests.easy_cohort import easy_pipeline, write_easy_cohort

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-epoch run of a tiny 2D hybrid on a 16-study cohort (a few seconds)."""
    root = tmp_path_factory.mktemp("security")
    manifest = write_easy_cohort(root / "cohort", n=16)
    raw = easy_pipeline(manifest, epochs=1)
    raw["runtime"]["threads"] = 1
    pipe = root / "pipe.yaml"
    pipe.write_text(yaml.safe_dump(raw))
    train(load_pipeline(pipe), root / "run")
    return {"root": root, "manifest": manifest, "pipe": pipe, "run": root / "run"}


def raw(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


class RunsCode:
    """Unpickling this runs ``touch MARKER`` (as a real attack would run anything)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def malicious(path: Path, marker: Path, like: Path | None = None) -> Path:
    """A checkpoint (a copy of ``like`` when given) with one value that runs code when unpickled."""
    ckpt: dict[str, Any] = raw(like) if like is not None else {"model": {"w": torch.zeros(2)}}
    ckpt["history"] = [RunsCode(marker)]
    torch.save(ckpt, path)
    return path


def one_error_line(result: Any) -> str:
    """The CLI's answer to a domain error: exit code 1, one line on stderr, no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# --- the weights digest -----------------------------------------------------------------------------


def test_every_checkpoint_records_its_weights_digest(trained: dict[str, Path]) -> None:
    for name in ("best.pt", "last.pt"):
        ckpt = raw(trained["run"] / name)
        assert ckpt[DIGEST_KEY] == weights_digest(ckpt["model"])
        assert load_checkpoint(trained["run"] / name)[DIGEST_KEY] == ckpt[DIGEST_KEY]


def tensor_record(path: Path) -> tuple[int, int]:
    """(offset, size) in the file of the largest tensor's bytes (torch stores them uncompressed)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    head = path.read_bytes()[info.header_offset : info.header_offset + 30]
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_flipped_bytes_in_the_weights_are_caught(trained: dict[str, Path], tmp_path: Path) -> None:
    path = shutil.copy(trained["run"] / "best.pt", tmp_path / "flipped.pt")
    offset, size = tensor_record(Path(path))
    data = bytearray(Path(path).read_bytes())
    data[offset + size // 2] ^= 0x10
    Path(path).write_bytes(bytes(data))
    assert raw(Path(path))["model"]  # torch itself loads it without a word: no checksum on tensor data
    with pytest.raises(CheckpointError, match="do not match the digest recorded") as err:
        load_checkpoint(Path(path))
    assert str(path) in str(err.value) and "fix: re-copy it or retrain" in str(err.value)
    result = CliRunner().invoke(
        app, ["infer", str(trained["root"] / "cohort"), "--model", str(path), "--out", str(tmp_path / "out")]
    )
    assert "do not match the digest" in one_error_line(result)


def test_edited_weights_are_caught(trained: dict[str, Path], tmp_path: Path) -> None:
    ckpt = raw(trained["run"] / "best.pt")
    key = next(iter(ckpt["model"]))
    ckpt["model"][key] = ckpt["model"][key] + 1e-3  # saved by hand: the recorded digest is the old one
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="corrupt or was edited"):
        load_checkpoint(tmp_path / "edited.pt")
    # saved through save_checkpoint, the digest is recomputed: these are new, consistent weights
    save_checkpoint(tmp_path / "resaved.pt", ckpt)
    assert load_checkpoint(tmp_path / "resaved.pt")[DIGEST_KEY] == weights_digest(ckpt["model"])


def test_a_checkpoint_without_a_digest_loads_with_a_warning(
    trained: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = raw(trained["run"] / "best.pt")
    del ckpt[DIGEST_KEY]  # as written before digests existed
    torch.save(ckpt, tmp_path / "old.pt")
    with caplog.at_level(logging.WARNING, logger="medhybrid.train.checkpoint"):
        loaded = load_checkpoint(tmp_path / "old.pt")
        predictor = Predictor(tmp_path / "old.pt", device="cpu", saliency=())
    assert loaded[DIGEST_KEY] == weights_digest(ckpt["model"]) == predictor.weights_sha256
    assert "no weights digest recorded" in caplog.text and "old.pt" in caplog.text


# --- edited fields ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("model", None, "field 'model' is missing"),
        ("model", {"w": [1.0, 2.0]}, "field 'model' must be a non-empty dict of named tensors"),
        ("model", "weights", "field 'model' must be a non-empty dict of named tensors"),
        ("config", ["not", "a", "mapping"], "field 'config' must be a mapping"),
        ("epoch", "3", "field 'epoch' must be a whole number, got str '3'"),
        ("model_name", 7, "field 'model_name' must be a model name"),
        ("model_args", ["num_classes", 2], "field 'model_args' must be a mapping"),
        ("preprocessing", None, "field 'preprocessing' is missing"),
        ("label_names", {"zero": "normal"}, "field 'label_names' must be a mapping of label numbers"),
        ("operating_point", {"threshold": "high"}, "field 'operating_point' must be null or a mapping"),
        ("best", {"value": 0.5, "epoch": "one", "bad_epochs": 0}, "field 'best.epoch' must be null or an integer"),
        ("rng", {"python": [1, 2, 3], "numpy": 5, "numpy_pos": 0, "torch": torch.zeros(2)}, "'rng.numpy'"),
        ("format_version", "1", "field 'format_version' must be an integer"),
    ],
)
def test_an_edited_field_is_named(
    trained: dict[str, Path], tmp_path: Path, field: str, value: Any, expected: str
) -> None:
    ckpt = raw(trained["run"] / "best.pt")
    if value is None:
        del ckpt[field]
    else:
        ckpt[field] = value
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt") as err:
        load_checkpoint(tmp_path / "bad.pt", require=RESUME_REQUIRED)
    assert expected in str(err.value) and "fix:" in str(err.value)
    # infer and evaluate load through load_checkpoint: the same error, not a KeyError or TypeError
    with pytest.raises(CheckpointError, match=expected.split(" must ")[0].split(" is ")[0]):
        Predictor(tmp_path / "bad.pt", device="cpu", saliency=())


def test_resume_needs_the_training_state_and_names_what_is_missing(trained: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    last = raw(run / "last.pt")
    del last["optimizer"]
    torch.save(last, run / "last.pt")
    load_checkpoint(run / "last.pt")  # enough to infer with
    result = CliRunner().invoke(app, ["train", str(trained["pipe"]), "--out", str(run), "--resume"])
    line = one_error_line(result)
    assert "last.pt" in line and "field 'optimizer' is missing" in line
    last = raw(trained["run"] / "last.pt")
    last["stage_epoch"] = 9  # the pipeline's one stage has one epoch
    torch.save(last, run / "last.pt")
    line = one_error_line(CliRunner().invoke(app, ["train", str(trained["pipe"]), "--out", str(run), "--resume"]))
    assert "does not fit the pipeline's 1 stages" in line


# --- code in the pickle -----------------------------------------------------------------------------


def test_the_malicious_file_really_runs_code_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The control: without weights_only, loading the test's malicious file creates the marker."""
    marker = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.is_file()


def test_resume_refuses_a_last_pt_that_runs_code(trained: dict[str, Path], tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(trained["run"], run)
    malicious(run / "last.pt", marker, like=trained["run"] / "last.pt")
    result = CliRunner().invoke(app, ["train", str(trained["pipe"]), "--out", str(run), "--resume"])
    line = one_error_line(result)
    assert "last.pt" in line and "pickled Python objects (posix.system)" in line and "weights_only=True" in line
    assert not marker.exists()


def test_pretrained_weights_that_run_code_are_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = malicious(tmp_path / "pretrained.pt", marker)  # a bare state dict, as pretrained files usually are
    pipe = tmp_path / "pipe.yaml"
    config = yaml.safe_load(trained["pipe"].read_text())
    config["model"]["pretrained"] = str(evil)
    pipe.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["train", str(pipe), "--out", str(tmp_path / "run")])
    assert "pretrained.pt" in one_error_line(result) and "pickled Python objects" in result.stderr
    assert not marker.exists() and not (tmp_path / "run" / "last.pt").exists()
    with pytest.raises(CheckpointError, match="pickled Python objects"):  # the library call, directly
        load_pretrained(torch.nn.Linear(2, 2), evil)
    assert not marker.exists()


@pytest.mark.parametrize("as_run_folder", [False, True])
def test_infer_refuses_a_model_that_runs_code(trained: dict[str, Path], tmp_path: Path, as_run_folder: bool) -> None:
    marker = tmp_path / "pwned"
    model = tmp_path / "model"
    model.mkdir()
    malicious(model / "best.pt", marker, like=trained["run"] / "best.pt")
    out = tmp_path / "out"
    args = ["infer", str(trained["root"] / "cohort"), "--model", str(model if as_run_folder else model / "best.pt")]
    line = one_error_line(CliRunner().invoke(app, [*args, "--out", str(out)]))
    assert "best.pt" in line and "pickled Python objects" in line
    assert not marker.exists() and not any(out.rglob("report.json"))


def test_evaluate_refuses_a_model_that_runs_code(trained: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = malicious(tmp_path / "evil.pt", marker, like=trained["run"] / "best.pt")
    args = ["evaluate", "--model", str(evil), "--manifest", str(trained["manifest"]), "--out", str(tmp_path / "ev")]
    line = one_error_line(CliRunner().invoke(app, args))
    assert "evil.pt" in line and "pickled Python objects" in line
    assert not marker.exists() and not (tmp_path / "ev" / "metrics.json").exists()


def test_no_torch_load_without_weights_only() -> None:
    """Every torch.load in the package passes weights_only=True (there is one, in train/checkpoint.py)."""
    calls = []
    for source in sorted((REPO / "medhybrid").rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr == "load" and ast.unparse(func.value) == "torch":
                assert isinstance(node, ast.Call)
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                calls.append((source.relative_to(REPO).as_posix(), safe))
    assert calls == [("medhybrid/train/checkpoint.py", True)]
