"""The pixel family: models that read the stored image bytes, no detector (tasks ``clip``:
Chinese-CLIP's dual encoder, transformers' ``ChineseCLIPModel``; ``clipcap``: a CLIP image
embedding mapped to a GPT-2 prefix). Its interface to the shared training loop and
evaluation is the one :mod:`mmcn.models.factory` lists; ``find_checkpoint`` /
``convert_cn_clip`` read a starting folder holding Chinese-CLIP's own ``.pt`` (the zero-shot
evaluation of such a folder)."""
from __future__ import annotations

from pathlib import Path

from mmcn.models.pixels.clip import ClipModel, ClipSettings, build_clip, convert_cn_clip
from mmcn.models.pixels.cn_clip import find_checkpoint
from mmcn.models.pixels.clipcap import ClipCapConfig, ClipCapModel, build_clipcap
from mmcn.models.pixels.evaluation import EVAL_CONFIGS, eval_worker
from mmcn.models.pixels.training import STEPS, freeze, prepare_run, run_inputs, task_data, tokenizer_texts, validate

CONFIGS = {"clip": ClipSettings, "clipcap": ClipCapConfig}
_MODELS = {"clip": ClipModel, "clipcap": ClipCapModel}

__all__ = ["CONFIGS", "EVAL_CONFIGS", "STEPS", "build_model", "convert_cn_clip", "eval_worker", "find_checkpoint",
           "freeze", "load_model", "prepare_run", "run_inputs", "task_data", "tokenizer_texts", "validate"]


def build_model(task: str, vocab_size: int, size: str = "small", init: str = "", **settings):
    """clip: :func:`build_clip`; clipcap: :func:`build_clipcap` (CLIP embedding -> mapper -> GPT-2 prefix)."""
    if task not in _MODELS:
        raise ValueError(f"unknown pixel task {task!r}: use one of {', '.join(_MODELS)}")
    return (build_clip if task == "clip" else build_clipcap)(vocab_size, size, init, **settings)


def load_model(path: Path | str) -> tuple[str, object]:
    """``(task, model)`` of a saved clip or clipcap folder."""
    from mmcn.models.factory import saved_task

    task = saved_task(path)
    if task not in _MODELS:
        raise ValueError(f"{path}: not a Chinese-CLIP or ClipCap model folder")
    return task, _MODELS[task].from_pretrained(str(path), local_files_only=True)
