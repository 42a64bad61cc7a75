"""Image-text retrieval on one shared BERT (Oscar-style), with two ways to score a pair:

* a **dual encoder** for fast ranking over a whole split: text ``[CLS] text [SEP]`` and
  image ``[CLS] tags [SEP]`` + regions are encoded separately, their states mean-pooled,
  projected and L2-normalised; trained with symmetric InfoNCE and a learnable temperature;
* a **cross-encoder matcher** ``[CLS] text [SEP] tags [SEP]`` + regions -> match / no match,
  trained on the positives and on negatives made by swapping in the hardest other text
  or image of the batch; it re-ranks the dual encoder's top k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import nn

from mmcn.models.base import VLConfig, VLPreTrainedModel, bidirectional


class RetrievalConfig(VLConfig):
    model_type = "mmcn_retrieval"

    def __init__(self, embed_dim: int = 256, init_temperature: float = 0.07, match_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.init_temperature = init_temperature  # learnt from there
        self.match_weight = match_weight    # weight of the matcher's loss


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


class RetrievalModel(VLPreTrainedModel):
    config_class = RetrievalConfig

    def __init__(self, config: RetrievalConfig):
        super().__init__(config)
        self.text_proj = nn.Linear(config.hidden_size, config.embed_dim)
        self.image_proj = nn.Linear(config.hidden_size, config.embed_dim)
        self.match_head = nn.Linear(config.hidden_size, 2)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        self.post_init()

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encode(text_ids, torch.zeros_like(text_ids), None, bidirectional(text_mask))
        return nnf.normalize(self.text_proj(_mean(hidden, text_mask)).float(), dim=-1)

    def encode_image(self, tag_ids, tag_mask, img_feats, img_mask) -> torch.Tensor:
        """``tag_ids``: ``[CLS] tags [SEP]``; the embedding pools tags and regions."""
        keys = torch.cat([tag_mask, img_mask], dim=1)
        hidden = self.encode(tag_ids, torch.ones_like(tag_ids), img_feats, bidirectional(keys))
        return nnf.normalize(self.image_proj(_mean(hidden, keys)).float(), dim=-1)

    def match_logits(self, text_ids, text_mask, tag_ids, tag_mask, img_feats, img_mask) -> torch.Tensor:
        """(B, 2) no-match / match logits of text i with image i; ``tag_ids`` without [CLS]."""
        input_ids = torch.cat([text_ids, tag_ids], dim=1)
        token_type = torch.cat([torch.zeros_like(text_ids), torch.ones_like(tag_ids)], dim=1)
        keys = torch.cat([text_mask, tag_mask, img_mask], dim=1)
        return self.match_head(self.encode(input_ids, token_type, img_feats, bidirectional(keys))[:, 0]).float()

    def match_score(self, *args) -> torch.Tensor:
        """log P(match) of each pair (the re-ranking score)."""
        return self.match_logits(*args).log_softmax(-1)[:, 1]

    def forward(self, text_ids, text_mask, image_tag_ids, image_tag_mask, tag_ids, tag_mask, img_feats, img_mask,
                image_ids, text_ids_key, **_) -> RetrievalOutput:
        """InfoNCE over the batch (every pair of the same image or text counts as positive)
        plus the matcher's loss on positives and on hardest in-batch negatives."""
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
