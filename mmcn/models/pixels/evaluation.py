"""The pixel family's hook in the evaluation actors (:class:`mmcn.eval.evaluate.ModelActor`):
the stored image bytes and the model each job needs (no region features)."""
from __future__ import annotations

from pathlib import Path

from mmcn.models.pixels.clip import ClipEncoder
from mmcn.models.pixels.clipcap import ClipCapEvalConfig, ClipCapGenerator
from mmcn.models.pixels.datasets import ClipDataset, StoredImages

EVAL_CONFIGS = {"clipcap": ClipCapEvalConfig}  # clip: mmcn.eval.evaluate.EvalConfig


def eval_worker(mode: str, model_dir: Path | str, store_path: Path | str, cfg, device) -> tuple:
    """``(data, worker)`` for one actor job on ``store_path``. ``caption`` (ClipCap): every
    image's bytes and a generator (its CLIP, then the prefix decoding ``cfg`` says);
    ``embed`` (Chinese-CLIP): the split's texts and image bytes and the encoder."""
    if mode == "caption":
        return StoredImages(store_path), ClipCapGenerator.from_dir(model_dir, cfg.decoding_settings(), device)
    if mode != "embed":
        raise ValueError(f"{model_dir}: a Chinese-CLIP model has no cross-encoder ({mode}); set rerank_k 0")
    return ClipDataset(store_path), ClipEncoder.from_dir(model_dir, device)
