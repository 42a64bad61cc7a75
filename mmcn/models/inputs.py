"""Collators: dataset items (:mod:`mmcn.data.datasets`) -> the padded tensors the models take.

Text segments are ``[CLS] tokens [SEP]`` padded to the config's fixed length (so token
positions match between training and generation); tag segments ``tokens [SEP]`` (with a
leading [CLS] where the segment opens the sequence); regions padded to the longest in the
batch (at most ``max_regions``) with a mask.
"""
from __future__ import annotations

import torch

from mmcn.models.base import VLConfig


def segment(tokenizer, texts: list[str], length: int, cls: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``([CLS]) tokens [SEP]`` of each text, truncated and padded to ``length``; ids and mask."""
    ids = torch.full((len(texts), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), length), dtype=torch.bool)
    if length == 0:
        return ids, mask
    head = [tokenizer.cls_token_id] if cls else []
    room = length - len(head) - 1
    for i, tokens in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        row = (head + tokens[:max(room, 0)] + [tokenizer.sep_token_id])[:length]
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = True
    return ids, mask


def regions(items: list[dict], max_regions: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(max_regions, max(len(it["features"]) for it in items))
    feats = torch.zeros(len(items), n, dim)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for i, it in enumerate(items):
        f = torch.as_tensor(it["features"][:n])
        feats[i, :len(f)] = f
        mask[i, :len(f)] = True
    return feats, mask


def tag_texts(items: list[dict], config: VLConfig) -> list[str]:
    return [it["tags"] if config.add_od_labels else "" for it in items]


class CaptionCollator:
    """Caption batches. ``train``: mask caption tokens (incl. the closing [SEP]) with
    probability ``mask_prob``, at least one and at most ``max_masked`` per caption, as
    BERT does (80% [MASK], 10% a random token, 10% kept), and return their ``labels``."""

    def __init__(self, tokenizer, config: VLConfig, train: bool = True, mask_prob: float = 0.15,
                 max_masked: int = 3, generator: torch.Generator | None = None):
        self.tokenizer, self.config, self.train = tokenizer, config, train
        self.mask_prob, self.max_masked = mask_prob, max_masked
        self.generator = generator

    def __call__(self, items: list[dict]) -> dict:
        c, tok = self.config, self.tokenizer
        tag_len = c.max_tag_len if c.add_od_labels else 0
        tag_ids, tag_mask = segment(tok, tag_texts(items, c), tag_len, cls=False)
        feats, img_mask = regions(items, c.max_regions, c.img_feature_dim)
        batch = {"tag_ids": tag_ids, "tag_mask": tag_mask, "img_feats": feats, "img_mask": img_mask,
                 "image_id": torch.tensor([it["image_id"] for it in items])}
        if self.train:
            ids, mask = segment(tok, [it["caption"] for it in items], c.max_text_len, cls=True)
            labels = torch.full_like(ids, -100)
            for i in range(len(items)):
                candidates = torch.arange(1, int(mask[i].sum()))  # after [CLS], up to and incl. [SEP]
                n = max(1, min(self.max_masked, round(self.mask_prob * len(candidates))))
                chosen = candidates[torch.randperm(len(candidates), generator=self.generator)[:n]]
                labels[i, chosen] = ids[i, chosen]
                roll = torch.rand(len(chosen), generator=self.generator)
                ids[i, chosen[roll < 0.8]] = tok.mask_token_id
                swap = chosen[(roll >= 0.8) & (roll < 0.9)]
                ids[i, swap] = torch.randint(len(tok), (len(swap),), generator=self.generator)
            batch.update(caption_ids=ids, caption_mask=mask, labels=labels)
        return batch


class RetrievalCollator:
    """Retrieval batches of (text, image) pairs: the text segment, the image's tag segment
    twice (with [CLS] for the image tower, without for the matcher), regions and ids."""

    def __init__(self, tokenizer, config: VLConfig):
        self.tokenizer, self.config = tokenizer, config

    def __call__(self, items: list[dict]) -> dict:
        c, tok = self.config, self.tokenizer
        batch = {}
        if "text" in items[0]:
            batch["text_ids"], batch["text_mask"] = segment(tok, [it["text"] for it in items], c.max_text_len, cls=True)
            batch["text_ids_key"] = torch.tensor([it["text_id"] for it in items])
        if "features" in items[0]:
            tags = tag_texts(items, c)
            tag_len = c.max_tag_len if c.add_od_labels else 0
            batch["image_tag_ids"], batch["image_tag_mask"] = segment(tok, tags, tag_len + 1, cls=True)
            batch["tag_ids"], batch["tag_mask"] = segment(tok, tags, tag_len, cls=False)
            batch["img_feats"], batch["img_mask"] = regions(items, c.max_regions, c.img_feature_dim)
            batch["image_ids"] = torch.tensor([it["image_id"] for it in items])
        return batch
