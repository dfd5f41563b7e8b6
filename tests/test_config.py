"""Pipeline YAML: validation with field paths, --set overrides, relative paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medhybrid.config import apply_overrides, load_pipeline
from medhybrid.errors import ConfigError

BASE = {
    "name": "t",
    "data": {
        "manifest": "m.csv",
        "task": "classification",
        "spatial_dims": 2,
        "spatial_size": [28, 28],
        "orientation": None,
    },
    "model": {"name": "hybrid_tiny_2d", "args": {"seg_classes": 0}},
    "train": {"stages": [{"epochs": 2, "lr": 0.001}]},
}


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_valid_pipeline_resolves_paths(tmp_path: Path) -> None:
    cfg = load_pipeline(_write(tmp_path, BASE))
    assert cfg.data.manifest == (tmp_path / "m.csv").resolve()
    assert cfg.train.stages[0].epochs == 2 and cfg.eval.select == "auroc"
    assert len(cfg.digest()) == 16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stages.0.lrr=0.1"], "train.stages.0.lrr: Extra inputs are not permitted"),
        (["train.batch_size=many"], "train.batch_size: Input should be a valid integer"),
        (["data.task=detection"], "data.task: Input should be 'classification'"),
        (["data.spatial_size=[28, 28, 28]"], "spatial_size needs 2 values"),
        (["eval.select=dice", "eval.metrics=[auroc]"], "select 'dice' must be one of metrics"),
        (["train.stages=[]"], "train.stages: Tuple should have at least 1 item"),
        (["name=a/b"], "name: Value error"),
    ],
)
def test_bad_configs_fail_with_the_field_path(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_pipeline(_write(tmp_path, BASE), overrides)
    assert message in str(info.value)
    assert str(tmp_path / "p.yaml") in str(info.value)


def test_overrides_parse_yaml_values() -> None:
    raw = apply_overrides({"a": {"b": 1}, "l": [{"x": 1}]}, ["a.b=2.5", "a.c=[1, 2]", "l.0.x=true", "d.e=hi"])
    assert raw == {"a": {"b": 2.5, "c": [1, 2]}, "l": [{"x": True}], "d": {"e": "hi"}}


@pytest.mark.parametrize("bad", ["novalue", "=3", "a.b.c=1"])
def test_bad_overrides(bad: str) -> None:
    with pytest.raises(ConfigError):
        apply_overrides({"a": {"b": 1}}, [bad])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_pipeline(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping"):
        load_pipeline(bad)
