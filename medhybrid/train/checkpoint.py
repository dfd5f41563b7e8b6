"""Checkpoints (``best.pt`` / ``last.pt``) and pretrained weights.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs). It carries everything inference needs to
rebuild the model and its preprocessing, and everything ``--resume`` needs to continue bit-exactly:

``format``, ``format_version``, ``model_name``, ``model_args``, ``model`` (state dict), ``optimizer``,
``scheduler``, ``rng``, ``config`` (the resolved pipeline), ``preprocessing`` (the ``data`` section),
``label_names``, ``mask_label_names``, ``versions``, ``manifest_sha256``, ``seed``, ``stage``,
``stage_epoch``, ``epoch``, ``global_step``, ``best``, ``history``, ``world_size``, and ``weights_sha256``
(:func:`weights_digest` of ``model``, written by :func:`save_checkpoint`).

Loading is checked in one place, :func:`load_checkpoint`: a file that would run code when unpickled is
refused (``weights_only=True``), weights whose digest differs from the recorded one (flipped bytes, an
edited file) are refused, and every field a consumer reads must have its type (an edited ``epoch``
string or a ``model`` that is not a dict of tensors is a :class:`CheckpointError` naming the field, never
a ``KeyError`` further on). Checkpoints written before digests existed load with a warning.

A checkpoint is never rewritten after training. What ``medhybrid evaluate`` fits later (temperature,
operating point) goes into a **calibration sidecar** next to it (``best.pt`` ->
``best.calibration.json``), which records the digest of the weights it was fitted for; a sidecar whose
digest does not match the weights (the run was resumed and ``best.pt`` replaced) is ignored. The weights
digest (:func:`weights_digest`) hashes the model's tensors only, so it names the weights and nothing else.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import platform
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medhybrid.errors import CheckpointError
from medhybrid.io.writers import (
    atomic_write_bytes,
)
from medhybrid.train.records import json_safe

logger = logging.getLogger(__name__)

FORMAT = "medhybrid-checkpoint"
FORMAT_VERSION = 2
# Hybrid defaults that changed with format 2 (issue 16): a checkpoint written before records none of them,
# and its network was built with these values. Filled in on load, so that old checkpoints rebuild as trained.
LEGACY_HYBRID_ARGS: dict[int, dict[str, Any]] = {
    1: {"min_token_grid": 0, "decoder_full_res": 0, "fuse_pooled": True},
}
DIGEST_KEY = "weights_sha256"  # weights_digest(model), recorded by save_checkpoint
VERSIONED = ("medhybrid", "torch", "monai", "numpy", "pydicom", "nibabel", "SimpleITK", "scikit-learn")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's tensors (name, dtype, shape and bytes, in name order): the identity of the
    weights, unchanged by anything else stored beside them (optimizer, history, calibration)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def calibration_path(checkpoint: Path) -> Path:
    """The calibration sidecar of a checkpoint: ``best.pt`` -> ``best.calibration.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".calibration.json")


def write_calibration(checkpoint: Path, calibration: Mapping[str, Any], weights: str) -> Path:
    """Store ``calibration`` (temperature, operating point, where it was fitted) beside ``checkpoint`` for
    the weights with digest ``weights``, atomically; the checkpoint itself is not touched."""
    payload = {**json_safe(dict(calibration)), "weights_digest": weights}
    return atomic_write_bytes(calibration_path(checkpoint), (json.dumps(payload, indent=2) + "\n").encode())


def read_calibration(checkpoint: Path, weights: str, legacy: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The calibration stored for ``checkpoint`` and the weights with digest ``weights``, or ``{}``.

    A sidecar fitted for other weights is ignored with a warning. ``legacy``: the ``calibration`` entry that
    checkpoints written before sidecars existed carry inside them (used when there is no sidecar).

    Raises:
        CheckpointError: the sidecar exists but is not valid JSON.
    """
    path = calibration_path(checkpoint)
    if not path.is_file():
        return dict(legacy or {})
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"calibration sidecar unreadable ({exc})", path=path, fix="delete it and rerun evaluate"
        ) from None
    if not isinstance(data, dict) or data.get("weights_digest") != weights:
        logger.warning("%s was fitted for other weights (the checkpoint changed since); ignored", path)
        return {}
    return data


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch generator states as weights-only-loadable values."""
    np_state: Any = np.random.get_state(legacy=True)  # ("MT19937", keys, pos, has_gauss, cached_gaussian)
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [*py_internal, py_version, py_gauss],
        "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = list(state["python"])
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` atomically (temp file + fsync + rename: a kill mid-write leaves the old file
    intact) with the digest of its weights, recomputed here so that it always names the weights saved."""
    body = {k: v for k, v in payload.items() if k not in ("format", "format_version", DIGEST_KEY)}
    if "model" in body:
        body[DIGEST_KEY] = weights_digest(body["model"])
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **body}, buf)
    return atomic_write_bytes(Path(path), buf.getvalue(), fsync=True)


# --- what a checkpoint must hold -----------------------------------------------------------------

_Check = tuple[Callable[[Any], bool], str]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int_key(k: Any) -> bool:
    return _is_int(k) or (isinstance(k, str) and k.lstrip("-").isdigit())


def _is_tensor_dict(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and bool(v)
        and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())
    )


def _is_label_map(v: Any) -> bool:
    return isinstance(v, dict) and all(_is_int_key(k) and isinstance(x, str) for k, x in v.items())


def _is_operating_point(v: Any) -> bool:
    return v is None or (isinstance(v, dict) and _is_number(v.get("threshold")))


_MAPPING: _Check = (lambda v: isinstance(v, dict), "a mapping")
_INT: _Check = (_is_int, "an integer")
_STR: _Check = (lambda v: isinstance(v, str), "a string")

# Every field a consumer reads, checked whenever it is present (dotted names reach into a mapping).
FIELDS: dict[str, _Check] = {
    "model": (_is_tensor_dict, "a non-empty dict of named tensors (the state dict)"),
    "model_name": (lambda v: isinstance(v, str) and bool(v), "a model name (a string)"),
    "model_args": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a mapping of arguments"),
    "config": _MAPPING,
    "preprocessing": _MAPPING,
    "task": _STR,
    "label_names": (_is_label_map, "a mapping of label numbers to names"),
    "mask_label_names": (_is_label_map, "a mapping of label numbers to names"),
    "mask_kinds": (_is_label_map, "a mapping of label numbers to kinds"),
    "operating_point": (_is_operating_point, "null or a mapping with a numeric threshold"),
    "calibration": _MAPPING,
    "scope": _MAPPING,
    "versions": _MAPPING,
    "manifest_sha256": _STR,
    DIGEST_KEY: (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None, "a SHA-256 hex"),
    "seed": _INT,
    "world_size": _INT,
    "epoch": (lambda v: _is_int(v) and v >= 0, "a whole number"),
    "stage": (lambda v: _is_int(v) and v >= 0, "a whole number"),
    "stage_epoch": (lambda v: _is_int(v) and v >= 0, "a whole number"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v), "a list of epoch records"),
    "best": _MAPPING,
    "best.value": (lambda v: v is None or _is_number(v), "null or a number"),
    "best.epoch": (lambda v: v is None or _is_int(v), "null or an integer"),
    "best.bad_epochs": _INT,
    "optimizer": _MAPPING,
    "scheduler": _MAPPING,
    "rng": _MAPPING,
    "rng.python": (lambda v: isinstance(v, list) and len(v) > 2, "a list (Python's generator state)"),
    "rng.numpy": (lambda v: isinstance(v, torch.Tensor), "a tensor (NumPy's generator state)"),
    "rng.numpy_pos": _INT,
    "rng.torch": (lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8, "a uint8 tensor"),
}
# What every use needs (rebuild the network and its preprocessing), and what --resume needs besides.
REQUIRED = ("model", "model_name", "model_args", "preprocessing")
RESUME_REQUIRED = (
    *REQUIRED,
    "config",
    "epoch",
    "stage",
    "stage_epoch",
    "history",
    "best",
    "best.value",
    "best.epoch",
    "best.bad_epochs",
    "optimizer",
    "scheduler",
    "rng",
    "rng.python",
    "rng.numpy",
    "rng.numpy_pos",
    "rng.torch",
)
_EDITED_FIX = "the file was edited or damaged: re-copy it, or use a best.pt/last.pt written by medhybrid train"


def _lookup(ckpt: Mapping[str, Any], name: str) -> tuple[bool, Any]:
    node: Any = ckpt
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_checkpoint(ckpt: Any, path: Path, require: Sequence[str] = REQUIRED) -> dict[str, Any]:
    """``ckpt`` as a checked medhybrid checkpoint: its format, the fields in ``require`` present, every
    field of :data:`FIELDS` of its type, and its weights matching the digest recorded at save time.
    Returns it with ``weights_sha256`` set (computed, with a warning, for a checkpoint without one).

    Raises:
        CheckpointError: not a medhybrid checkpoint, a newer format, a missing or mistyped field (named),
            or weights that differ from the recorded digest.
    """
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            "not a medhybrid checkpoint", path=path, fix="give a best.pt/last.pt written by medhybrid train"
        )
    version = ckpt.get("format_version", 0)
    if not _is_int(version):
        raise CheckpointError(f"field 'format_version' must be an integer, got {version!r}", path=path, fix=_EDITED_FIX)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format {version} is newer than this medhybrid ({FORMAT_VERSION})",
            path=path,
            fix="upgrade medhybrid",
        )
    for name in dict.fromkeys((*require, *FIELDS)):
        present, value = _lookup(ckpt, name)
        if not present:
            if name in require:
                raise CheckpointError(f"field {name!r} is missing", path=path, fix=_EDITED_FIX)
            continue
        test, what = FIELDS[name]
        if not test(value):
            raise CheckpointError(f"field {name!r} must be {what}, got {_describe(value)}", path=path, fix=_EDITED_FIX)
    if "model" not in ckpt:
        return ckpt
    digest = weights_digest(ckpt["model"])
    recorded = ckpt.get(DIGEST_KEY)
    if recorded is None:
        logger.warning(
            "%s: no weights digest recorded (saved by an older medhybrid): its integrity cannot be checked", path
        )
    elif recorded != digest:
        raise CheckpointError(
            "weights do not match the digest recorded when it was saved: the file is corrupt or was edited",
            path=path,
            fix="re-copy it or retrain",
        )
    ckpt[DIGEST_KEY] = digest
    return ckpt


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        kinds = sorted({type(v).__name__ for v in value.values()})
        return f"a dict of {', '.join(kinds) or 'nothing'}"
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", *, require: Sequence[str] = REQUIRED
) -> dict[str, Any]:
    """Load a medhybrid checkpoint with ``weights_only=True`` and check it (:func:`check_checkpoint`).

    Args:
        require: the fields that must be present: :data:`REQUIRED` (what inference needs) by default,
            :data:`RESUME_REQUIRED` to continue training from it.

    Raises:
        CheckpointError: missing or unreadable file, a file that would run code when unpickled, not a
            medhybrid checkpoint, a missing or mistyped field, or weights that differ from their digest.
    """
    path = Path(path)
    return upgrade_model_args(check_checkpoint(_torch_load(path, map_location), path, require))


def upgrade_model_args(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Fill in the model arguments whose defaults changed after the checkpoint's format version
    (:data:`LEGACY_HYBRID_ARGS`), for hybrids; arguments the checkpoint records are kept."""
    from medhybrid.errors import ModelError
    from medhybrid.models.registry import get_entry

    version = int(ckpt.get("format_version", 0))
    if "model_args" not in ckpt or version >= FORMAT_VERSION:
        return ckpt
    try:
        hybrid = get_entry(str(ckpt.get("model_name"))).family == "hybrid"
    except ModelError:  # an unknown model: rebuilding it reports that
        return ckpt
    if hybrid:
        legacy: dict[str, Any] = {}
        for v in range(max(version, 1), FORMAT_VERSION):
            legacy.update(LEGACY_HYBRID_ARGS.get(v, {}))
        ckpt["model_args"] = {**legacy, **ckpt["model_args"]}
    return ckpt


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    """The one ``torch.load`` of medhybrid: ``weights_only=True``, every failure a :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError("file not found", path=path, fix="check the path")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for bad files
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or "Weights only load failed" in text:
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"refused by torch.load(weights_only=True): it holds pickled Python objects{what}, which could "
                "run code when loaded",
                path=path,
                fix="load only files from a trusted source; give a best.pt/last.pt written by medhybrid train or "
                "a plain state dict (torch.save(model.state_dict()))",
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot be loaded with weights_only=True ({first[:200]})",
            path=path,
            fix="give a PyTorch state dict or checkpoint saved with torch.save (no pickled objects)",
        ) from None


# --- pretrained weights ------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: loaded keys and the ones it could not use."""

    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

        parts = [f"layout {self.layout}: loaded {len(self.loaded)} tensors"]
        if self.missing:
            parts.append(f"missing {len(self.missing)} (kept initialised): {few(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} (ignored): {few(self.unexpected)}")
        if self.mismatched:
            parts.append(f"shape mismatch {len(self.mismatched)} (ignored): {few(self.mismatched)}")
        return "; ".join(parts)


# torchvision, MONAI and MedicalNet ResNets share one layout: conv1/bn1 stem, layer1..4, fc.
_RESNET_STEM = {"conv1.": "stem.0.", "bn1.": "stem.1."}
_RESNET_LAYER = re.compile(r"^layer([1-4])\.")


def unwrap_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensor dict inside a file: a medhybrid checkpoint, ``{"state_dict"|"model"|"net": ...}``, or
    a bare state dict; DataParallel/DDP ``module.`` prefixes stripped."""
    source = "state dict"
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj, source = obj["model"], "medhybrid checkpoint"
    else:
        for key in ("state_dict", "model", "net", "model_state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj, source = obj[key], f"'{key}' entry"
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            "holds no state dict of tensors", path=path, fix="save model.state_dict() with torch.save"
        )
    return {re.sub(r"^(module\.)+", "", k): v for k, v in obj.items()}, source


def remap_keys(state: dict[str, torch.Tensor], target_keys: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Rename a known foreign layout onto medhybrid's names.

    - ``medhybrid``: keys already match (or match under ``encoder.``);
    - ``resnet`` (torchvision 2D, MONAI 3D, MedicalNet 3D): ``conv1/bn1`` -> ``encoder.stem.0/1``,
      ``layerN.`` -> ``encoder.stages.N-1.``; the classifier (``fc``, ``conv_seg``) is dropped.
    """
    if len(set(state) & target_keys) >= max(1, len(state) // 2):
        return state, "medhybrid"
    enc = {f"encoder.{k}": v for k, v in state.items()}
    if len(set(enc) & target_keys) >= max(1, len(state) // 2):
        return enc, "medhybrid encoder"
    if any(_RESNET_LAYER.match(k) for k in state):
        out: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            if k.startswith(("fc.", "conv_seg.")):
                continue
            for old, new in _RESNET_STEM.items():
                if k.startswith(old):
                    k = new + k[len(old) :]
                    break
            k = _RESNET_LAYER.sub(lambda m: f"stages.{int(m.group(1)) - 1}.", k)
            out[f"encoder.{k}"] = v
        return out, "resnet (torchvision / MONAI / MedicalNet)"
    return state, "unknown"


def load_pretrained(model: nn.Module, path: Path) -> LoadReport:
    """Load local weights into ``model`` (non-strict), remapping known layouts; tensors whose shape
    differs are skipped and reported, never half-copied.

    Raises:
        CheckpointError: unreadable file, one that would run code when unpickled, a medhybrid checkpoint that
            fails its checks (:func:`check_checkpoint`), no state dict inside, or not one tensor usable.
    """
    path = Path(path)
    obj = _torch_load(path, "cpu")
    if isinstance(obj, dict) and obj.get("format") == FORMAT:  # a medhybrid checkpoint: checked like any load
        obj = check_checkpoint(obj, path, require=("model",))
    state, source = unwrap_state_dict(obj, path)
    target = model.state_dict()
    state, layout = remap_keys(state, set(target))
    report = LoadReport(layout=f"{layout} from {source}")
    usable: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k not in target:
            report.unexpected.append(k)
        elif target[k].shape != v.shape:
            report.mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}")
        else:
            usable[k] = v
    report.loaded = sorted(usable)
    report.missing = sorted(k for k in target if k not in usable and not k.endswith("num_batches_tracked"))
    if not usable:
        raise CheckpointError(
            f"no tensor matches the model ({report.summary()})",
            path=path,
            fix="give weights of the same architecture (a medhybrid, MONAI, MedicalNet or torchvision ResNet)",
        )
    model.load_state_dict(usable, strict=False)
    return report
