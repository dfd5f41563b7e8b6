"""From a path on disk to the trained model(s) behind it: one checkpoint, or the fold models of a
cross-validation run (an ensemble), with the calibration stored beside them.

What a path means:

- a ``.pt`` file: that checkpoint;
- a run folder of ``medhybrid train``: its ``best.pt``;
- a run folder of ``medhybrid train --folds K``: the ensemble of its K fold models
  (``ensemble.json`` lists them); their outputs are averaged (see :mod:`medhybrid.infer.predictor`).

Calibration (temperature and operating point) lives in a sidecar, never inside a checkpoint
(:func:`medhybrid.train.checkpoint.read_calibration`): ``best.calibration.json`` beside a checkpoint,
``ensemble.calibration.json`` beside ``ensemble.json``; each records the digest of the weights it was
fitted for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medhybrid.config import DataConfig, EvalConfig
from medhybrid.errors import CheckpointError
from medhybrid.infer.saliency import Explainer
from medhybrid.models.base import MedModel
from medhybrid.models.registry import create_model
from medhybrid.runtime import prefer_memory_format
from medhybrid.train.checkpoint import DIGEST_KEY, load_checkpoint
from medhybrid.train.records import BEST_FILE, ENSEMBLE_FILE

# What must agree between the members of an ensemble for their outputs to be averaged (the preprocessing
# apart from where its data came from: each fold has its own manifest).
_SHARED_KEYS = ("model_name", "preprocessing", "task", "label_names", "mask_label_names", "mask_kinds")
_PER_FOLD_DATA = ("manifest", "train_split", "val_split")


@dataclass
class ModelSource:
    """What a model path resolved to.

    Attributes:
        path: the checkpoint, or the ensemble file of a cross-validation run.
        members: the checkpoints to load (one, or the fold models).
        ensemble: the ``ensemble.json`` content, or None for a single checkpoint.
    """

    path: Path
    members: list[Path]
    ensemble: dict[str, Any] | None = None


@dataclass
class Member:
    """One loaded checkpoint: the network in eval mode, its explainer, the checkpoint's other content
    (without the weights) and the digest of its weights."""

    path: Path
    model: MedModel
    explainer: Explainer
    ckpt: dict[str, Any]
    digest: str


def resolve_checkpoint(path: Path) -> Path:
    """A run folder means its ``best.pt``; a file is taken as it is.

    Raises:
        CheckpointError: nothing usable at ``path``.
    """
    path = Path(path)
    if path.is_dir():
        best = path / BEST_FILE
        if not best.is_file():
            raise CheckpointError(
                f"run folder has no {BEST_FILE}", path=path, fix="give a finished training run or a .pt checkpoint"
            )
        return best
    if not path.is_file():
        raise CheckpointError("not found", path=path, fix="give a run folder or a .pt checkpoint")
    return path


def resolve_model(path: Path) -> ModelSource:
    """The checkpoint(s) a model path stands for (module docstring).

    Raises:
        CheckpointError: nothing usable at ``path``, or an ensemble file listing missing members.
    """
    path = Path(path)
    ensemble_file = path / ENSEMBLE_FILE if path.is_dir() else path if path.name == ENSEMBLE_FILE else None
    if ensemble_file is None or not ensemble_file.is_file():
        return ModelSource(resolve_checkpoint(path), [resolve_checkpoint(path)])
    try:
        ensemble = json.loads(ensemble_file.read_text(encoding="utf-8"))
        members = [ensemble_file.parent / str(m) for m in ensemble["members"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"not a readable ensemble file ({type(exc).__name__}: {exc})",
            path=ensemble_file,
            fix="rerun `medhybrid train --folds`",
        ) from None
    missing = [m for m in members if not m.is_file()]
    if missing or not members:
        raise CheckpointError(
            f"{len(missing)} of the {len(members)} fold models are missing",
            path=ensemble_file,
            files=missing,
            fix="finish the run with `medhybrid train PIPELINE --folds K --out RUN --resume`",
        )
    return ModelSource(ensemble_file, members, ensemble)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError("CUDA is not available on this machine", fix="use --device cpu")
    return torch.device(name)


def load_member(path: Path, device: torch.device, saliency: tuple[str, ...]) -> Member:
    """Load one checkpoint and rebuild its network. :func:`load_checkpoint` has refused pickled code,
    checked the weights against their digest and the type of every field; what is left to fail here is
    the content (an unknown model, weights of another shape, an invalid preprocessing section).

    Raises:
        CheckpointError: unreadable, or the network cannot be rebuilt from it.
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    try:
        model = create_model(ckpt["model_name"], **ckpt["model_args"])
        model.load_state_dict(ckpt["model"])
        DataConfig.model_validate(ckpt["preprocessing"])
        EvalConfig.model_validate((ckpt.get("config") or {}).get("eval") or {})
    except Exception as exc:  # an edited or foreign checkpoint: say which file, not a traceback
        raise CheckpointError(
            f"cannot rebuild the model from it ({type(exc).__name__}: {str(exc)[:200]})",
            path=path,
            fix="use a checkpoint written by this medhybrid version's `medhybrid train`",
        ) from None
    del ckpt["model"]
    digest = ckpt[DIGEST_KEY]  # verified (or, for an old checkpoint, computed) by load_checkpoint
    for key in ("optimizer", "scheduler", "rng"):  # not needed to infer; can be large
        ckpt.pop(key, None)
    model = prefer_memory_format(model.to(device)).eval()
    return Member(Path(path), model, Explainer(model, saliency), ckpt, digest)


def check_members(members: list[Member], where: Path) -> None:
    """Members of an ensemble must share architecture family, preprocessing and label semantics.

    Raises:
        CheckpointError: they do not.
    """

    def shared(ckpt: dict[str, Any], key: str) -> Any:
        value = ckpt.get(key)
        if key == "preprocessing" and isinstance(value, dict):
            return {k: v for k, v in value.items() if k not in _PER_FOLD_DATA}
        return value

    first = members[0].ckpt
    for m in members[1:]:
        differ = [k for k in _SHARED_KEYS if shared(m.ckpt, k) != shared(first, k)]
        if differ:
            raise CheckpointError(
                f"fold model {m.path.parent.name}/{m.path.name} differs from {members[0].path.parent.name}/"
                f"{members[0].path.name} in {differ}",
                path=where,
                fix="the fold models of one ensemble must come from one `medhybrid train --folds` run",
            )


def combined_digest(digests: list[str]) -> str:
    """The weights identity of a set of models: one member's digest, or a digest of all members' digests."""
    return digests[0] if len(digests) == 1 else hashlib.sha256("|".join(digests).encode()).hexdigest()


def ensemble_digest(members: list[Member]) -> str:
    return combined_digest([m.digest for m in members])


def checkpoints_digest(paths: list[Path]) -> str:
    """:func:`ensemble_digest` of checkpoints on disk, without building their networks."""
    return combined_digest([load_checkpoint(p)[DIGEST_KEY] for p in paths])
