"""Training and validation data: manifest rows -> cached, seeded MONAI datasets -> batches.

Reproducibility is built into the data path rather than left to global RNG state:
- the deterministic transforms (load, orient, resample, normalise) run once and are cached in memory;
- the random transforms of sample ``i`` in epoch ``e`` are seeded from ``(seed, e, i)``, and the
  order of samples in epoch ``e`` from ``(seed, e)``.
So a run resumed at an epoch boundary, a run with data-loader workers, and a run split over ranks all
see exactly the same augmented samples in the same global batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset
from monai.data import DataLoader as MonaiDataLoader
from monai.data import Dataset as MonaiDataset
from monai.transforms import Compose
from torch.utils.data import Dataset, Sampler

from medhybrid.config import DataConfig, PipelineConfig
from medhybrid.data.transforms import IMAGE, LABEL, MASK, apply, build_transforms, uses_masks
from medhybrid.errors import ConfigError, ManifestError
from medhybrid.evaluate.study_score import resolve_mask_kinds
from medhybrid.io.manifest import Manifest, ManifestRow, read_manifest

logger = logging.getLogger(__name__)


def mix_seed(*parts: int) -> int:
    """A 32-bit seed from several integers (SplitMix-style mixing, so nearby inputs give unrelated seeds)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0xFFFFFFFF


@dataclass
class TaskData:
    """The manifest read for one pipeline, checked against the task."""

    manifest: Manifest
    label_names: dict[int, str]
    mask_label_names: dict[int, str]
    train_rows: list[ManifestRow]
    val_rows: list[ManifestRow]
    mask_kinds: dict[int, str] = field(default_factory=dict)  # foreground label -> anatomy | lesion

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def seg_classes(self) -> int:
        return len(self.mask_label_names)


def load_task_data(cfg: PipelineConfig) -> TaskData:
    """Read the manifest and check it fits the task: labels within ``label_names``, masks present.

    Raises:
        ConfigError: missing manifest, an empty split, a label not in the names, missing masks.
    """
    data = cfg.data
    if not data.manifest.is_file():
        raise ConfigError(
            "data.manifest: file not found",
            path=data.manifest,
            fix="check the path (relative paths resolve against the pipeline file's folder)",
        )
    try:
        manifest = read_manifest(data.manifest)
    except ManifestError as exc:
        raise ConfigError(f"data.manifest: {exc.message}", path=data.manifest, fix=exc.fix) from None
    needs_labels = data.task in ("classification", "multitask")
    needs_masks = uses_masks(data)
    label_names = dict(data.label_names or manifest.label_names)
    if needs_labels and not label_names:
        labels = sorted({r.label for r in manifest.rows if r.label is not None})
        label_names = {i: str(i) for i in range(max(labels) + 1)} if labels else {}
    if needs_labels and sorted(label_names) != list(range(len(label_names))):
        raise ConfigError(
            f"data.label_names: keys must be 0..K-1, got {sorted(label_names)}",
            path=data.manifest,
            fix="number the classes from 0",
        )
    mask_names = dict(manifest.mask_label_names) if needs_masks else {}
    splits = {}
    for split in (data.train_split, data.val_split):
        rows = manifest.split(split)
        if not rows:
            raise ConfigError(
                f"data: the manifest has no rows in split {split!r} (it has {manifest.splits()})",
                path=data.manifest,
                fix="set data.train_split / data.val_split to splits the manifest has",
            )
        for r in rows:
            if needs_labels and (r.label is None or r.label not in label_names):
                raise ConfigError(
                    f"data: study {r.study_id} (line {r.line}) has label {r.label!r}, "
                    f"not in label_names {sorted(label_names)}",
                    path=data.manifest,
                    fix="fix the manifest's label column or data.label_names",
                )
            if needs_masks and r.mask is None:
                raise ConfigError(
                    f"data: study {r.study_id} (line {r.line}) has no mask, needed for task {data.task}",
                    path=data.manifest,
                    fix="add the mask column or set data.task: classification",
                )
        splits[split] = rows
    if needs_masks and not mask_names:
        mask_names = {0: "background", 1: "foreground"}
    try:
        kinds = resolve_mask_kinds(
            mask_names,
            data.mask_kind or manifest.mask_kind,
            data.mask_label_kinds if data.mask_label_kinds is not None else manifest.mask_label_kinds,
        )
    except ValueError as exc:
        raise ConfigError(f"data.mask_label_kinds: {exc}", path=data.manifest, fix="see docs/manifests.md") from None
    return TaskData(manifest, label_names, mask_names, splits[data.train_split], splits[data.val_split], kinds)


def row_items(rows: Sequence[ManifestRow], data: DataConfig) -> list[dict[str, Any]]:
    items = []
    for r in rows:
        item: dict[str, Any] = {IMAGE: str(r.image), "study_id": r.study_id}
        if r.label is not None and data.task != "segmentation":
            item[LABEL] = int(r.label)
        if uses_masks(data) and r.mask is not None:
            item[MASK] = str(r.mask)
        items.append(item)
    return items


def split_transforms(compose: Compose) -> tuple[Compose, Compose]:
    """``compose`` split at its first random transform: (deterministic part, random part)."""
    from monai.transforms import Randomizable

    steps = list(compose.transforms)
    first = next((i for i, t in enumerate(steps) if isinstance(t, Randomizable)), len(steps))
    return Compose(steps[:first]), Compose(steps[first:])


class SeededDataset(Dataset[Any]):
    """Cached deterministic samples + random transforms seeded per (seed, epoch, index).

    Args:
        items: manifest items (``image``, optional ``mask``/``label``).
        deterministic: transforms cached once (``data.cache: memory``) or re-run each time (``none``).
        random: transforms re-run on every access, seeded as described in the module docstring.
        seed: the run seed.
        cache: keep deterministic results in memory.
    """

    def __init__(
        self,
        items: list[dict[str, Any]],
        deterministic: Compose,
        random: Compose,
        *,
        seed: int,
        cache: bool,
        cache_workers: int = 1,
    ) -> None:
        self.items = items
        self.random = random
        self.seed = seed
        self.epoch = 0
        self.base: Dataset[Any] = (
            CacheDataset(items, deterministic, num_workers=cache_workers, progress=False, copy_cache=False)
            if cache
            else MonaiDataset(items, deterministic)
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        sample = self.base[index]
        if not self.random.transforms:
            return sample
        self.random.set_random_state(seed=mix_seed(self.seed, self.epoch, index))
        # Copy so that in-place random transforms never touch the cached sample.
        sample = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sample.items()}
        return apply(self.random, sample)


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each *global* batch; the global sequence depends only on (seed, epoch).

    Each global batch of ``batch_size`` indices is cut into ``world_size`` equal slices, so one rank
    with batch 8 and two ranks with batch 4 each average their gradients over the same 8 samples.
    Incomplete last batches are dropped (batch norm cannot train on a batch of one).

    Args:
        n: dataset length.
        batch_size: the global batch (divisible by ``world_size``).
        weights: per-sample sampling weights (class balancing: draws with replacement), or ``None``
            for a shuffled pass without replacement.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        weights: Sequence[float] | None = None,
    ) -> None:
        if batch_size % world_size:
            raise ConfigError(
                f"train.batch_size {batch_size} is not divisible by the {world_size} ranks",
                fix="use a batch size that is a multiple of --nproc_per_node",
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.weights = torch.as_tensor(weights, dtype=torch.float64) if weights is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0xBA7C))
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        else:
            order = torch.randperm(self.n, generator=g)
        per_rank = self.batch_size // self.world_size
        for b in range(len(self)):
            start = b * self.batch_size + self.rank * per_rank
            yield order[start : start + per_rank].tolist()


def class_weights(labels: Sequence[int], num_classes: int) -> list[float]:
    """Inverse-frequency class weights, normalised to mean 1 over the classes present."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    inv = np.where(counts > 0, counts.sum() / np.maximum(counts, 1), 0.0)
    present = inv > 0
    inv[present] /= inv[present].mean()
    return inv.tolist()


def build_loaders(
    cfg: PipelineConfig,
    task: TaskData,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[MonaiDataLoader, SeededDataset, list[dict[str, Any]], Compose]:
    """Train loader (seeded, sharded by global batch) and the validation items with their transforms.

    Validation is not a DataLoader: each rank runs its share of whole images (segmentation by sliding
    window), and the results are gathered (see :mod:`medhybrid.train.evaluate`).
    """
    data = cfg.data
    det, rnd = split_transforms(build_transforms(data, "train"))
    train_items = row_items(task.train_rows, data)
    dataset = SeededDataset(
        train_items,
        det,
        rnd,
        seed=cfg.runtime.seed,
        cache=data.cache == "memory",
        cache_workers=max(1, torch.get_num_threads()),
    )
    weights = None
    if cfg.train.class_balance == "sampler" and data.task != "segmentation":
        cw = class_weights([it[LABEL] for it in train_items], task.num_classes)
        weights = [cw[it[LABEL]] for it in train_items]
    sampler = GlobalBatchSampler(
        len(dataset), cfg.train.batch_size, seed=cfg.runtime.seed, rank=rank, world_size=world_size, weights=weights
    )
    if len(sampler) == 0:
        raise ConfigError(
            f"train.batch_size {cfg.train.batch_size} is larger than the {len(dataset)} training studies",
            fix="lower train.batch_size",
        )
    workers = cfg.train.num_workers
    loader = MonaiDataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=False)
    val_items = row_items(task.val_rows, data)
    return loader, dataset, val_items, build_transforms(data, "val")
