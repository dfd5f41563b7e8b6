"""Training: pipelines end to end, checkpoints, exact resume after SIGKILL, DDP on 2 CPU ranks, staged
fine-tuning, pretrained weights, bad configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from medhybrid.cli import app
from medhybrid.config import DataConfig, load_pipeline
from medhybrid.data.synth import synthesize_cohort
from medhybrid.data.transforms import build_transforms
from medhybrid.errors import CheckpointError, ConfigError, TrainingError
from medhybrid.models import create_model
from medhybrid.train import load_checkpoint, load_pretrained, train
from medhybrid.train.data import GlobalBatchSampler, SeededDataset, class_weights, split_transforms
from medhybrid.train.optim import lr_factor, param_groups

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("epoch_seconds", "elapsed_seconds")


@pytest.fixture(scope="module")
def cohort2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize_cohort(tmp_path_factory.mktemp("c2d"), n=24, dims=2, fmt="nifti", seed=3)


def tiny_pipeline(tmp: Path, manifest: Path, **changes: Any) -> Path:
    """A 2D multitask pipeline that trains in seconds (group norm, no dropout: DDP-comparable)."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "data": {
            "manifest": str(manifest),
            "task": "multitask",
            "spatial_dims": 2,
            "intensity": "ct_soft_tissue",
            "spacing": [2.0, 2.0],
            "spatial_size": [64, 64],
            "augment": {
                "flip_prob": 0.5,
                "rotate_degrees": 15,
                "affine_prob": 0.5,
                "intensity_scale": 0.1,
                "intensity_prob": 0.5,
                "noise_std": 0.02,
            },
        },
        "model": {"name": "hybrid_tiny_2d", "args": {"norm": "group"}},
        "train": {
            "batch_size": 4,
            "stages": [
                {"name": "encoder", "epochs": 2, "lr": 0.003, "warmup_epochs": 1},
                {"name": "full", "epochs": 3, "lr": 0.001, "lr_scale": {"encoder": 0.1}},
            ],
        },
        "eval": {"metrics": ["auroc", "accuracy", "dice", "loss"], "select": "auroc"},
        "runtime": {"seed": 7, "threads": 1},
    }
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def strip_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


def run_cli(args: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medhybrid", *args], capture_output=True, text=True, env=env, cwd=REPO, **kw
    )


# --- the run folder -------------------------------------------------------------------------------


def test_tiny_run_writes_every_artifact(cohort2d: Path, tmp_path: Path) -> None:
    cfg = load_pipeline(tiny_pipeline(tmp_path, cohort2d))
    result = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "best.pt", "last.pt", "curves.png", "run.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3, 4, 5]
    assert [x["stage"] for x in lines] == ["encoder"] * 2 + ["full"] * 3
    for x in lines:
        assert 0.0 <= x["val_auroc"] <= 1.0 and 0.0 <= x["val_dice"] <= 1.0 and np.isfinite(x["train_loss"])
    # best.pt is the epoch with the highest validation AUROC (first one on ties).
    aurocs = [x["val_auroc"] for x in lines]
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == int(np.argmax(aurocs)) + 1 == result.best_epoch
    last = load_checkpoint(run / "last.pt")
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "rng",
        "config",
        "preprocessing",
        "label_names",
        "mask_label_names",
        "versions",
        "manifest_sha256",
        "seed",
        "history",
    ):
        assert key in last, key
    assert last["label_names"] == {0: "normal", 1: "abnormal"}  # the synthetic cohort's sidecar names
    assert last["mask_label_names"] == {0: "background", 1: "lesion"} and last["mask_kinds"] == {1: "lesion"}
    assert last["seed"] == 7 and len(last["manifest_sha256"]) == 64 and last["versions"]["torch"]
    # The resolved config round-trips, and the stored preprocessing rebuilds the inference transforms.
    assert load_pipeline(run / "config.yaml").to_dict() == cfg.to_dict()
    infer_tf = build_transforms(DataConfig.model_validate(last["preprocessing"]), "infer")
    sample = infer_tf({"image": str(cohort2d.parent / "nifti" / "synth_0000.nii.gz")})
    assert tuple(sample["image"].shape) == (1, 64, 64)
    # The model rebuilds from the checkpoint alone.
    model = create_model(last["model_name"], **last["model_args"])
    model.load_state_dict(last["model"])
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["epochs_run"] == 5
    assert manifest["files"]["best.pt"]["sha256"] and manifest["best_epoch"] == result.best_epoch


def test_checkpoint_loads_weights_only_and_rejects_others(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"format": "medhybrid-checkpoint", "evil": Path("/etc")}, bad)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a medhybrid checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_existing_run_needs_resume_and_same_config(cohort2d: Path, tmp_path: Path) -> None:
    pipe = tiny_pipeline(tmp_path, cohort2d, **{"train.stages": [{"epochs": 1}]})
    train(load_pipeline(pipe), tmp_path / "run")
    with pytest.raises(TrainingError, match="already holds a run"):
        train(load_pipeline(pipe), tmp_path / "run")
    with pytest.raises(TrainingError, match=r"different pipeline \(train.batch_size: 4 -> 8"):
        train(load_pipeline(pipe, ["train.batch_size=8"]), tmp_path / "run", resume=True)
    with pytest.raises(TrainingError, match="no last.pt"):
        train(load_pipeline(pipe), tmp_path / "fresh", resume=True)


# --- exact resume ---------------------------------------------------------------------------------


def test_sigkill_mid_run_then_resume_matches_uninterrupted(cohort2d: Path, tmp_path: Path) -> None:
    # A 3D-sized epoch (more steps) so that the kill lands inside a run that is far from finished.
    pipe = tiny_pipeline(
        tmp_path,
        cohort2d,
        **{
            "train.stages": [
                {"name": "a", "epochs": 3, "lr": 0.003, "warmup_epochs": 1},
                {"name": "b", "epochs": 5, "lr": 0.001, "lr_scale": {"encoder": 0.1}},
            ],
            "train.batch_size": 2,
        },
    )
    full = tmp_path / "full"
    train(load_pipeline(pipe), full)

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medhybrid", "train", str(pipe), "--out", str(killed)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 300
    try:
        # Kill once two epochs are on disk: the run is then inside epoch 3, in the first stage's last epoch.
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-500:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = len(metrics.read_text().splitlines())
    assert 2 <= done_before < 8
    assert json.loads((killed / "run.json").read_text())["status"] == "running"

    resumed = run_cli(["train", str(pipe), "--out", str(killed), "--resume"], env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr

    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(killed / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert strip_timing(a["history"]) == strip_timing(b["history"])
    lines = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, 9))
    assert load_checkpoint(full / "best.pt")["epoch"] == load_checkpoint(killed / "best.pt")["epoch"]


# --- distributed ------------------------------------------------------------------------------------


def test_torchrun_two_cpu_ranks_match_one(cohort2d: Path, tmp_path: Path) -> None:
    # Cross-entropy is a mean over samples, so 2 ranks x 2 samples average to the 1 x 4 gradient; batch Dice
    # (like batch norm) is computed per rank and would not. SGD, not AdamW: Adam divides by the gradient's
    # running RMS, so a weight whose gradient is ~0 moves by ~lr in the direction of float rounding noise,
    # and the two runs' weights then differ by 1e-2 although their gradients agree to 1e-6.
    changes = {"train.loss": {"segmentation": "ce"}, "train.optimizer": {"name": "sgd", "momentum": 0.9}}
    pipe = tiny_pipeline(tmp_path, cohort2d, **changes)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = run_cli(["train", str(pipe), "--out", str(tmp_path / "one")], env=env, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "medhybrid",
            "train",
            str(pipe),
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert b["world_size"] == 2 and a["world_size"] == 1
    for ha, hb in zip(a["history"], b["history"], strict=True):
        for key in ("train_loss", "val_loss", "val_auroc", "val_accuracy", "val_dice"):
            assert ha[key] == pytest.approx(hb[key], abs=2e-3), (ha["epoch"], key)
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-3), key
    # Only rank 0 wrote: one events file, one metrics file with one line per epoch.
    assert len(list((tmp_path / "two" / "tensorboard").iterdir())) == 1
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 5


def test_global_batches_are_split_across_ranks() -> None:
    one = list(GlobalBatchSampler(23, 8, seed=1))
    parts = [list(GlobalBatchSampler(23, 8, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(one) == 2 and all(len(b) == 8 for b in one)
    for k, batch in enumerate(one):
        assert parts[0][k] + parts[1][k] == batch
    s = GlobalBatchSampler(23, 8, seed=1)
    s.set_epoch(1)
    assert list(s) != one
    with pytest.raises(ConfigError, match="not divisible"):
        GlobalBatchSampler(23, 5, seed=1, world_size=2)
    weighted = GlobalBatchSampler(100, 50, seed=0, weights=[1.0] * 10 + [0.0] * 90)
    assert all(i < 10 for b in weighted for i in b)


def test_augmentation_depends_on_epoch_and_index_only(cohort2d: Path) -> None:
    cfg = load_pipeline(tiny_pipeline(cohort2d.parent, cohort2d)).data
    det, rnd = split_transforms(build_transforms(cfg, "train"))
    assert det.transforms and rnd.transforms
    nifti = cohort2d.parent / "nifti"
    items = [
        {"image": str(nifti / f"synth_{i:04d}.nii.gz"), "mask": str(nifti / f"synth_{i:04d}_mask.nii.gz")}
        for i in range(3)
    ]
    ds = SeededDataset(items, det, rnd, seed=5, cache=True)
    first = ds[1]["image"].clone()
    _ = ds[0], ds[2]
    assert torch.equal(ds[1]["image"], first)  # order of access does not matter
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["image"], first)
    ds.set_epoch(0)
    assert torch.equal(ds[1]["image"], first)


# --- staged fine-tuning ---------------------------------------------------------------------------


def _tiny_weights(path: Path, seed: int, keep: str = "") -> Path:
    """Weights of a differently seeded tiny hybrid (only the keys starting with ``keep``)."""
    torch.manual_seed(seed)
    donor = create_model("hybrid_tiny_2d", norm="group", num_classes=2, seg_classes=2, img_size=[64, 64])
    torch.save({k: v for k, v in donor.state_dict().items() if k.startswith(keep)}, path)
    return path


def test_frozen_modules_do_not_move_and_lr_groups_scale(cohort2d: Path, tmp_path: Path) -> None:
    weights = _tiny_weights(tmp_path / "w.pt", seed=123)
    pipe = tiny_pipeline(
        tmp_path,
        cohort2d,
        **{
            "train.stages": [{"name": "enc", "epochs": 1, "lr": 0.01, "freeze": ["context"]}],
            "model.pretrained": str(weights),
        },
    )
    cfg = load_pipeline(pipe)
    init = torch.load(weights, weights_only=True)
    train(cfg, tmp_path / "run")
    after = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    for key, value in init.items():
        if key.startswith("context."):
            assert torch.equal(value, after[key]), key  # frozen at the pretrained values
    assert any(not torch.equal(v, after[k]) for k, v in init.items() if k.startswith("encoder."))
    torch.manual_seed(0)
    init = create_model("hybrid_tiny_2d", norm="group", num_classes=2, seg_classes=2, img_size=[64, 64])

    stage = cfg.train.stages[0].model_copy(update={"freeze": ("decoder",), "lr_scale": {"encoder": 0.1}})
    groups = param_groups(init, stage)
    by_scale: dict[float, int] = {}
    for g in groups:
        by_scale[g["lr_scale"]] = by_scale.get(g["lr_scale"], 0) + sum(p.numel() for p in g["params"])
    enc = sum(p.numel() for n, p in init.named_parameters() if n.startswith("encoder."))
    assert by_scale[0.1] == enc and all(not p.requires_grad for p in init.decoder.parameters())
    bad = stage.model_copy(update={"freeze": ("encodr",)})
    with pytest.raises(ConfigError, match="'encodr' matches no parameter"):
        param_groups(init, bad)


def test_a_stage_may_freeze_only_what_was_pretrained(cohort2d: Path, tmp_path: Path) -> None:
    stages = [{"name": "enc", "epochs": 1, "lr": 0.01, "freeze": ["context"]}]
    # No weights at all: the frozen Transformer would be random noise forever.
    cfg = load_pipeline(tiny_pipeline(tmp_path, cohort2d, **{"train.stages": stages}))
    with pytest.raises(
        ConfigError, match=r"freeze 'context' would freeze \d+ randomly initialised.*no model.pretrained"
    ):
        train(cfg, tmp_path / "none")
    # Weights that hold the encoder only: freezing the context is refused, freezing the encoder is not.
    enc = _tiny_weights(tmp_path / "enc.pt", seed=5, keep="encoder.")
    cfg = load_pipeline(tiny_pipeline(tmp_path, cohort2d, **{"train.stages": stages, "model.pretrained": str(enc)}))
    with pytest.raises(ConfigError, match="the pretrained weights lack them"):
        train(cfg, tmp_path / "enc")
    ok = [{"name": "enc", "epochs": 1, "lr": 0.01, "freeze": ["encoder"]}]
    cfg = load_pipeline(tiny_pipeline(tmp_path, cohort2d, **{"train.stages": ok, "model.pretrained": str(enc)}))
    train(cfg, tmp_path / "ok")
    after = load_checkpoint(tmp_path / "ok" / "last.pt")["model"]
    loaded = torch.load(enc, weights_only=True)
    assert all(torch.equal(v, after[k]) for k, v in loaded.items() if not k.endswith("num_batches_tracked"))


def test_shipped_pipelines_freeze_nothing_unpretrained() -> None:
    for path in sorted((REPO / "pipelines").glob("*.yaml")):
        cfg = load_pipeline(path)
        if cfg.model.pretrained is None:
            assert all(not s.freeze for s in cfg.train.stages), path.name


def test_warmup_then_cosine() -> None:
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(50, 100, 0, "constant") == 1.0


def test_early_stopping_ends_the_run(cohort2d: Path, tmp_path: Path) -> None:
    pipe = tiny_pipeline(
        tmp_path,
        cohort2d,
        **{"train.stages": [{"epochs": 30, "lr": 1e-12}], "train.early_stopping": 2},
    )
    result = train(load_pipeline(pipe), tmp_path / "run")
    assert result.status == "early_stopped"
    assert len(result.history) < 30
    assert result.history[-1]["epoch"] - result.best_epoch == 2


def test_a_kill_between_the_last_and_best_writes_is_repaired_on_resume(
    cohort2d: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each epoch writes last.pt, then best.pt. Killed in between, last.pt says "the best epoch is me" while
    best.pt still holds an older epoch; resuming must restore best.pt from last.pt."""
    import medhybrid.train.loop as loop

    pipe = tiny_pipeline(
        tmp_path, cohort2d, **{"train.stages": [{"epochs": 2, "lr": 1e-3}], "eval.select": "loss"}
    )  # training loss falls: epoch 2 improves on epoch 1

    class Killed(BaseException):  # like SIGKILL: nothing in the trainer may catch it
        pass

    real, killed = loop.save_checkpoint, []

    def save(path: Path, payload: dict[str, Any]) -> Path:
        if Path(path).name == "best.pt" and payload["epoch"] == 2:
            killed.append(payload["epoch"])
            raise Killed("killed between last.pt and best.pt")
        return real(path, payload)

    monkeypatch.setattr(loop, "save_checkpoint", save)
    with pytest.raises(Killed):
        train(load_pipeline(pipe), tmp_path / "run")
    assert killed == [2], "epoch 2 did not improve: the kill was never simulated"
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["best"]["epoch"] == 2 and load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 1
    monkeypatch.setattr(loop, "save_checkpoint", real)
    result = train(load_pipeline(pipe), tmp_path / "run", resume=True)
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert result.best_epoch == 2 and best["epoch"] == 2
    assert all(torch.equal(best["model"][k], v) for k, v in last["model"].items())


def test_validation_dice_counts_a_class_painted_into_a_study_without_it() -> None:
    """Training selects its epoch on the same empty-mask rule as evaluate: a false positive in a normal study
    scores 0 (MONAI's ignore_empty would leave the study out and reward painting everything)."""
    from medhybrid.evaluate.segmentation import dice_with_empty_rule
    from medhybrid.train.evaluate import compute_metrics

    everywhere = torch.ones(1, 1, 8, 8, dtype=torch.long)
    lesion = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    lesion[..., :4, :] = 1
    normal = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    assert dice_with_empty_rule(everywhere, lesion, 2) == [pytest.approx(2 * 32 / (64 + 32))]
    assert dice_with_empty_rule(everywhere, normal, 2) == [0.0]
    both_empty = dice_with_empty_rule(normal, normal, 2)
    assert len(both_empty) == 1 and np.isnan(both_empty[0])
    records = [{"dice": dice_with_empty_rule(everywhere, m, 2), "loss": 0.0} for m in (lesion, normal)]
    assert compute_metrics(records, ["dice", "loss"], 0, 2)["dice"] == pytest.approx(2 * 32 / 96 / 2)


def test_the_dice_term_leaves_the_background_out_by_default() -> None:
    """A missed 8-voxel lesion in a 4096-voxel batch: with the background in the Dice term its near-1 Dice
    halves the loss (0.5); without it (nnU-Net's default, ours) the Dice term is the full 1."""
    from medhybrid.config import LossConfig
    from medhybrid.train.optim import TaskLoss

    mask = torch.zeros(1, 1, 16, 16, 16)
    mask[..., :2, :2, :2] = 1
    logits = torch.zeros(1, 2, 16, 16, 16)
    logits[:, 0] = 20.0  # background everywhere, confidently
    batch = {"mask": mask}
    default = TaskLoss(LossConfig(segmentation="dice"), "segmentation")({"seg_logits": logits}, batch)
    with_bg = TaskLoss(LossConfig(segmentation="dice", dice_background=True), "segmentation")(
        {"seg_logits": logits}, batch
    )
    assert float(default) == pytest.approx(1.0, abs=1e-3)
    assert float(with_bg) == pytest.approx(0.5, abs=1e-2)


def test_deep_supervision_scores_every_level_with_normalised_weights() -> None:
    """Weights 1, 1/2 normalised to 2/3, 1/3 (nnU-Net): a perfect full-resolution map and a wrong coarse
    one give a third of the coarse level's loss; without aux outputs only the main map counts."""
    from medhybrid.config import LossConfig
    from medhybrid.train.optim import TaskLoss

    mask = torch.zeros(1, 1, 16, 16, 16)
    mask[..., :8, :8, :8] = 1
    good = torch.cat([1 - mask, mask], 1) * 40.0 - 20.0
    coarse_mask = mask[..., ::2, ::2, ::2]
    wrong = torch.cat([coarse_mask, 1 - coarse_mask], 1) * 40.0 - 20.0
    loss = TaskLoss(LossConfig(segmentation="dice"), "segmentation")
    batch = {"mask": mask}
    main_only = float(loss({"seg_logits": good}, batch))
    coarse_alone = float(loss({"seg_logits": wrong}, {"mask": coarse_mask}))
    both = float(loss({"seg_logits": good, "seg_logits_aux1": wrong}, batch))
    assert main_only == pytest.approx(0.0, abs=1e-3)
    assert coarse_alone == pytest.approx(1.0, abs=1e-3)
    assert both == pytest.approx(coarse_alone / 3, abs=1e-3)


def test_class_weights() -> None:
    w = class_weights([0, 0, 0, 1], 2)
    assert w[1] == pytest.approx(3 * w[0]) and np.mean(w) == pytest.approx(1.0)


# --- pretrained weights ---------------------------------------------------------------------------


def test_pretrained_monai_resnet_layout_is_remapped(tmp_path: Path) -> None:
    from monai.networks.nets import resnet18

    donor = resnet18(spatial_dims=3, n_input_channels=1, num_classes=7)
    path = tmp_path / "monai_r18.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in donor.state_dict().items()}}, path)
    model = create_model("resnet18_3d", num_classes=2)
    report = load_pretrained(model, path)
    assert report.layout.startswith("resnet")
    assert not report.mismatched
    # MONAI's shortcut convolutions have a bias, ours (like torchvision's) do not: reported, not loaded.
    assert report.unexpected == [f"encoder.stages.{i}.0.downsample.0.bias" for i in (1, 2, 3)]
    assert report.missing == ["fc.bias", "fc.weight"]  # the new head stays initialised
    assert torch.equal(model.encoder.stem[0].weight, donor.conv1.weight)
    assert torch.equal(model.encoder.stages[3][1].conv2.weight, donor.layer4[1].conv2.weight)


def test_pretrained_torchvision_2d_layout_into_hybrid(tmp_path: Path) -> None:
    hybrid = create_model("hybrid_r18_2d", num_classes=2, seg_classes=0)
    # A torchvision-style ResNet-18 state dict: RGB stem (shape mismatch: ours is 1 channel), fc of 1000.
    tv: dict[str, torch.Tensor] = {"conv1.weight": torch.randn(64, 3, 7, 7), "fc.weight": torch.randn(1000, 512)}
    for name, value in hybrid.encoder.state_dict().items():
        if name.startswith("stages."):
            tv["layer" + str(int(name.split(".")[1]) + 1) + name[len("stages.0") :]] = torch.randn_like(value.float())
        elif name.startswith("stem.1."):
            tv["bn1." + name[len("stem.1.") :]] = value.clone()
    tv["layer4.0.conv1.weight"] = torch.randn(512, 256, 3, 3)  # hybrid_r18_2d has 3 stages: unexpected
    path = tmp_path / "tv.pth"
    torch.save(tv, path)
    report = load_pretrained(hybrid, path)
    assert any("encoder.stem.0.weight" in m for m in report.mismatched)
    assert "encoder.stages.3.0.conv1.weight" in report.unexpected
    assert torch.equal(hybrid.encoder.stages[0][0].conv1.weight, tv["layer1.0.conv1.weight"])
    assert "context" in " ".join(report.missing)
    assert "missing" in report.summary() and "shape mismatch" in report.summary()


def test_pretrained_file_errors(tmp_path: Path) -> None:
    model = create_model("resnet_tiny_2d")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_pretrained(model, junk)
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"a.b": torch.zeros(3)}, unrelated)
    with pytest.raises(CheckpointError, match="no tensor matches"):
        load_pretrained(model, unrelated)


def test_pipeline_with_pretrained_from_a_previous_run(cohort2d: Path, tmp_path: Path) -> None:
    pipe = tiny_pipeline(tmp_path, cohort2d, **{"train.stages": [{"epochs": 1}]})
    train(load_pipeline(pipe), tmp_path / "first")
    second = tiny_pipeline(
        tmp_path,
        cohort2d,
        **{"train.stages": [{"epochs": 1, "lr": 1e-9}], "model.pretrained": str(tmp_path / "first" / "best.pt")},
    )
    train(load_pipeline(second), tmp_path / "second")
    a = load_checkpoint(tmp_path / "first" / "best.pt")["model"]
    b = load_checkpoint(tmp_path / "second" / "last.pt")["model"]
    key = "encoder.stem.0.weight"
    assert torch.allclose(a[key], b[key], atol=1e-6)
    assert "medhybrid" in json.loads((tmp_path / "second" / "run.json").read_text())["pretrained"]


# --- bad configs: one clear line ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"train.stages": [{"epochs": 1, "lrr": 0.1}]}, "train.stages.0.lrr: Extra inputs are not permitted"),
        ({"train.batch_size": "eight"}, "train.batch_size: Input should be a valid integer"),
        ({"data.manifest": "nowhere/manifest.csv"}, "data.manifest: file not found"),
        ({"data.label_names": {0: "normal"}}, "has label 1, not in label_names [0]"),
        ({"model.name": "hybrid_tiny_3d"}, "hybrid_tiny_3d is 3D but data.spatial_dims is 2"),
        ({"model.name": "resnet_tiny_2d"}, "cannot do segmentation"),
    ],
)
def test_bad_config_is_one_line(cohort2d: Path, tmp_path: Path, change: dict[str, Any], expected: str) -> None:
    pipe = tiny_pipeline(tmp_path, cohort2d, **change)
    result = CliRunner().invoke(app, ["train", str(pipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    joined = " ".join(lines)
    assert expected in joined and "fix:" in joined
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "last.pt").exists()


# --- shipped pipelines ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo", "pneumonia_2d", "adrenal_3d", "hippocampus_seg"])
def test_shipped_pipelines_validate(name: str) -> None:
    cfg = load_pipeline(REPO / "pipelines" / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.data.manifest.is_absolute()
    create_model(cfg.model.name, **cfg.model.args)  # the model arguments are valid


def test_demo_pipeline_runs_on_a_small_cohort(tmp_path: Path) -> None:
    manifest = synthesize_cohort(tmp_path / "cohort", n=16, dims=3, fmt="both", seed=0)  # 10 train >= batch 8
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(REPO / "pipelines" / "demo.yaml"),
            "--set",
            f"data.manifest={manifest}",
            "--set",
            "train.stages.0.epochs=2",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "completed: 2 epochs" in result.stdout
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["task"] == "multitask" and ckpt["mask_label_names"] == {0: "background", 1: "lesion"}


def test_batch_norm_is_synced_under_ddp_on_cuda_only(caplog: pytest.LogCaptureFixture) -> None:
    from medhybrid.train.distributed import DistInfo, sync_batch_norm

    model = create_model("hybrid_tiny_3d")  # BatchNorm by default
    keys = list(model.state_dict())
    two = DistInfo(rank=0, world_size=2)
    synced = sync_batch_norm(model, two, torch.device("cuda"))  # converting needs no GPU; running it would
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert list(synced.state_dict()) == keys  # checkpoints load either way
    plain = create_model("hybrid_tiny_3d")
    assert sync_batch_norm(plain, DistInfo(), torch.device("cuda")) is plain  # one process: nothing to sync
    with caplog.at_level("WARNING"):
        kept = sync_batch_norm(plain, two, torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in kept.modules())
    assert "SyncBatchNorm needs CUDA" in caplog.text


def test_a_format_1_hybrid_checkpoint_rebuilds_as_it_was_trained(cohort2d: Path, tmp_path: Path) -> None:
    """Checkpoints written before the hybrid's defaults changed record none of the new options; loading
    fills in the values their networks were built with (checkpoint.LEGACY_HYBRID_ARGS)."""
    from medhybrid.infer.loading import load_member
    from medhybrid.train.checkpoint import DIGEST_KEY, FORMAT, LEGACY_HYBRID_ARGS

    legacy = LEGACY_HYBRID_ARGS[1]
    stages = [{"name": "a", "epochs": 1, "lr": 0.003}]
    pipe = tiny_pipeline(tmp_path, cohort2d, **{"train.stages": stages, "model.args": {"norm": "group", **legacy}})
    train(load_pipeline(pipe), tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    ckpt["model_args"] = {k: v for k, v in ckpt["model_args"].items() if k not in legacy}
    x = torch.randn(1, 1, 64, 64)
    for version, loads in ((1, True), (2, False)):
        path = tmp_path / f"v{version}.pt"
        torch.save({**ckpt, "format": FORMAT, "format_version": version, DIGEST_KEY: ckpt[DIGEST_KEY]}, path)
        if not loads:  # the same file claiming the new format: built with the new defaults, the weights do not fit
            with pytest.raises(CheckpointError, match="cannot rebuild the model"):
                load_member(path, torch.device("cpu"), ())
            continue
        member = load_member(path, torch.device("cpu"), ())
        assert {k: member.model.cfg.__dict__[k] for k in legacy} == legacy
        original = load_member(tmp_path / "run" / "best.pt", torch.device("cpu"), ())
        with torch.no_grad():
            torch.testing.assert_close(member.model(x)["logits"], original.model(x)["logits"])
