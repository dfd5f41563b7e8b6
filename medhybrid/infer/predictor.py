"""A trained model, ready to infer: weights, the checkpoint's own preprocessing, the operating point.

``Predictor.load(RUN_DIR | CHECKPOINT)`` rebuilds the network from the checkpoint (``weights_only``),
and the inference transforms from the ``data`` section stored in it, so a study is preprocessed exactly
as in training. ``predict(study)`` returns the class probabilities, the mask probabilities and the
saliency maps on the model's grid, plus that grid's affine, which :mod:`medhybrid.infer.resample` uses to
bring everything back to the scan.

Volumes are inferred whole when the model was trained on whole (resized) images, and with MONAI's
``sliding_window_inference`` (Gaussian-weighted, 50 % overlap) over patches of the training patch size
when it was trained on patches; saliency is computed per window and blended the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from medhybrid.config import DataConfig
from medhybrid.data.transforms import IMAGE, apply, build_transforms, patch_sampling
from medhybrid.errors import CheckpointError
from medhybrid.infer.saliency import SALIENCY_METHODS, Explainer
from medhybrid.io.study import Study
from medhybrid.models.base import MedModel
from medhybrid.models.registry import create_model
from medhybrid.runtime import autocast
from medhybrid.train.checkpoint import load_checkpoint, sha256_file
from medhybrid.train.evaluate import abnormality
from medhybrid.train.records import BEST_FILE

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5


@dataclass
class Prediction:
    """What the model says about one study, on the model's grid.

    Attributes:
        probability: probability of abnormality (``1 - p(class 0)``; for a segmentation-only model, the
            largest foreground probability of any voxel).
        class_probs: probability per class, or None without a classification head.
        seg_probs: ``(S, *spatial)`` softmax of the mask, or None without a decoder.
        saliency: method -> ``(1, *spatial)`` map in [0, 1].
        affine: voxel-to-RAS affine of the model grid.
        timings: seconds per step (``preprocess``, ``model``).
    """

    probability: float
    class_probs: np.ndarray | None
    seg_probs: torch.Tensor | None
    saliency: dict[str, torch.Tensor]
    affine: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Prepared:
    """A preprocessed study: the model input ``(1, C, *spatial)``, its grid's affine, the time it took."""

    x: torch.Tensor
    affine: np.ndarray
    seconds: float


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError("CUDA is not available on this machine", fix="use --device cpu")
    return torch.device(name)


class Predictor:
    """One trained model and its preprocessing (see the module docstring)."""

    def __init__(
        self,
        checkpoint: Path,
        *,
        device: str = "auto",
        tta: bool = False,
        saliency: tuple[str, ...] = SALIENCY_METHODS,
        threshold: float | None = None,
        temperature: float | None = None,
    ) -> None:
        self.path = resolve_checkpoint(checkpoint)
        self.device = resolve_device(device)
        ckpt = load_checkpoint(self.path, map_location="cpu")
        try:
            model = create_model(ckpt["model_name"], **ckpt["model_args"])
            model.load_state_dict(ckpt["model"])
            self.data_cfg = DataConfig.model_validate(ckpt["preprocessing"])
        except Exception as exc:  # an edited or foreign checkpoint: say which file, not a traceback
            raise CheckpointError(
                f"cannot rebuild the model from it ({type(exc).__name__}: {str(exc)[:200]})",
                path=self.path,
                fix="use a checkpoint written by this medhybrid version's `medhybrid train`",
            ) from None
        self.model: MedModel = model.to(self.device).eval()
        self.model_name: str = ckpt["model_name"]
        self.model_args: dict[str, Any] = dict(ckpt["model_args"])
        self.task: str = ckpt.get("task", self.data_cfg.task)
        self.config: dict[str, Any] = dict(ckpt.get("config") or {})
        self.label_names = {int(k): str(v) for k, v in (ckpt.get("label_names") or {}).items()}
        self.mask_label_names = {int(k): str(v) for k, v in (ckpt.get("mask_label_names") or {}).items()}
        self.weights_sha256 = sha256_file(self.path)
        self.tta = tta
        self.transform = build_transforms(self.data_cfg, "infer")
        self.sliding = patch_sampling(self.data_cfg)
        self.explainer = Explainer(self.model, saliency)
        # Temperature scaling and the operating point of calibrated probabilities, stored by
        # `medhybrid evaluate` (fitted on the validation split); they replace training's uncalibrated one.
        calibration = ckpt.get("calibration") or {}
        self.calibration: dict[str, Any] = dict(calibration)
        fitted = float(calibration.get("temperature", 1.0))
        self.temperature = fitted if temperature is None else float(temperature)
        # each stored threshold belongs to the probabilities it was chosen on: calibrated or raw (T = 1)
        if self.temperature == fitted and calibration.get("operating_point"):
            stored = calibration["operating_point"]
        elif self.temperature == 1.0:
            stored = ckpt.get("operating_point")
        else:
            stored = None
        if threshold is not None:
            self.operating_point: dict[str, Any] = {"threshold": float(threshold), "method": "command line"}
        elif stored:
            self.operating_point = dict(stored)
        else:
            self.operating_point = {"threshold": DEFAULT_THRESHOLD, "method": "default (none stored in checkpoint)"}
        self.card = _model_card(ckpt, self)

    @property
    def threshold(self) -> float:
        return float(self.operating_point["threshold"])

    @property
    def saliency_methods(self) -> tuple[str, ...]:
        return self.explainer.methods

    def preprocess(self, study: Study) -> Prepared:
        """The checkpoint's inference transforms applied to a loaded study (no model involved, so this
        may run in another thread while the model works on the previous study)."""
        t0 = time.perf_counter()
        image = apply(self.transform, {IMAGE: study})[IMAGE]
        affine = np.asarray(image.affine, dtype=np.float64)
        tensor = image.as_tensor() if hasattr(image, "as_tensor") else image
        return Prepared(tensor[None].to(torch.float32), affine, time.perf_counter() - t0)

    def predict(self, study: Study) -> Prediction:
        """Preprocess and run the model (with saliency, and flip TTA if enabled) on one study."""
        return self.run(self.preprocess(study))

    def run(self, prepared: Prepared, *, explain: bool = True) -> Prediction:
        """The model on a preprocessed study: probabilities, mask probabilities, saliency (skipped, with
        its backward pass, when ``explain`` is False)."""
        t1 = time.perf_counter()
        x = prepared.x.to(self.device)
        explained = self._explained(x) if explain else self._plain(x)
        probs = explained.get("probs")
        seg = explained.get("seg")
        if self.tta:
            probs, seg = self._tta(x, probs, seg)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if probs is not None:
            class_probs: np.ndarray | None = probs[0].cpu().numpy().astype(np.float64)
            probability = float(abnormality(class_probs[None])[0])  # type: ignore[index]
        else:
            class_probs = None
            assert seg is not None
            probability = float(seg[0, 1:].max().item())
        return Prediction(
            probability=probability,
            class_probs=class_probs,
            seg_probs=seg[0].cpu() if seg is not None else None,
            saliency={m: explained[m][0].cpu() for m in self.saliency_methods if m in explained},
            affine=prepared.affine,
            timings={"preprocess": prepared.seconds, "model": t2 - t1},
        )

    # --- model passes ------------------------------------------------------------------------------
    def _explained(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One pass with saliency: ``probs`` (B, C), ``seg`` (B, S, *spatial) and the saliency maps."""
        if not self.sliding:
            return self._window(x)
        assert self.data_cfg.patch_size is not None
        out = sliding_window_inference(
            x,
            roi_size=self.data_cfg.patch_size,
            sw_batch_size=1,  # saliency is per window; batch 1 keeps Grad-CAM's normalisation per window
            predictor=self._window,
            overlap=0.5,
            mode="gaussian",
        )
        assert isinstance(out, dict)
        return {str(k): v for k, v in out.items()}

    def _window(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(self.device):
            result = self.explainer(x)
        return {**_probabilities(result.pop("outputs"), self.temperature), **result}

    @torch.no_grad()
    def _plain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Probabilities without saliency (the TTA passes)."""

        def run(t: torch.Tensor) -> dict[str, torch.Tensor]:
            with autocast(self.device):
                return _probabilities(self.model(t), self.temperature)

        if not self.sliding:
            return run(x)
        assert self.data_cfg.patch_size is not None
        out = sliding_window_inference(
            x, roi_size=self.data_cfg.patch_size, sw_batch_size=4, predictor=run, overlap=0.5, mode="gaussian"
        )
        assert isinstance(out, dict)
        return {str(k): v for k, v in out.items()}

    def _tta(
        self, x: torch.Tensor, probs: torch.Tensor | None, seg: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Average the probabilities over the identity and a flip along each spatial axis (written here:
        MONAI's ``TestTimeAugmentation`` runs random transforms and inverts them per sample, which is far
        more than flips need)."""
        n = 1
        probs_sum = probs.clone() if probs is not None else None
        seg_sum = seg.clone() if seg is not None else None
        for axis in range(2, x.ndim):
            out = self._plain(torch.flip(x, dims=(axis,)))
            if probs_sum is not None:
                probs_sum += out["probs"]
            if seg_sum is not None:
                seg_sum += torch.flip(out["seg"], dims=(axis,))
            n += 1
        return (
            probs_sum / n if probs_sum is not None else None,
            seg_sum / n if seg_sum is not None else None,
        )


def _probabilities(outputs: dict[str, torch.Tensor], temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Softmax of a model's outputs: ``probs`` ``(B, C)`` from ``logits / temperature``, ``seg`` from
    ``seg_logits`` (the temperature calibrates the study-level probability only)."""
    out: dict[str, torch.Tensor] = {}
    if "logits" in outputs:
        out["probs"] = torch.softmax(outputs["logits"].float() / temperature, 1)
    if "seg_logits" in outputs:
        out["seg"] = torch.softmax(outputs["seg_logits"].float(), 1)
    return out


def _model_card(ckpt: dict[str, Any], predictor: Predictor) -> dict[str, Any]:
    """What a reader of a report should know about the model (no patient data: the checkpoint has none)."""
    history = ckpt.get("history") or []
    best = ckpt.get("best") or {}
    best_epoch = best.get("epoch")
    record = next((r for r in history if r.get("epoch") == best_epoch), history[-1] if history else {})
    config = ckpt.get("config") or {}
    return {
        "model_name": predictor.model_name,
        "task": predictor.task,
        "label_names": predictor.label_names,
        "mask_label_names": predictor.mask_label_names,
        "pipeline": config.get("name"),
        "trained_epochs": ckpt.get("epoch"),
        "best_epoch": best_epoch,
        "validation": {
            k[4:]: v for k, v in record.items() if k.startswith("val_") and isinstance(v, (int, float, list))
        },
        "manifest_sha256": ckpt.get("manifest_sha256"),
        "calibration": {k: v for k, v in (ckpt.get("calibration") or {}).items() if k != "operating_point"},
        "preprocessing": {
            k: ckpt["preprocessing"].get(k)
            for k in ("spatial_dims", "modality", "intensity", "spacing", "orientation", "spatial_size", "patch_size")
            if k in ckpt["preprocessing"]
        },
        "versions": ckpt.get("versions") or {},
        "intended_use": (
            "Research use only: decision support for radiologist review, not a diagnosis. Validated only on data "
            "like its training manifest; check the QC flags and the images."
        ),
    }
