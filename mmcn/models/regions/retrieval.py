"""Image-text retrieval on one shared BERT (Oscar-style), with two ways to score a pair:

* a **dual encoder** for fast ranking over a whole split: text ``[CLS] text [SEP]`` and
  image ``[CLS] tags [SEP]`` + regions are encoded separately, their states mean-pooled,
  projected and L2-normalised; trained with symmetric InfoNCE and a learnable temperature;
* a **cross-encoder matcher** ``[CLS] text [SEP] tags [SEP]`` + regions -> match / no match,
  trained on the positives and on negatives made by swapping in the hardest other text
  or image of the batch (``negatives: hardest``) or, as Oscar, one random other text or
  image per positive (``negatives: random``); it re-ranks the dual encoder's top k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import nn

from mmcn.models.regions.base import VLConfig, VLPreTrainedModel, bidirectional


MATCH_HEADS = ("mmcn", "oscar")
NEGATIVES = ("hardest", "random")


class RetrievalConfig(VLConfig):
    model_type = "mmcn_retrieval"

    def __init__(self, embed_dim: int = 256, init_temperature: float = 0.07, match_weight: float = 1.0,
                 dual_encoder: bool = True, match_head: str = "mmcn", negatives: str = "hardest", **kwargs):
        super().__init__(**kwargs)
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives: retrieval negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
        if match_head not in MATCH_HEADS:
            raise ValueError(f"match_head: must be one of {', '.join(MATCH_HEADS)}, got {match_head!r}")
        if not match_weight >= 0:
            raise ValueError(f"match_weight: must be >= 0 (0: no matcher), got {match_weight!r}")
        if not embed_dim >= 1:
            raise ValueError(f"embed_dim: must be >= 1, got {embed_dim!r}")
        if match_head == "oscar" and not self.add_pooler:
            raise ValueError("match_head 'oscar' scores the pooled [CLS] state: it needs add_pooler")
        if not dual_encoder and not match_weight:
            raise ValueError("a model without a dual encoder (dual_encoder false) ranks with its matcher: "
                             "match_weight must be > 0")
        if not dual_encoder and negatives != "random":
            raise ValueError("a model without a dual encoder trains its matcher on random negatives (hardest "
                             "ones come from the dual encoder's similarities): set negatives: random")
        self.embed_dim = embed_dim
        self.init_temperature = init_temperature  # learnt from there
        self.match_weight = match_weight    # weight of the matcher's loss
        self.negatives = negatives          # the matcher's negatives: hardest in-batch | random (one per positive, Oscar)
        self.dual_encoder = dual_encoder    # text/image projections for fast ranking (Oscar's checkpoints have none)
        self.match_head = match_head        # mmcn: linear on the [CLS] state; oscar: dropout(pooler) -> linear,
                                            # text positions packed (cumsum of the text mask - 1), as Oscar


@dataclass
class RetrievalOutput:
    loss: torch.Tensor
    contrastive_loss: torch.Tensor
    match_loss: torch.Tensor
    similarity: torch.Tensor       # (B, B) text x image cosine similarities


def _mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the valid positions' states: unlike a fresh model's [CLS] state, which is
    nearly the same for every input, it starts out telling inputs apart."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def random_negatives(image_ids: torch.Tensor, text_keys: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One random negative for each positive pair of a batch (``negatives: random``).

    Oscar's rule (``RetrievalDataset.__getitem__`` in oscar/run_retrieval.py, training): for
    each positive (caption, image), pick a uniformly random *other* image; with probability
    0.5 (``random.random() <= 0.5``) the negative is a random caption of that image paired
    with the positive's image, otherwise the positive's caption paired with that image; the
    pair gets label 0. Here the other pair is drawn from the batch rather than the whole
    split (the batch being a uniform sample of the split's pairs): partner ``j`` uniform among
    the pairs that share neither the image nor the text with pair ``i`` (Oscar does not check
    texts: a caption repeated on two images can be its false negative).

    Returns ``partner`` (B,) long, -1 where no pair qualifies, and ``swap_text`` (B,) bool:
    True for (text ``j``, image ``i``), False for (text ``i``, image ``j``).
    """
    b = len(image_ids)
    allowed = (image_ids[:, None] != image_ids[None, :]) & (text_keys[:, None] != text_keys[None, :])
    draw = torch.rand(b, b, generator=generator).masked_fill(~allowed.cpu(), -1.0)
    partner = draw.argmax(1)  # the largest of iid uniforms: a uniform choice among the allowed
    partner[~allowed.cpu().any(1)] = -1
    swap_text = torch.rand(b, generator=generator) <= 0.5
    return partner.to(image_ids.device), swap_text.to(image_ids.device)


class RetrievalModel(VLPreTrainedModel):
    config_class = RetrievalConfig

    def __init__(self, config: RetrievalConfig):
        super().__init__(config)
        if config.dual_encoder:
            self.text_proj = nn.Linear(config.hidden_size, config.embed_dim)
            self.image_proj = nn.Linear(config.hidden_size, config.embed_dim)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        self.match_head = nn.Linear(config.hidden_size, 2)
        self.match_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.post_init()

    def _dual(self) -> None:
        if not self.config.dual_encoder:
            raise ValueError("this retrieval model has no dual encoder (an Oscar-style matcher only): "
                             "rank by scoring each (text, image) pair with match_score")

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        self._dual()
        hidden = self.encode(text_ids, torch.zeros_like(text_ids), None, bidirectional(text_mask))
        return nnf.normalize(self.text_proj(_mean(hidden, text_mask)).float(), dim=-1)

    def encode_image(self, tag_ids, tag_mask, img_feats, img_mask) -> torch.Tensor:
        """``tag_ids``: ``[CLS] tags [SEP]``; the embedding pools tags and regions."""
        self._dual()
        keys = torch.cat([tag_mask, img_mask], dim=1)
        hidden = self.encode(tag_ids, torch.ones_like(tag_ids), img_feats, bidirectional(keys))
        return nnf.normalize(self.image_proj(_mean(hidden, keys)).float(), dim=-1)

    def match_logits(self, text_ids, text_mask, tag_ids, tag_mask, img_feats, img_mask) -> torch.Tensor:
        """(B, 2) no-match / match logits of text i with image i; ``tag_ids`` without [CLS]."""
        input_ids = torch.cat([text_ids, tag_ids], dim=1)
        token_type = torch.cat([torch.zeros_like(text_ids), torch.ones_like(tag_ids)], dim=1)
        keys = torch.cat([text_mask, tag_mask, img_mask], dim=1)
        if self.config.match_head == "mmcn":
            return self.match_head(self.encode(input_ids, token_type, img_feats, bidirectional(keys))[:, 0]).float()
        # Oscar: [CLS] text [SEP] tags [SEP] as one packed run of positions, the pooled [CLS]
        text_keys = torch.cat([text_mask, tag_mask], dim=1)
        positions = (text_keys.long().cumsum(1) - 1).clamp(min=0)
        hidden = self.encode(input_ids, token_type, img_feats, bidirectional(keys), position_ids=positions)
        return self.match_head(self.match_dropout(self.bert.pooler(hidden))).float()

    def random_negative_loss(self, text_ids, text_mask, tag_ids, tag_mask, img_feats, img_mask, image_ids,
                             text_ids_key, partner=None, swap_text=None) -> torch.Tensor:
        """The matcher's cross entropy over the positives (label 1) and one random negative per
        positive (label 0, :func:`random_negatives`), averaged over all of them (Oscar)."""
        if partner is None or swap_text is None:
            partner, swap_text = random_negatives(image_ids, text_ids_key)
        rows = (partner >= 0).nonzero().squeeze(1)
        other, swap = partner[rows], swap_text[rows]
        t_, i_ = torch.where(swap, other, rows), torch.where(swap, rows, other)
        pos = self.match_logits(text_ids, text_mask, tag_ids, tag_mask, img_feats, img_mask)
        logits, labels = [pos], [torch.ones(len(pos), dtype=torch.long, device=pos.device)]
        if len(rows):
            neg = self.match_logits(text_ids[t_], text_mask[t_], tag_ids[i_], tag_mask[i_], img_feats[i_], img_mask[i_])
            logits.append(neg)
            labels.append(torch.zeros(len(neg), dtype=torch.long, device=neg.device))
        return nnf.cross_entropy(torch.cat(logits), torch.cat(labels))

    def match_score(self, *args) -> torch.Tensor:
        """log P(match) of each pair (the re-ranking score)."""
        return self.match_logits(*args).log_softmax(-1)[:, 1]

    def forward(self, text_ids, text_mask, image_tag_ids, image_tag_mask, tag_ids, tag_mask, img_feats, img_mask,
                image_ids, text_ids_key, neg_partner=None, neg_swap_text=None, **_) -> RetrievalOutput:
        """InfoNCE over the batch (every pair of the same image or text counts as positive)
        plus the matcher's loss: ``negatives: hardest``, the mean of its cross entropies on the
        positives, on each text with its hardest in-batch image and on each image with its
        hardest in-batch text; ``negatives: random``, as Oscar (``ImageBertForSequenceClassification``,
        ``loss_type`` sfmx: cross entropy over 2 classes, mean over positives and negatives
        together), on the positives (label 1) and one negative each (label 0) from
        ``neg_partner`` / ``neg_swap_text`` (:func:`random_negatives`, which the collator draws
        with its seeded generator; drawn here from torch's global one when not given).

        Without a dual encoder (``dual_encoder: false``, an Oscar retrieval checkpoint) the
        matcher alone is trained, as Oscar trains it (``negatives`` must be random: hardest
        negatives need the dual encoder's similarities)."""
        if not self.config.dual_encoder:
            match_loss = self.random_negative_loss(text_ids, text_mask, tag_ids, tag_mask, img_feats, img_mask,
                                                   image_ids, text_ids_key, neg_partner, neg_swap_text)
            zero = match_loss.detach() * 0.0
            return RetrievalOutput(match_loss, zero, match_loss.detach(), torch.zeros(0, 0, device=match_loss.device))
        t = self.encode_text(text_ids, text_mask)
        v = self.encode_image(image_tag_ids, image_tag_mask, img_feats, img_mask)
        sim = t @ v.T
        positive = (image_ids[:, None] == image_ids[None, :]) | (text_ids_key[:, None] == text_ids_key[None, :])
        logits = sim * self.logit_scale.clamp(max=math.log(100.0)).exp()
        t2i = -(logits.log_softmax(1).masked_fill(~positive, float("-inf")).logsumexp(1))
        i2t = -(logits.log_softmax(0).masked_fill(~positive, float("-inf")).logsumexp(0))
        contrastive = (t2i.mean() + i2t.mean()) / 2

        if not self.config.match_weight:  # the matcher is not trained (and re-ranking is unavailable)
            zero = contrastive.detach() * 0.0
            return RetrievalOutput(contrastive, contrastive.detach(), zero, sim.detach())
        if self.config.negatives == "random":
            match_loss = self.random_negative_loss(text_ids, text_mask, tag_ids, tag_mask, img_feats, img_mask,
                                                   image_ids, text_ids_key, neg_partner, neg_swap_text)
            loss = contrastive + self.config.match_weight * match_loss
            return RetrievalOutput(loss, contrastive.detach(), match_loss.detach(), sim.detach())
        with torch.no_grad():  # hardest negatives: the most similar non-matching image / text
            masked = sim.detach().masked_fill(positive, float("-inf"))
            texts_with_neg = torch.isfinite(masked).any(1).nonzero().squeeze(1)
            images_with_neg = torch.isfinite(masked).any(0).nonzero().squeeze(1)
            neg_image = masked.argmax(1)[texts_with_neg]    # for those texts
            neg_text = masked.argmax(0)[images_with_neg]    # for those images
        pos = self.match_logits(text_ids, text_mask, tag_ids, tag_mask, img_feats, img_mask)
        match = [nnf.cross_entropy(pos, torch.ones(len(pos), dtype=torch.long, device=pos.device))]
        if len(texts_with_neg):
            t_, i_ = texts_with_neg, neg_image
            neg = self.match_logits(text_ids[t_], text_mask[t_], tag_ids[i_], tag_mask[i_], img_feats[i_], img_mask[i_])
            match.append(nnf.cross_entropy(neg, torch.zeros(len(neg), dtype=torch.long, device=neg.device)))
        if len(images_with_neg):
            t_, i_ = neg_text, images_with_neg
            neg = self.match_logits(text_ids[t_], text_mask[t_], tag_ids[i_], tag_mask[i_], img_feats[i_], img_mask[i_])
            match.append(nnf.cross_entropy(neg, torch.zeros(len(neg), dtype=torch.long, device=neg.device)))
        match_loss = sum(match) / len(match)
        loss = contrastive + self.config.match_weight * match_loss
        return RetrievalOutput(loss, contrastive.detach(), match_loss.detach(), sim.detach())
