"""A trained model, ready to infer: weights, the checkpoint's own preprocessing, the operating point.

``Predictor(RUN_DIR | CHECKPOINT)`` rebuilds the network(s) (:mod:`medhybrid.infer.loading`; a
cross-validation run is the ensemble of its fold models) and the inference transforms from the ``data``
section stored in the checkpoint, so a study is preprocessed exactly as in training. ``predict(study)``
returns the class probabilities, the mask probabilities and the saliency maps on the model's grid, plus
that grid's affine and the frame it lives in, which :mod:`medhybrid.infer.resample` uses to bring
everything back to the scan.

A model preprocessed at a physical spacing covers the whole scan: windows of its training input size
(the patch for segmentation, ``spatial_size`` otherwise) slide over the field of view
(:mod:`medhybrid.infer.windows`: masks and maps blended, the study's logits from the window with the
strongest evidence of abnormality). A model trained on images cropped or padded to one size (no
``spacing``: MedMNIST-style) sees that one input, and the scope's field-of-view rule says when it is not
the whole scan. Saliency maps are raw per window; they are blended like the masks and normalised to
[0, 1] once per study, so a window without evidence stays dark.

Combining passes (flip TTA, ensemble members): classification **logits** are averaged (so the stored
temperature divides the logits the model really produced), mask probabilities are averaged, raw saliency
maps are averaged. The study's score is ``1 - p(normal)`` for a classifier; for a segmentation-only model
it is :func:`medhybrid.evaluate.study_score.lesion_score` over its lesion labels, and there is none when
every label is anatomy (no abnormality verdict).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medhybrid.config import DataConfig, EvalConfig
from medhybrid.data.transforms import IMAGE, apply, build_transforms, frame_affine, model_window
from medhybrid.evaluate.study_score import LESION_SCORE_METHOD, lesion_labels, lesion_score, resolve_mask_kinds
from medhybrid.infer.card import model_card
from medhybrid.infer.loading import (
    Member,
    check_members,
    ensemble_digest,
    load_member,
    resolve_device,
    resolve_model,
)
from medhybrid.infer.resample import lift_affine
from medhybrid.infer.saliency import SALIENCY_METHODS, Explainer, normalise
from medhybrid.infer.scope import scope_from_checkpoint
from medhybrid.infer.window_saliency import explain_windows
from medhybrid.infer.windows import fits, windowed
from medhybrid.io.study import Study, spacing_from_affine
from medhybrid.models.base import MedModel
from medhybrid.runtime import autocast
from medhybrid.train.checkpoint import read_calibration
from medhybrid.train.evaluate import abnormality

logger = logging.getLogger(__name__)
# windows per model call over a large scan; 16 against 4: -14 % forward, -27 % with saliency for the demo
# model on 2 cores (docs/benchmarks.md)
SW_BATCH = 16

DEFAULT_THRESHOLD = 0.5


@dataclass
class Prediction:
    """What the model says about one study, on the model's grid.

    Attributes:
        probability: the study's score: probability of abnormality ``1 - p(class 0)`` for a classifier,
            the lesion score for a segmentation-only lesion model, None when there is no verdict to give
            (a segmentation model of anatomy only).
        class_probs: probability per class (temperature applied), or None without a classification head.
        logits: the classification logits before the temperature (averaged over TTA flips and ensemble
            members), or None.
        seg_probs: ``(S, *spatial)`` softmax of the mask, or None without a decoder.
        saliency: method -> ``(1, *spatial)`` map in [0, 1], normalised once for the study.
        affine: affine of the model grid, in the preprocessing frame (4x4, or 3x3 for 2D).
        native_affine: the study's affine in that same frame (RAS in 3D, display frame in 2D): model
            outputs go back to the scan with ``to_native(..., affine, native_affine, ...)``.
        timings: seconds per step (``preprocess``, ``model``).
    """

    probability: float | None
    class_probs: np.ndarray | None
    logits: np.ndarray | None
    seg_probs: torch.Tensor | None
    saliency: dict[str, torch.Tensor]
    affine: np.ndarray
    native_affine: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Prepared:
    """A preprocessed study: the model input ``(1, C, *spatial)``, its grid's affine, the study's affine in
    the same frame (see :class:`Prediction`), the time it took."""

    x: torch.Tensor
    affine: np.ndarray
    native_affine: np.ndarray
    seconds: float


class Predictor:
    """One trained model, or the ensemble of a cross-validation run, and its preprocessing."""

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
        source = resolve_model(checkpoint)
        self.path = source.path
        self.device = resolve_device(device)
        self.members: list[Member] = [load_member(p, self.device, saliency) for p in source.members]
        check_members(self.members, self.path)
        ckpt = self.members[0].ckpt
        self.ensemble = source.ensemble
        self.model: MedModel = self.members[0].model
        self.model_name: str = ckpt["model_name"]
        self.model_args: dict[str, Any] = dict(ckpt["model_args"])
        self.data_cfg = DataConfig.model_validate(ckpt["preprocessing"])
        self.task: str = ckpt.get("task", self.data_cfg.task)
        self.config: dict[str, Any] = dict(ckpt.get("config") or {})
        self.label_names = {int(k): str(v) for k, v in (ckpt.get("label_names") or {}).items()}
        self.mask_label_names = {int(k): str(v) for k, v in (ckpt.get("mask_label_names") or {}).items()}
        stored_kinds = ckpt.get("mask_kinds")
        self.mask_kinds = (
            {int(k): str(v) for k, v in stored_kinds.items()}
            if stored_kinds is not None
            else resolve_mask_kinds(self.mask_label_names)  # checkpoints from before mask kinds: lesions
        )
        self.eval_cfg = EvalConfig.model_validate(self.config.get("eval") or {})
        self.weights_sha256 = ensemble_digest(self.members)
        self.tta = tta
        self.transform = build_transforms(self.data_cfg, "infer")
        self.window = model_window(self.data_cfg)  # None: inputs are cropped/padded to one size
        self.classifies = self.model.num_classes > 0
        self.lesions = [] if self.classifies else lesion_labels(self.mask_kinds)
        # what the study's score is: a classifier's probability, a lesion score, or nothing
        self.score_method: str | None = (
            "classifier" if self.classifies else LESION_SCORE_METHOD if self.lesions else None
        )
        # Temperature scaling and the operating point of calibrated probabilities, stored by
        # `medhybrid evaluate` (or `train --folds` for an ensemble) in a sidecar; they replace training's.
        legacy = ckpt.get("calibration") if self.ensemble is None else None
        self.calibration = read_calibration(self.path, self.weights_sha256, legacy)
        fitted = float(self.calibration.get("temperature", 1.0))
        self.temperature = fitted if temperature is None else float(temperature)
        # each stored threshold belongs to the scores it was chosen on: calibrated or raw (T = 1)
        if self.temperature == fitted and self.calibration.get("operating_point"):
            stored = self.calibration["operating_point"]
        elif self.temperature == 1.0 and self.ensemble is None:
            stored = ckpt.get("operating_point")
        else:
            stored = None
        if threshold is not None:
            self.operating_point: dict[str, Any] = {"threshold": float(threshold), "method": "command line"}
        elif stored:
            self.operating_point = dict(stored)
        else:
            self.operating_point = {"threshold": DEFAULT_THRESHOLD, "method": "default (none stored in checkpoint)"}
        self.scope = scope_from_checkpoint(ckpt)  # what it may assess (medhybrid/infer/scope.py)
        self.card = model_card(self)
        self._quiet: dict[int, Explainer] = {}

    @property
    def threshold(self) -> float:
        return float(self.operating_point["threshold"])

    def one_window(self, x: torch.Tensor) -> bool:
        """True when the preprocessed input ``x`` is a single model window (no sliding)."""
        return fits(x, self.window)

    @property
    def saliency_methods(self) -> tuple[str, ...]:
        return self.members[0].explainer.methods

    def preprocess(self, study: Study) -> Prepared:
        """The checkpoint's inference transforms applied to a loaded study (no model involved, so this
        may run in another thread while the model works on the previous study)."""
        t0 = time.perf_counter()
        image = apply(self.transform, {IMAGE: study})[IMAGE]
        affine = np.asarray(image.affine, dtype=np.float64)
        tensor = image.as_tensor() if hasattr(image, "as_tensor") else image
        native = frame_affine(study.affine, self.data_cfg.spatial_dims)
        return Prepared(tensor[None].to(torch.float32), affine, native, time.perf_counter() - t0)

    def predict(self, study: Study) -> Prediction:
        """Preprocess and run the model (with saliency, and flip TTA if enabled) on one study."""
        return self.run(self.preprocess(study))

    def run(self, prepared: Prepared, *, explain: bool = True) -> Prediction:
        """The model(s) on a preprocessed study: scores, mask probabilities, saliency (skipped, with its
        backward pass, when ``explain`` is False)."""
        t1 = time.perf_counter()
        x = prepared.x.to(self.device)
        passes = [self._member_pass(m, x, explain) for m in self.members]
        if self.tta:
            passes += [self._flipped(m, x, axis) for m in self.members for axis in range(2, x.ndim)]
        logits = _mean([p["logits"] for p in passes if "logits" in p])
        seg = _mean([p["seg"] for p in passes if "seg" in p])
        saliency = {}
        for method in self.saliency_methods:
            maps = [p[method] for p in passes if method in p]
            if maps:
                saliency[method] = normalise(_mean(maps))[0].cpu()  # type: ignore[arg-type]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        class_probs = raw_logits = None
        probability: float | None = None
        if logits is not None:
            raw_logits = logits[0].cpu().numpy().astype(np.float64)
            class_probs = torch.softmax(logits[0] / self.temperature, 0).cpu().numpy().astype(np.float64)
            probability = float(abnormality(class_probs[None])[0])
        elif seg is not None and self.lesions:
            voxel_ml = float(np.prod(spacing_from_affine(lift_affine(prepared.affine)))) / 1000.0
            probability = lesion_score(seg[0], self.lesions, voxel_ml, self.eval_cfg.min_lesion_ml)
        return Prediction(
            probability=probability,
            class_probs=class_probs,
            logits=raw_logits,
            seg_probs=seg[0].cpu() if seg is not None else None,
            saliency=saliency,
            affine=prepared.affine,
            native_affine=prepared.native_affine,
            timings={"preprocess": prepared.seconds, "model": t2 - t1},
        )

    # --- model passes ------------------------------------------------------------------------------
    def _member_pass(self, member: Member, x: torch.Tensor, explain: bool) -> dict[str, torch.Tensor]:
        """One member on ``x``: ``logits`` (B, C) raw, ``seg`` (B, S, *spatial) probabilities, and (with
        ``explain``) the raw saliency maps (B, 1, *spatial)."""
        if explain and self._windows_explained_apart(member, x):
            quiet = self._forward_only(member)

            def forward(t: torch.Tensor) -> dict[str, torch.Tensor]:
                with autocast(self.device):
                    result = quiet(t)
                return {**_outputs(result.pop("outputs")), **result}

            def gradcam(t: torch.Tensor) -> torch.Tensor:
                with autocast(self.device):
                    return member.explainer(t)["gradcam"]

            return explain_windows(
                forward,
                gradcam,
                x,
                self.window,  # type: ignore[arg-type]
                threshold=self.threshold,
                temperature=self.temperature,
                overlap=self.eval_cfg.window_overlap,
                sw_batch_size=SW_BATCH,
            )
        if explain:

            def window(t: torch.Tensor) -> dict[str, torch.Tensor]:
                with autocast(self.device):
                    result = member.explainer(t)
                return {**_outputs(result.pop("outputs")), **result}

        else:

            @torch.no_grad()
            def window(t: torch.Tensor) -> dict[str, torch.Tensor]:
                with autocast(self.device):
                    return _outputs(member.model(t))

        # windows in batches of SW_BATCH, saliency too: in eval mode each window's Grad-CAM gradient is its own
        # (BatchNorm uses running statistics), so batching changes nothing but the speed
        return windowed(window, x, self.window, overlap=self.eval_cfg.window_overlap, sw_batch_size=SW_BATCH)

    def _windows_explained_apart(self, member: Member, x: torch.Tensor) -> bool:
        """Grad-CAM only on the windows that carry the score (:mod:`medhybrid.infer.window_saliency`): a
        classifier over more than one window."""
        return self.classifies and not self.one_window(x) and "gradcam" in member.explainer.methods

    def _forward_only(self, member: Member) -> Explainer:
        """``member``'s outputs and forward-only maps (attention rollout), without Grad-CAM; built once."""
        key = id(member)
        if key not in self._quiet:
            methods = tuple(m for m in member.explainer.methods if m != "gradcam")
            self._quiet[key] = Explainer(member.model, methods)
        return self._quiet[key]

    def _flipped(self, member: Member, x: torch.Tensor, axis: int) -> dict[str, torch.Tensor]:
        """A TTA pass on ``x`` flipped along ``axis`` (no saliency), its mask flipped back.

        Written here: MONAI's ``TestTimeAugmentation`` runs random transforms and inverts them per sample,
        which is far more than flips need."""
        out = self._member_pass(member, torch.flip(x, dims=(axis,)), explain=False)
        if "seg" in out:
            out["seg"] = torch.flip(out["seg"], dims=(axis,))
        return out


def _outputs(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's outputs as the passes combine them: raw ``logits``, ``seg`` probabilities."""
    out: dict[str, torch.Tensor] = {}
    if "logits" in outputs:
        out["logits"] = outputs["logits"].float()
    if "seg_logits" in outputs:
        out["seg"] = torch.softmax(outputs["seg_logits"].float(), 1)
    return out


def _mean(values: list[torch.Tensor]) -> torch.Tensor | None:
    if not values:
        return None
    return values[0] if len(values) == 1 else torch.stack(values).mean(0)
