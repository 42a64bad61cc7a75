"""The region family's hooks in the training loop (:mod:`mmcn.train.loop`, listed in
:mod:`mmcn.models.factory`): the tasks' datasets and collators, and what each validates after
an epoch."""
from __future__ import annotations

from pathlib import Path

import torch

from mmcn.models.regions.datasets import CaptionDataset, PretrainDataset, RetrievalDataset
from mmcn.models.regions.inputs import CaptionCollator, PretrainCollator, RetrievalCollator
from mmcn.models.runtime import token_metrics

STEPS: dict = {}  # every task trains with the loop's own step


def tokenizer_texts(task: str, store) -> list[str]:
    """What a tokenizer built from scratch learns its characters from: the captions and the tag texts."""
    return [t.text for t in store.texts()] + [store.get(i, ("regions",)).tag_text for i in range(len(store))]


def prepare_run(spec, lmdb_dir: Path, run_dir: Path, tokenizer_dir: Path) -> tuple:
    """Nothing to prepare: ``(spec, {})``."""
    return spec, {}


def run_inputs(spec) -> list[Path]:
    """No input besides the data and the starting weights."""
    return []


def freeze(model, task: str, cfg) -> None:
    model.freeze(embedding=cfg.freeze_embedding, visual=cfg.freeze_visual)


def task_data(task: str, store_path: Path, tokenizer, model_config, cfg, seed: int | None = None,
              embeddings: dict | None = None):
    """``(dataset, collate)`` of ``task`` on a split; ``seed`` seeds the collator's draws (masks,
    polluted pairs, negatives)."""
    if task == "pretrain":  # polluted pairs and masks drawn from the collator's generator
        dataset = PretrainDataset(store_path)
        gen = torch.Generator().manual_seed(seed if seed is not None else cfg.seed)
        return dataset, PretrainCollator(tokenizer, model_config, dataset, cfg.mask_prob, generator=gen)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if task == "caption":
        return CaptionDataset(store_path), CaptionCollator(tokenizer, model_config, True, cfg.mask_prob,
                                                           cfg.max_masked, generator=gen, mask_type=cfg.mask_type)
    return RetrievalDataset(store_path), RetrievalCollator(tokenizer, model_config, generator=gen)  # random negatives


@torch.no_grad()
def validate(task: str, model, store_path: Path, tokenizer, cfg, device, embeddings: dict | None = None) -> dict:
    """Caption: masked-token loss and accuracy on valid (fixed masks); pretrain:
    :func:`validate_pretrain`; retrieval: dual-encoder recall (t2i / i2t R@1, mean recall)
    over the whole valid split, or for a matcher alone its loss on the valid pairs and one
    fixed random negative each (ranking every pair would take longer than the epoch)."""
    from torch.utils.data import DataLoader

    move = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    if task == "pretrain":
        return validate_pretrain(model, store_path, tokenizer, cfg, move)
    if task == "caption":
        return token_metrics(model, *task_data(task, store_path, tokenizer, model.config, cfg, seed=0), device)
    if not model.config.dual_encoder:  # a matcher alone (Oscar): its loss on valid pairs + fixed random negatives
        dataset, collate = task_data(task, store_path, tokenizer, model.config, cfg, seed=0)
        losses = [(model(**move(batch)).match_loss.item(), len(batch["image_ids"]))
                  for batch in DataLoader(dataset, batch_size=64, collate_fn=collate)]
        return {"valid_match_loss": round(sum(v * n for v, n in losses) / max(sum(n for _, n in losses), 1), 5)}
    from mmcn.eval.retrieval_metrics import retrieval_scores
    from mmcn.models.regions.inference import RetrievalEncoder, embed_images, embed_texts

    data = RetrievalDataset(store_path)
    encoder = RetrievalEncoder(model, tokenizer, device)
    scores = embed_texts(encoder, data) @ embed_images(encoder, data).T
    r = retrieval_scores(scores, data.store.gold_positions()[0], ks=(1, 5))
    return {"valid_t2i_r1": round(r["t2i"]["r1"], 3), "valid_i2t_r1": round(r["i2t"]["r1"], 3),
            "valid_mean_recall": round(r["mean_recall"], 3)}


def validate_pretrain(model, store_path: Path, tokenizer, cfg, move) -> dict:
    """Pretraining on valid (polluted pairs and masks from a fixed seed): masked-token loss and
    accuracy, contrastive loss, accuracy and accuracy per class (0 matched, 1 wrong b, C-1 wrong a)."""
    from torch.utils.data import DataLoader

    dataset, collate = task_data("pretrain", store_path, tokenizer, model.config, cfg, seed=0)
    mlm, contrast, correct, total, n = 0.0, 0.0, 0, 0, 0
    hits = torch.zeros(model.config.num_contrast_classes)
    counts = torch.zeros(model.config.num_contrast_classes)
    for batch in DataLoader(dataset, batch_size=64, collate_fn=collate):
        out = model(**move(batch))
        labels = batch["contrast_labels"]
        mlm += out.mlm_loss.item() * len(out.mlm_correct)
        correct, total = correct + int(out.mlm_correct.sum()), total + len(out.mlm_correct)
        contrast += out.contrast_loss.item() * len(labels)
        n += len(labels)
        right = out.contrast_logits.argmax(-1).cpu() == labels
        hits += torch.bincount(labels[right], minlength=len(hits)).float()
        counts += torch.bincount(labels, minlength=len(counts)).float()
    result = {"valid_mlm_loss": round(mlm / max(total, 1), 5),
              "valid_mlm_accuracy": round(100.0 * correct / max(total, 1), 3),
              "valid_contrast_loss": round(contrast / max(n, 1), 5),
              "valid_contrast_accuracy": round(100.0 * float(hits.sum()) / max(n, 1), 3)}
    for k in range(len(counts)):
        result[f"valid_contrast_accuracy_{k}"] = round(100.0 * float(hits[k] / counts[k]), 3) if counts[k] else None
    return result
