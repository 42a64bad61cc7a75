"""Training the native detector on the ground-truth boxes that ingest kept in its manifest."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mmcn.data import tsv
from mmcn.data.image import decode_rgb
from mmcn.data.manifest import ManifestEntry, manifest_path, read_manifest
from mmcn.logs import Progress
from mmcn.vision.detector import Detector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectorTrainConfig:
    epochs: int = 8
    batch_size: int = 8
    lr: float = 2e-3             # AdamW; SGD at 0.02 learned the classifier far slower here
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    grad_clip: float = 10.0
    seed: int = 0
    max_images: int = 0  # train on the first N images only (0: all)

    def __post_init__(self) -> None:
        """Ranges; messages start with the field (``mmcn.settings`` names the param)."""
        for name in ("epochs", "batch_size"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "max_images", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "grad_clip"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name}: must be a number > 0, got {getattr(self, name)!r}")


@dataclass
class Sample:
    """One image as the detector takes it: uint8 RGB (3, H, W) and its target tensors."""

    image_id: int
    image: torch.Tensor
    boxes: torch.Tensor          # (n, 4) float32 pixels
    labels: torch.Tensor         # (n,) int64, 1-based into the class vocab (0 = background)
    attributes: torch.Tensor     # (n, k) int64, 1-based into the attribute vocab, 0 = padding

    def target(self) -> dict[str, torch.Tensor]:
        return {"boxes": self.boxes, "labels": self.labels, "attributes": self.attributes}


def vocab_from_manifest(tsv_dir: Path, split: str = "train") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sorted object classes and attributes that occur in a split's ground truth."""
    entries = read_manifest(manifest_path(tsv_dir, split))
    classes = sorted({o.label for e in entries for o in e.objects})
    attributes = sorted({a for e in entries for o in e.objects for a in o.attributes})
    if not classes:
        raise ValueError(f"{manifest_path(tsv_dir, split)} has no ground-truth objects: the detector cannot be "
                         "trained on it; give `objects` in captions.jsonl or set detector weights")
    return tuple(classes), tuple(attributes)


def load_samples(tsv_dir: Path, split: str, classes: tuple[str, ...], attributes: tuple[str, ...],
                 limit: int = 0) -> list[Sample]:
    """Images with their boxes from ``{split}_imgs.tsv`` + manifest; unknown labels are dropped
    (and counted in the log), images without any known object are kept as negatives."""
    entries: dict[int, ManifestEntry] = {e.image_id: e for e in read_manifest(manifest_path(tsv_dir, split))}
    class_ids = {c: i + 1 for i, c in enumerate(classes)}
    attr_ids = {a: i + 1 for i, a in enumerate(attributes)}
    samples, unknown = [], 0
    reader = tsv.TsvReader(tsv.imgs_path(tsv_dir, split))
    for image_id, data in reader:
        if limit and len(samples) >= limit:
            break
        objects = [o for o in entries[image_id].objects if o.label in class_ids]
        unknown += len(entries[image_id].objects) - len(objects)
        width = max([len(o.attributes) for o in objects] + [1])
        attrs = torch.zeros((len(objects), width), dtype=torch.int64)
        for i, o in enumerate(objects):
            ids = [attr_ids[a] for a in o.attributes if a in attr_ids]
            attrs[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        samples.append(Sample(
            image_id, decode_rgb(data),
            torch.tensor([list(o.box) for o in objects], dtype=torch.float32).reshape(-1, 4),
            torch.tensor([class_ids[o.label] for o in objects], dtype=torch.int64), attrs))
    if unknown:
        log.warning("%s: %d objects with labels outside the detector vocabulary were ignored", split, unknown)
    return samples


def lr_at(step: int, total: int, cfg: DetectorTrainConfig) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_detector(model: Detector, samples: list[Sample], cfg: DetectorTrainConfig,
                   on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """AdamW over ``samples`` for ``cfg.epochs``; returns one row per step (losses, lr)."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(samples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    history: list[dict] = []
    model.train()
    start = time.perf_counter()
    bar = Progress(total, "train detector", "step", log)
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(samples), generator=generator).tolist()
        for first in range(0, len(order), cfg.batch_size):
            batch = [samples[i] for i in order[first:first + cfg.batch_size]]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            losses = model([s.image for s in batch], [s.target() for s in batch])
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"detector loss is {loss.item()} at step {step}; lower detector.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            row = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "loss": loss.item(),
                   **{k: v.item() for k, v in losses.items()}}
            history.append(row)
            if on_step:
                on_step(row)
            bar.update(1, epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{row['loss']:.3f}")
            step += 1
    bar.close()
    model.eval()
    log.info("trained detector: %d steps over %d images in %.0fs, final loss %.3f", step, len(samples),
             time.perf_counter() - start, history[-1]["loss"] if history else float("nan"))
    return history
