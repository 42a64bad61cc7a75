"""The pixel family's hooks in the training loop (:mod:`mmcn.train.loop`, listed in
:mod:`mmcn.models.factory`): Chinese-CLIP's contrastive pairs and accumulated step, and
ClipCap's frozen-CLIP embeddings cached once per run."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mmcn.models.pixels.clip import ClipCollator, accumulated_step, image_processor, processor_of
from mmcn.models.pixels.clipcap import ClipCapCollator
from mmcn.models.pixels.datasets import ClipDataset
from mmcn.models.pixels.image_embeddings import EmbeddedCaptions, cache_splits
from mmcn.models.runtime import token_metrics

STEPS = {"clip": accumulated_step}  # one contrastive batch of grad_accum micro-batches (Chinese-CLIP's accum_freq)


def tokenizer_texts(task: str, store) -> list[str]:
    """What a tokenizer built from scratch learns its characters from: the captions (these models read no tags)."""
    return [t.text for t in store.texts()]


def prepare_run(spec, lmdb_dir: Path, run_dir: Path, tokenizer_dir: Path) -> tuple:
    """``(spec, embeddings)`` for the workers. clip: its image processor saved beside the
    tokenizer (it travels into the exported folder); clipcap: the CLIP folder by absolute path
    and its image embeddings of the splits, cached in ``run_dir`` (:func:`cache_splits`)."""
    if spec.task == "clip":
        if not (tokenizer_dir / "preprocessor_config.json").is_file():
            processor = processor_of(spec.init) if spec.init else image_processor(spec.settings.get("image_size", 224))
            processor.save_pretrained(str(tokenizer_dir))
        return spec, {}
    clip = str(Path(spec.settings["clip"]).resolve())
    return replace(spec, settings={**spec.settings, "clip": clip}), cache_splits(clip, lmdb_dir,
                                                                                  run_dir / "clip-embeddings")


def run_inputs(spec) -> list[Path]:
    """clipcap: the CLIP folder whose embeddings it learns from (its content is an input of the run)."""
    return [Path(spec.settings["clip"])] if spec.task == "clipcap" else []


def freeze(model, task: str, cfg) -> None:
    model.freeze(embedding=cfg.freeze_embedding, visual=cfg.freeze_vision if task == "clip" else False)


def task_data(task: str, store_path: Path, tokenizer, model_config, cfg, seed: int | None = None,
              embeddings: dict | None = None):
    """``(dataset, collate)``: clip, (image bytes, text) pairs; clipcap, (cached CLIP image
    embedding, caption) pairs from ``embeddings`` (split -> cache file)."""
    if task == "clip":
        return ClipDataset(store_path), ClipCollator(tokenizer, processor_of(tokenizer.name_or_path),
                                                     model_config.max_text_len)
    return (EmbeddedCaptions(store_path, (embeddings or {})[store_path.name]),
            ClipCapCollator(tokenizer, model_config.max_text_len))


def validate(task: str, model, store_path: Path, tokenizer, cfg, device, embeddings: dict | None = None) -> dict:
    """clip: recall on the valid split (:func:`mmcn.models.pixels.clip.validate`); clipcap: the
    loss and accuracy of every caption token."""
    from mmcn.models.pixels.clip import validate as clip_validate

    if task == "clip":
        return clip_validate(model, tokenizer, processor_of(tokenizer.name_or_path), store_path)
    data = task_data(task, store_path, tokenizer, model.config, cfg, embeddings=embeddings)
    return token_metrics(model, *data, device)
