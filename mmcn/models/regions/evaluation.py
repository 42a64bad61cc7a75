"""The region family's hook in the evaluation actors (:class:`mmcn.eval.evaluate.ModelActor`):
the data and the model each job needs."""
from __future__ import annotations

from pathlib import Path

from mmcn.models.regions.datasets import CaptionDataset, RetrievalDataset
from mmcn.models.regions.inference import CaptionGenerator, Decoding, RetrievalEncoder

EVAL_CONFIGS: dict = {}  # every task is evaluated under mmcn.eval.evaluate.EvalConfig


def eval_worker(mode: str, model_dir: Path | str, store_path: Path | str, cfg, device) -> tuple:
    """``(data, worker)`` for one actor job on ``store_path``. ``caption``: every image's item
    (features, tags) and a generator (items -> captions, scores) decoding as ``cfg`` says;
    ``embed`` / ``match``: the split's texts and images and the dual / cross encoder."""
    if mode == "caption":
        return CaptionDataset(store_path, per_image=True), CaptionGenerator.from_dir(model_dir, Decoding.of(cfg),
                                                                                    device)
    return RetrievalDataset(store_path), RetrievalEncoder.from_dir(model_dir, device)
