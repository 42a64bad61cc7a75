"""Oscar-style captioning: ``[CLS] caption [SEP] tags [SEP]`` + regions in one BERT under a
seq2seq attention mask, trained by masked-token prediction on the caption, decoded by
greedy or beam search (one [MASK] appended per step).

With ``copy_tags`` the output is a pointer-generator mixture (See et al., 2017): a gate
``g`` per position mixes the vocabulary softmax with a copy distribution, an attention of
the position's state over the tag tokens' states, scattered onto those tokens' ids:
``p(w) = g p_vocab(w) + (1 - g) sum_{j: tag_j = w} a_j``. A model trained from scratch on
little data learns to copy the Chinese tags ("红色 圆形") into its caption far sooner than it
learns to read them through self-attention alone.

Sequence layout: a caption segment of exactly ``max_text_len`` positions (``[CLS]`` first),
the tag segment (token type 1, ``max_tag_len``), then up to ``max_regions`` regions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import nn
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from mmcn.models.base import VLConfig, VLPreTrainedModel


class CaptionConfig(VLConfig):
    model_type = "mmcn_caption"

    def __init__(self, label_smoothing: float = 0.1, drop_worst_ratio: float = 0.0, copy_tags: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.label_smoothing = label_smoothing
        self.drop_worst_ratio = drop_worst_ratio  # drop this share of the highest token losses (Oscar)
        self.copy_tags = copy_tags                # pointer-generator output: copy tag tokens


def seq2seq_mask(caption_mask: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
    """Who may attend to whom, (B, L, L) bool, for ``caption ⊕ context`` (context = tags + regions).

    Caption position i sees caption positions j <= i (valid ones) and all valid context;
    context positions see all valid context and no caption position.
    """
    b, la = caption_mask.shape
    lc = context_mask.shape[1]
    causal = torch.tril(torch.ones(la, la, dtype=torch.bool, device=caption_mask.device))
    top = torch.cat([causal[None] & caption_mask[:, None, :], context_mask[:, None, :].expand(b, la, lc)], dim=2)
    bottom = torch.cat([torch.zeros(b, lc, la, dtype=torch.bool, device=caption_mask.device),
                        context_mask[:, None, :].expand(b, lc, lc)], dim=2)
    return torch.cat([top, bottom], dim=1)


@dataclass
class CaptionOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor          # (n masked tokens, vocab) log-probabilities
    correct: torch.Tensor         # (n masked tokens,) bool


class CaptionModel(VLPreTrainedModel):
    config_class = CaptionConfig
    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                          "cls.predictions.decoder.bias": "cls.predictions.bias"}

    def __init__(self, config: CaptionConfig):
        super().__init__(config)
        self.cls = BertOnlyMLMHead(config)
        if config.copy_tags:
            h = config.hidden_size
            self.copy_query, self.copy_key, self.copy_gate = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, 1)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def hidden(self, caption_ids, caption_mask, tag_ids, tag_mask, img_feats, img_mask) -> torch.Tensor:
        """States of the caption segment then the tag segment (regions left out)."""
        input_ids = torch.cat([caption_ids, tag_ids], dim=1)
        token_type = torch.cat([torch.zeros_like(caption_ids), torch.ones_like(tag_ids)], dim=1)
        allowed = seq2seq_mask(caption_mask, torch.cat([tag_mask, img_mask], dim=1))
        return self.encode(input_ids, token_type, img_feats, allowed)[:, :input_ids.shape[1]]

    def log_probs(self, states: torch.Tensor, tag_states: torch.Tensor, tag_ids: torch.Tensor,
                  tag_mask: torch.Tensor) -> torch.Tensor:
        """log p(token) (N, vocab) at N caption positions; ``tag_*`` are those positions' images'
        tag segments (N, T, ...). Without ``copy_tags``: the vocabulary softmax."""
        vocab = self.cls(states).float().log_softmax(-1)
        if not self.config.copy_tags:
            return vocab
        scores = torch.einsum("nh,nth->nt", self.copy_query(states), self.copy_key(tag_states)).float()
        scores = scores / states.shape[-1] ** 0.5
        scores = scores.masked_fill(~tag_mask, float("-inf"))
        has_tags = tag_mask.any(1, keepdim=True)
        attention = scores.masked_fill(~has_tags, 0.0).softmax(-1) * has_tags
        copy = torch.zeros_like(vocab).scatter_add_(1, tag_ids, attention)
        gate = torch.sigmoid(self.copy_gate(states).float()).masked_fill(~has_tags, 1.0)
        return torch.logaddexp(vocab + gate.log(), (copy * (1 - gate)).clamp_min(1e-30).log())

    def forward(self, caption_ids, caption_mask, tag_ids, tag_mask, img_feats, img_mask, labels=None,
                **_) -> CaptionOutput:
        """Masked-token loss over the positions where ``labels`` != -100 (label smoothing, drop-worst)."""
        la = caption_ids.shape[1]
        hidden = self.hidden(caption_ids, caption_mask, tag_ids, tag_mask, img_feats, img_mask)
        where = labels != -100
        rows = where.nonzero()[:, 0]  # the image of each masked position
        logits = self.log_probs(hidden[:, :la][where], hidden[:, la:][rows], tag_ids[rows], tag_mask[rows])
        target = labels[where]
        losses = nnf.nll_loss(logits, target, reduction="none")
        if self.config.label_smoothing:
            eps = self.config.label_smoothing
            losses = (1 - eps) * losses - eps * logits.mean(-1)
        if self.training and self.config.drop_worst_ratio > 0 and len(losses) > 1:
            keep = len(losses) - int(len(losses) * self.config.drop_worst_ratio)
            losses = torch.topk(losses, keep, largest=False).values
        loss = losses.mean() if len(losses) else logits.sum() * 0.0
        return CaptionOutput(loss, logits, logits.argmax(-1) == target)

    @torch.no_grad()
    def generate(self, tag_ids, tag_mask, img_feats, img_mask, cls_id: int, sep_id: int, mask_id: int,
                 pad_id: int = 0, num_beams: int = 1, max_length: int = 20, length_penalty: float = 1.0,
                 no_repeat_ngram_size: int = 0) -> tuple[list[list[int]], list[float]]:
        """Captions (token ids without [CLS]/[SEP]) and their log-probabilities (divided by
        ``length ** length_penalty``, the length counting the closing [SEP]) for each image.

        At step t the caption segment is ``[CLS] y_1 .. y_{t-1} [MASK]`` and the token at
        position t is predicted; ``num_beams`` = 1 is greedy. Finished beams keep their score.
        """
        b, k, la = tag_ids.shape[0], num_beams, self.config.max_text_len
        steps = min(max_length + 1, la - 1)  # + 1 for the closing [SEP]
        dev = tag_ids.device
        rep = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731  (B, ...) -> (B*K, ...)
        tags, tmask, feats, fmask = rep(tag_ids), rep(tag_mask), rep(img_feats), rep(img_mask)
        seqs = torch.full((b * k, la), pad_id, dtype=torch.long, device=dev)
        seqs[:, 0] = cls_id
        scores = torch.zeros(b, k, device=dev)
        scores[:, 1:] = float("-inf")  # all beams start identical: keep one
        done = torch.zeros(b * k, dtype=torch.bool, device=dev)
        lengths = torch.zeros(b * k, dtype=torch.long, device=dev)
        for t in range(1, steps + 1):
            seqs[:, t] = mask_id
            cmask = torch.zeros(b * k, la, dtype=torch.bool, device=dev)
            cmask[:, :t + 1] = True
            hidden = self.hidden(seqs, cmask, tags, tmask, feats, fmask)
            logp = self.log_probs(hidden[:, t], hidden[:, la:], tags, tmask).clone()
            logp[:, [pad_id, cls_id, mask_id]] = float("-inf")
            if t == steps:  # out of room: close every open caption
                logp[:, :] = float("-inf")
                logp[:, sep_id] = 0.0
            if no_repeat_ngram_size:
                _ban_repeats(logp, seqs[:, 1:t], no_repeat_ngram_size)
            logp[done] = float("-inf")
            logp[done, pad_id] = 0.0  # a finished beam continues with padding at no cost
            vocab = logp.shape[1]
            cand = (scores.view(b * k, 1) + logp).view(b, k * vocab)
            top, idx = cand.topk(k, dim=1)
            beam = idx // vocab + torch.arange(b, device=dev)[:, None] * k
            token = idx % vocab
            seqs, done, lengths = seqs[beam.view(-1)], done[beam.view(-1)], lengths[beam.view(-1)]
            seqs[:, t] = token.view(-1)
            lengths = lengths + (~done).long()
            done = done | (token.view(-1) == sep_id)
            scores = top
            if done.all():
                break
        norm = scores / lengths.view(b, k).clamp(min=1).float() ** length_penalty
        best = norm.argmax(dim=1)
        out, out_scores = [], []
        for i in range(b):
            row = seqs[i * k + best[i], 1:].tolist()
            out.append(row[:row.index(sep_id)] if sep_id in row else [x for x in row if x != pad_id])
            out_scores.append(float(norm[i, best[i]]))
        return out, out_scores


def _ban_repeats(logp: torch.Tensor, prefix: torch.Tensor, n: int) -> None:
    """Forbid tokens that would repeat an n-gram already in each prefix (in place)."""
    length = prefix.shape[1]
    if length < n - 1 or n < 1:
        return
    rows = prefix.tolist()
    for r, seq in enumerate(rows):
        tail = tuple(seq[length - n + 1:]) if n > 1 else ()
        banned = [seq[i + n - 1] for i in range(length - n + 1) if tuple(seq[i:i + n - 1]) == tail]
        if banned:
            logp[r, banned] = float("-inf")
