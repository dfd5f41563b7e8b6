"""Saliency of a volume inferred by sliding windows is blended raw and normalised once per study.

Normalising each window to its own [0, 1] (MONAI's Grad-CAM default, or ``normalise`` per window) gives
every window a bright spot whether it holds evidence or not, and the blended map shows the patch grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from medhybrid.config import DataConfig
from medhybrid.infer.loading import Member
from medhybrid.infer.predictor import Predictor, Prepared
from medhybrid.infer.saliency import Explainer
from medhybrid.models.registry import create_model
from medhybrid.train.checkpoint import save_checkpoint


class Evidence(nn.Module):
    """A segmenter whose foreground log-odds are the local mean brightness: its evidence is where the image
    is bright. One bias-free convolution with positive weights is its whole encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.stages = nn.ModuleList([nn.Conv3d(1, 4, 3, padding=1, bias=False)])
        with torch.no_grad():
            self.encoder.stages[0].weight.fill_(1.0 / 27)
        self.num_classes, self.seg_classes = 0, 2

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fg = 10.0 * torch.relu(self.encoder.stages[0](x)).mean(1, keepdim=True)
        return {"seg_logits": torch.cat([-fg, fg], 1)}


def predictor_with(model: nn.Module, tmp: Path) -> Predictor:
    cfg = DataConfig.model_validate(
        {
            "manifest": str(tmp / "m.csv"),
            "task": "segmentation",
            "spatial_dims": 3,
            "spatial_size": [64, 32, 32],
            "patch_size": [32, 32, 32],
        }
    )
    tiny = create_model("hybrid_tiny_3d", num_classes=0, seg_classes=2, img_size=[32, 32, 32])
    path = tmp / "seg.pt"
    save_checkpoint(
        path,
        {
            "model_name": "hybrid_tiny_3d",
            "model_args": {"num_classes": 0, "seg_classes": 2, "img_size": [32, 32, 32]},
            "model": tiny.state_dict(),
            "preprocessing": cfg.model_dump(mode="json"),
            "task": "segmentation",
            "mask_label_names": {0: "background", 1: "lesion"},
            "mask_kinds": {1: "lesion"},
        },
    )
    predictor = Predictor(path, device="cpu", saliency=("gradcam",))
    assert predictor.window == (32, 32, 32)  # the training patch
    member = predictor.members[0]
    predictor.members = [Member(member.path, model.eval(), Explainer(model, ("gradcam",)), member.ckpt, member.digest)]
    return predictor


def test_a_window_without_evidence_stays_dark(tmp_path: Path) -> None:
    x = torch.rand(1, 1, 64, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.01  # faint noise
    x[0, 0, 4:12, 8:24, 8:24] = 1.0  # the evidence, inside the first window only (windows start at 0, 16, 32)
    predictor = predictor_with(Evidence(), tmp_path)
    pred = predictor.run(Prepared(x, np.eye(4), np.eye(4), 0.0))
    cam = pred.saliency["gradcam"][0]
    assert cam.shape == (64, 32, 32) and float(cam.max()) == 1.0 and float(cam.min()) == 0.0
    assert float(cam[4:12, 8:24, 8:24].mean()) > 0.5  # bright on the evidence
    # the last window (x >= 48) holds only noise: ~1 % of the evidence's strength, not its own max of 1
    assert float(cam[48:].max()) < 0.05, float(cam[48:].max())
