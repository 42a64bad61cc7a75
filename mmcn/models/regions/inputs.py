"""Collators: dataset items (:mod:`mmcn.data.datasets`) -> the padded tensors the models take.

Text segments are ``[CLS] tokens [SEP]`` padded to the config's fixed length (so token
positions match between training and generation); tag segments ``tokens [SEP]`` (with a
leading [CLS] where the segment opens the sequence); regions padded to the longest in the
batch (at most ``max_regions``) with a mask.
"""
from __future__ import annotations

import torch

from mmcn.models.regions.base import VLConfig
from mmcn.models.regions.retrieval import random_negatives


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


def packed_tags(tokenizer, texts: list[str], text_lengths: list[int], max_seq_length: int,
                length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tag segments ``tokens [SEP]`` cut as Oscar's retrieval packs a pair into
    ``max_seq_length`` (``tensorize_example`` of oscar/run_retrieval.py): the tags keep at most
    ``max_seq_length - len([CLS] text [SEP]) - 1`` tokens; padded to ``length``."""
    ids = torch.full((len(texts), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), length), dtype=torch.bool)
    if length == 0:
        return ids, mask
    for i, (tokens, used) in enumerate(zip(tokenizer(texts, add_special_tokens=False)["input_ids"], text_lengths)):
        row = (tokens[:max(max_seq_length - used - 1, 0)] + [tokenizer.sep_token_id])[:length]
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


MASK_TYPES = ("mmcn", "oscar")


class CaptionCollator:
    """Caption batches. ``train``: mask caption tokens and return their ``labels``.

    ``mask_type: mmcn``: the candidates are the positions after [CLS] up to and including
    the closing [SEP] (``m`` of them); ``max(1, min(max_masked, round(mask_prob * m)))`` are
    masked, as BERT does (80% [MASK], 10% a random token of the whole tokenizer, 10% kept).

    ``mask_type: oscar``: ``CaptionTensorizer.tensorize_example`` of oscar/run_captioning.py
    (training): the same candidates (``range(1, seq_a_len)``: [SEP] included, [CLS] and
    padding never); ``min(max(round(mask_prob * L), 1), max_masked)`` masked, where ``L`` =
    ``m + 1`` counts the [CLS] too (Python's ``round``: halves to even); each masked one becomes
    [MASK] if a uniform draw is <= 0.8, else, if a second draw is <= 0.5, a random token
    (``randint(0, len(vocab))``, both ends included: the id one past the vocabulary is
    [UNK]), else stays. Oscar's defaults and values: ``mask_prob`` 0.15, ``max_masked`` 3.
    """

    def __init__(self, tokenizer, config: VLConfig, train: bool = True, mask_prob: float = 0.15,
                 max_masked: int = 3, generator: torch.Generator | None = None, mask_type: str = "mmcn"):
        if mask_type not in MASK_TYPES:
            raise ValueError(f"caption mask_type must be one of {', '.join(MASK_TYPES)}, got {mask_type!r}")
        self.tokenizer, self.config, self.train = tokenizer, config, train
        self.mask_prob, self.max_masked = mask_prob, max_masked
        self.generator = generator
        self.mask_type = mask_type

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
                if self.mask_type == "oscar":
                    self._mask_oscar(ids[i], labels[i], int(mask[i].sum()))
                    continue
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

    def _mask_oscar(self, ids: torch.Tensor, labels: torch.Tensor, length: int) -> None:
        """Oscar's masking (see the class) of one caption row in place; ``length`` counts
        [CLS] .. [SEP]."""
        tok, g = self.tokenizer, self.generator
        candidates = torch.arange(1, length)
        n = min(max(round(self.mask_prob * length), 1), self.max_masked)
        chosen = candidates[torch.randperm(len(candidates), generator=g)[:n]]
        labels[chosen] = ids[chosen]
        first, second = torch.rand(len(chosen), generator=g), torch.rand(len(chosen), generator=g)
        to_mask = first <= 0.8
        to_random = ~to_mask & (second <= 0.5)
        vocab = tok.vocab_size  # Oscar: len(tokenizer.vocab), the vocabulary file's entries
        drawn = torch.randint(vocab + 1, (len(chosen),), generator=g)
        drawn[drawn == vocab] = tok.unk_token_id  # Oscar's id -> token lookup answers [UNK] past the end
        ids[chosen[to_mask]] = tok.mask_token_id
        ids[chosen[to_random]] = drawn[to_random]


class RetrievalCollator:
    """Retrieval batches of (text, image) pairs: the text segment, the image's tag segment
    twice (with [CLS] for the image tower, without for the matcher), regions and ids. With
    the config's ``negatives: random``, batches of whole pairs also carry each pair's random
    negative (``neg_partner``, ``neg_swap_text``: :func:`mmcn.models.regions.retrieval.random_negatives`),
    drawn from ``generator``."""

    def __init__(self, tokenizer, config: VLConfig, generator: torch.Generator | None = None):
        self.tokenizer, self.config = tokenizer, config
        self.generator = generator

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
        if getattr(c, "match_head", "mmcn") == "oscar" and "text_mask" in batch and "tag_ids" in batch:
            batch["tag_ids"], batch["tag_mask"] = packed_tags(tok, tags, batch["text_mask"].sum(1).tolist(),
                                                              c.max_text_len, tag_len)
        if getattr(c, "negatives", "hardest") == "random" and "text_ids" in batch and "image_ids" in batch:
            batch["neg_partner"], batch["neg_swap_text"] = random_negatives(batch["image_ids"], batch["text_ids_key"],
                                                                            self.generator)
        return batch


def truncate_pair(a: list[int], b: list[int], room: int) -> None:
    """Oscar's ``_truncate_seq_pair``: drop the last token of the longer list (of b on a tie)
    until both fit in ``room`` together; in place."""
    while len(a) + len(b) > room:
        (a if len(a) > len(b) else b).pop()


class PretrainCollator:
    """Oscar+ pretraining batches, as ``OscarTSVDataset`` (oscar/datasets/oscar_tsv.py) makes them.

    Per item (a caption a, its image's tag text b, regions), from ``generator``:

    * **polluted pairs** (``random_sent``): a uniform draw u; u > 0.5 keeps the pair (label 0);
      else if u > ``texta_false_prob`` and b is not empty, b is replaced by another pair's text
      (label 1; ``textb_sample_mode`` 1: that pair's tag text, 0: its caption or tag text, one
      chance in two); else a is replaced by another pair's caption (label C - 1). "Another
      pair": a uniform draw over the ``pool``'s pairs, redrawn up to 10 times while it shows
      the same image;
    * **truncation**: a and b cut longest-first to ``max_text_len - 3`` tokens together;
    * **masking** (``random_word``): every token of a and of b independently with probability
      ``mask_prob``: then 80% [MASK], 10% a random token, 10% kept, and its id is the label;
      b keeps no label when ``mask_loss_for_unmatched`` is false and the pair's label is 1;
    * the sequence ``[CLS] a [SEP] b [SEP]`` (token types 0 then 1; ``[CLS] a [SEP]`` alone when b
      is empty) padded to ``max_text_len``; regions (at most ``max_regions``) padded with a mask.
      Regions are never masked.
    """

    def __init__(self, tokenizer, config, pool, mask_prob: float = 0.15, generator: torch.Generator | None = None):
        self.tokenizer, self.config, self.pool = tokenizer, config, pool
        self.mask_prob = mask_prob
        self.generator = generator

    def _rand(self) -> float:
        return float(torch.rand(1, generator=self.generator))

    def _other(self, image_id: int) -> int:
        for _ in range(10):
            j = int(torch.randint(len(self.pool), (1,), generator=self.generator))
            if self.pool.pair_image_id(j) != image_id:
                break
        return j

    def pollute(self, item: dict) -> tuple[str, str, int]:
        """``(a, b, label)`` of one item (see the class)."""
        c = self.config
        a, b = item["caption"], item["tags"]
        u = self._rand()
        if u > 0.5:
            return a, b, 0
        if u > c.texta_false_prob and b:
            j = self._other(item["image_id"])
            if c.textb_sample_mode == 0 and self._rand() < 0.5:
                return a, self.pool.pair_caption(j), 1
            return a, self.pool.pair_tags(j), 1
        return self.pool.pair_caption(self._other(item["image_id"])), b, c.num_contrast_classes - 1

    def mask(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """``(ids, labels)`` after BERT's masking of every token with probability ``mask_prob``."""
        tok = self.tokenizer
        out, labels = list(ids), [-100] * len(ids)
        for k, token in enumerate(ids):
            p = self._rand()
            if p >= self.mask_prob:
                continue
            p /= self.mask_prob
            labels[k] = token
            if p < 0.8:
                out[k] = tok.mask_token_id
            elif p < 0.9:
                out[k] = int(torch.randint(len(tok), (1,), generator=self.generator))
        return out, labels

    def __call__(self, items: list[dict]) -> dict:
        c, tok = self.config, self.tokenizer
        length = c.max_text_len
        ids = torch.full((len(items), length), tok.pad_token_id, dtype=torch.long)
        types = torch.zeros((len(items), length), dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.bool)
        lm_labels = torch.full((len(items), length), -100, dtype=torch.long)
        contrast = torch.zeros(len(items), dtype=torch.long)
        for i, item in enumerate(items):
            a, b, label = self.pollute(item)
            ta, tb = tok([a, b], add_special_tokens=False)["input_ids"]
            truncate_pair(ta, tb, length - 3)
            ta, la = self.mask(ta)
            if tb and (c.mask_loss_for_unmatched or label != 1):
                tb, lb = self.mask(tb)
            else:
                lb = [-100] * len(tb)
            row = [tok.cls_token_id, *ta, tok.sep_token_id]
            labels = [-100, *la, -100]
            if tb:
                row += [*tb, tok.sep_token_id]
                labels += [*lb, -100]
                types[i, len(ta) + 2:len(row)] = 1
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = True
            lm_labels[i, :len(row)] = torch.tensor(labels)
            contrast[i] = label
        feats, img_mask = regions(items, c.max_regions, c.img_feature_dim)
        return {"input_ids": ids, "token_type_ids": types, "text_mask": mask, "img_feats": feats, "img_mask": img_mask,
                "lm_labels": lm_labels, "contrast_labels": contrast,
                "image_id": torch.tensor([it["image_id"] for it in items])}
