"""The tasks mmcn trains, the model family each belongs to, and a task's model built or
loaded through its family.

A family is a package under ``mmcn/models/``: ``regions``, the Oscar-style models on region
features (``pretrain``, ``caption``, ``retrieval``), and ``pixels``, the models on image
pixels (Chinese-CLIP ``clip``, ClipCap ``clipcap``). Shared code (the training loop, the
evaluation, the stages) reaches a family only through :func:`family`, which imports it by
name when a task needs it. So a stage runs its own family's code and no other's, dvc.yaml
lists that family's folder for it (``${item.code}``), a training run's fingerprint hashes
it, and a change to one family reruns only its stages (tests/test_deps.py checks all three
against :func:`mmcn.provenance.code_files`).

A family package provides, in its ``__init__``:

* ``CONFIGS``: task -> its model config class (the ``{task}.model`` params' checks);
* ``build_model(task, vocab_size, size, init, **settings)`` and ``load_model(path)``;
* the training hooks of :mod:`mmcn.train.loop`: ``tokenizer_texts``, ``prepare_run``,
  ``run_inputs``, ``freeze``, ``task_data``, ``STEPS``, ``validate``;
* the evaluation hooks of :mod:`mmcn.eval.evaluate`: ``EVAL_CONFIGS``, ``eval_worker``.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

SIZES = {  # name -> (hidden, layers, heads, intermediate): the BERT / GPT-2 sizes trained from scratch
    "tiny": (64, 2, 2, 128),       # tests
    "small": (128, 3, 4, 512),     # the CPU demo (a few minutes on 2 cores)
    "medium": (256, 4, 4, 1024),
    "base": (768, 12, 12, 3072),   # BERT-base (GPU)
}
FAMILIES = {"pretrain": "regions", "caption": "regions", "retrieval": "regions",  # task -> mmcn.models.<family>
            "clip": "pixels", "clipcap": "pixels"}
TASKS = tuple(FAMILIES)
MODEL_TYPES = {"mmcn_pretrain": "pretrain", "mmcn_caption": "caption", "mmcn_retrieval": "retrieval",
               "chinese_clip": "clip", "mmcn_clipcap": "clipcap"}  # a saved folder's config.json model_type -> task


def family(task: str) -> ModuleType:
    """The package of ``task``'s family (imported now, not before)."""
    if task not in FAMILIES:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    return importlib.import_module(f"{__package__}.{FAMILIES[task]}")


def family_dir(task: str) -> Path:
    """The folder of ``task``'s family package (its code deps, as dvc.yaml's ``${item.code}``)."""
    if task not in FAMILIES:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    return Path(__file__).resolve().parent / FAMILIES[task]


def family_code(task: str) -> list[Path]:
    """Every file the family of ``task`` runs when imported (:func:`mmcn.provenance.code_files`
    of its package): what a stage that reaches it through :func:`family` runs besides its
    own imports."""
    from mmcn.provenance import code_files

    if task not in FAMILIES:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    return code_files(f"{__package__}.{FAMILIES[task]}")


def saved_task(path: Path | str) -> str | None:
    """The task of a model folder mmcn saved, by its config's ``model_type``; None for any
    other folder (an Oscar checkpoint, or not a model)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    return MODEL_TYPES.get(json.loads(config.read_text(encoding="utf-8")).get("model_type"))


def build_model(task: str, vocab_size: int, size: str = "small", init: str = "", **settings):
    """A new ``task`` model of ``size`` for a tokenizer of ``vocab_size`` tokens, or from the
    pretrained folder ``init``; ``settings`` are the task config's own fields."""
    return family(task).build_model(task, vocab_size, size, init, **settings)


def load_model(path: Path | str) -> tuple[str, object]:
    """``(task, model)`` of a saved model folder: mmcn's ``save_pretrained`` layout of any task,
    or an Oscar / Mengzi-Oscar caption or retrieval fine-tune (read by the region family,
    which also names what is wrong with a folder that is neither)."""
    return family(saved_task(path) or "caption").load_model(path)
