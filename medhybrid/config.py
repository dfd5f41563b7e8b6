"""Pipeline configuration: frozen, validated models loaded from ``pipelines/*.yaml`` plus ``--set`` overrides.

Unknown keys and wrong types fail with the dotted field path (``train.stages.0.lr: ...``) so a typo in a
YAML file is one clear line, not a silently ignored setting.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medhybrid.errors import ConfigError

IntensityPreset = Literal["ct_lung", "ct_soft_tissue", "ct_bone", "ct_brain", "mr_zscore", "minmax", "none"]

# (window level, window width) in HU for the CT presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "ct_lung": (-600.0, 1500.0),
    "ct_soft_tissue": (40.0, 400.0),
    "ct_bone": (400.0, 1800.0),
    "ct_brain": (40.0, 80.0),
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AugmentConfig(Strict):
    """Training-time augmentation (none at validation or inference)."""

    flip_prob: float = Field(0.5, ge=0, le=1, description="per-axis flip probability")
    rotate_degrees: float = Field(0.0, ge=0, le=180, description="max rotation about each axis")
    scale: float = Field(0.0, ge=0, lt=1, description="max isotropic zoom, +/-")
    affine_prob: float = Field(0.0, ge=0, le=1, description="probability of the rotation/zoom")
    intensity_scale: float = Field(0.0, ge=0, lt=1, description="max multiplicative intensity change, +/-")
    intensity_shift: float = Field(0.0, ge=0, lt=1, description="max additive intensity change, +/-")
    noise_std: float = Field(0.0, ge=0, description="std of added Gaussian noise (after normalisation)")
    gamma: float = Field(0.0, ge=0, lt=1, description="max gamma change, +/-: gamma from [1 - g, 1 + g] (tone curve)")
    blur_sigma: float = Field(0.0, ge=0, description="max Gaussian blur sigma in voxels (drawn from [0.25, max])")
    lowres_zoom: float = Field(
        0.0, ge=0, lt=1, description="simulated low-resolution acquisition: down to a zoom in [this, 1] and back up"
    )
    intensity_prob: float = Field(
        0.0, ge=0, le=1, description="probability of each intensity / acquisition change (scale ... lowres_zoom)"
    )


class DataConfig(Strict):
    """What to read and how to turn it into tensors (saved with the checkpoint for inference)."""

    manifest: Path
    task: Literal["classification", "segmentation", "multitask"] = "classification"
    label_names: dict[int, str] | None = Field(None, description="default: the manifest sidecar's")
    mask_kind: Literal["anatomy", "lesion"] | None = Field(
        None, description="what the mask labels are (default: the manifest sidecar's, else lesion)"
    )
    mask_label_kinds: dict[int, Literal["anatomy", "lesion"]] | None = Field(
        None, description="per-label kinds overriding mask_kind (default: the manifest sidecar's)"
    )
    spatial_dims: Literal[2, 3] = 3
    modality: str | None = None
    body_parts: tuple[str, ...] | None = Field(
        None,
        description="DICOM BodyPartExamined values the model is meant for; a study declaring another is "
        "NOT ASSESSED (docs/inference.md, scope rules)",
    )
    intensity: IntensityPreset = "minmax"
    spacing: tuple[float, ...] | None = Field(None, description="target voxel spacing in mm; None keeps it")
    orientation: str | None = Field(
        "RAS", description="axis codes (default RAS; RA in 2D, the display frame); None keeps the file's"
    )
    spatial_size: tuple[int, ...] = Field(description="crop/pad size of every image (classification)")
    patch_size: tuple[int, ...] | None = Field(None, description="training patches for segmentation")
    foreground_fraction: float = Field(0.33, ge=0, le=1, description="patches centred on foreground")
    samples_per_image: int = Field(1, ge=1)
    cache: Literal["none", "memory"] = "memory"
    train_split: str = "train"
    val_split: str = "val"
    augment: AugmentConfig = AugmentConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_orientation(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("spatial_dims") == 2 and "orientation" not in values:
            return {**values, "orientation": "RA"}
        return values

    @model_validator(mode="after")
    def _sizes_match_dims(self) -> DataConfig:
        for name in ("spatial_size", "patch_size", "spacing"):
            value = getattr(self, name)
            if value is not None and len(value) != self.spatial_dims:
                raise ValueError(f"{name} needs {self.spatial_dims} values for spatial_dims={self.spatial_dims}")
        if self.orientation is not None and len(self.orientation) != self.spatial_dims:
            raise ValueError(f"orientation needs {self.spatial_dims} axis codes, got {self.orientation!r}")
        if self.spatial_dims == 2 and self.orientation not in (None, "RA"):
            raise ValueError(
                f"orientation {self.orientation!r}: 2D images are analysed in their display frame (docs/ingestion.md), "
                "so a 2D pipeline takes orientation RA (as displayed) or null (as stored)"
            )
        return self


class ModelConfig(Strict):
    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    pretrained: Path | None = None


class StageConfig(Strict):
    """One training stage: which modules train, at what learning rates, for how long."""

    name: str = "train"
    epochs: int = Field(ge=1)
    lr: float = Field(1e-3, gt=0)
    freeze: tuple[str, ...] = Field((), description="module name prefixes kept frozen, e.g. encoder")
    lr_scale: dict[str, float] = Field(default_factory=dict, description="module prefix -> lr multiplier")
    warmup_epochs: int = Field(0, ge=0)


class OptimizerConfig(Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)


class LossConfig(Strict):
    classification: Literal["ce", "focal"] = "ce"
    segmentation: Literal["dice_ce", "dice", "ce"] = "dice_ce"
    seg_weight: float = Field(1.0, ge=0, description="weight of the segmentation loss in multitask runs")
    dice_background: bool = Field(
        False,
        description="count the background class in the Dice term (nnU-Net leaves it out: a background Dice "
        "near 1 halves the gradient a missed small lesion gets)",
    )


class TrainConfig(Strict):
    stages: tuple[StageConfig, ...] = Field(min_length=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: Literal["cosine", "constant"] = "cosine"
    batch_size: int = Field(8, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    class_balance: Literal["none", "weighted_loss", "sampler"] = "none"
    loss: LossConfig = LossConfig()
    early_stopping: int | None = Field(None, ge=1, description="stop after this many epochs without improvement")
    num_workers: int = Field(0, ge=0)
    amp: bool = Field(True, description="bf16 autocast on CUDA (never on CPU)")


class MinSensitivity(Strict):
    """Operating point: the highest threshold whose validation sensitivity is at least this."""

    min_sensitivity: float = Field(gt=0.0, le=1.0)


class EvalConfig(Strict):
    """Validation metrics, model selection and the operating point stored with the weights.

    ``operating_point`` is the decision threshold on the probability of abnormality that inference
    applies: ``youden`` (maximises sensitivity + specificity - 1 on the validation set at the best
    epoch), ``{min_sensitivity: 0.9}``, or a fixed probability in (0, 1).
    """

    metrics: tuple[Literal["auroc", "accuracy", "dice", "loss"], ...] = ("auroc", "loss")
    select: Literal["auroc", "accuracy", "dice", "loss"] = "auroc"
    operating_point: Literal["youden"] | MinSensitivity | Annotated[float, Field(gt=0.0, lt=1.0)] = "youden"
    min_lesion_ml: float = Field(
        0.0, ge=0.0, description="segmentation-only lesion models: smaller components do not count in the study score"
    )
    window_overlap: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="share of a window its neighbours overlap when a scan is covered window by window "
        "(validation, evaluate, infer): nnU-Net's 0.5 by default; at least the largest lesion's diameter "
        "over the window size, so every lesion lies whole in one window",
    )

    @model_validator(mode="after")
    def _select_is_computed(self) -> EvalConfig:
        if self.select not in self.metrics:
            raise ValueError(f"select {self.select!r} must be one of metrics {list(self.metrics)}")
        return self


class RuntimeConfig(Strict):
    threads: int | None = Field(None, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


class PipelineConfig(Strict):
    name: str = "run"
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ "):
            raise ValueError("name must be non-empty without slashes or spaces")
        return v

    @model_validator(mode="after")
    def _task_fits_eval(self) -> PipelineConfig:
        cls_metrics = {"auroc", "accuracy"}
        if self.data.task == "segmentation" and cls_metrics & set(self.eval.metrics):
            raise ValueError("eval.metrics: auroc/accuracy need labels; use dice or loss for segmentation")
        if self.data.task == "classification" and "dice" in self.eval.metrics:
            raise ValueError("eval.metrics: dice needs masks; use auroc, accuracy or loss for classification")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (paths as strings)."""
        return json.loads(self.model_dump_json())

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``a.b.c=value`` strings applied to nested dicts; the value is parsed as YAML (``3``, ``[1,2]``, ``true``).

    Raises:
        ConfigError: an override without ``=`` or that walks into a non-mapping.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE", fix="e.g. --set train.batch_size=16")
        node: dict[str, Any] | list[Any] = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {}) if isinstance(node, dict) else None
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                child = node[int(part)]
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"--set {key}: {part!r} is not a section", fix="check the key path")
            node = child
        value = yaml.safe_load(text) if text else ""
        if isinstance(node, list):
            if not parts[-1].isdigit() or int(parts[-1]) >= len(node):
                raise ConfigError(f"--set {key}: no item {parts[-1]!r} in the list")
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    return raw


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline YAML; relative paths resolve against the YAML's folder.

    Raises:
        ConfigError: unreadable YAML, a bad override, or a validation error (with the field path).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("pipeline file not found", path=path, fix="pass a YAML file from pipelines/")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {str(exc).splitlines()[0]}", path=path) from None
    if not isinstance(raw, dict):
        raise ConfigError("a pipeline must be a mapping with data, model and train sections", path=path)
    raw = apply_overrides(raw, list(overrides or []))
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(
            f"{where}: {err['msg']}{more}", path=path, fix="see docs/training.md for the schema"
        ) from None
    return _resolve_paths(cfg, path.parent)


def _resolve_paths(cfg: PipelineConfig, base: Path) -> PipelineConfig:
    data = cfg.data.model_copy(update={"manifest": _abs(cfg.data.manifest, base)})
    model = cfg.model
    if model.pretrained is not None:
        model = model.model_copy(update={"pretrained": _abs(model.pretrained, base)})
    return cfg.model_copy(update={"data": data, "model": model})


def _abs(p: Path, base: Path) -> Path:
    return p if p.is_absolute() else (base / p).resolve()
