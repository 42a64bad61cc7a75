"""Oscar-style captioning: ``[CLS] caption [SEP] tags [SEP]`` + regions in one BERT under a
seq2seq attention mask, trained by masked-token prediction on the caption, decoded by
greedy or beam search (one [MASK] appended per step).

Sequence layout: a caption segment of exactly ``max_text_len`` positions (``[CLS]`` first),
the tag segment (token type 1, ``max_tag_len``), then up to ``max_regions`` regions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from mmcn.models.base import VLConfig, VLPreTrainedModel


class CaptionConfig(VLConfig):
    model_type = "mmcn_caption"

    def __init__(self, label_smoothing: float = 0.1, drop_worst_ratio: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.label_smoothing = label_smoothing
        self.drop_worst_ratio = drop_worst_ratio  # drop this share of the highest token losses (Oscar)


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
    logits: torch.Tensor          # (n masked tokens, vocab)
    correct: torch.Tensor         # (n masked tokens,) bool


class CaptionModel(VLPreTrainedModel):
    config_class = CaptionConfig
    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                          "cls.predictions.decoder.bias": "cls.predictions.bias"}

    def __init__(self, config: CaptionConfig):
        super().__init__(config)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def hidden(self, caption_ids, caption_mask, tag_ids, tag_mask, img_feats, img_mask) -> torch.Tensor:
        input_ids = torch.cat([caption_ids, tag_ids], dim=1)
        token_type = torch.cat([torch.zeros_like(caption_ids), torch.ones_like(tag_ids)], dim=1)
        allowed = seq2seq_mask(caption_mask, torch.cat([tag_mask, img_mask], dim=1))
        return self.encode(input_ids, token_type, img_feats, allowed)[:, :caption_ids.shape[1]]

    def forward(self, caption_ids, caption_mask, tag_ids, tag_mask, img_feats, img_mask, labels=None,
                **_) -> CaptionOutput:
        """Masked-token loss over the positions where ``labels`` != -100 (label smoothing, drop-worst)."""
        hidden = self.hidden(caption_ids, caption_mask, tag_ids, tag_mask, img_feats, img_mask)
        where = labels != -100
        logits = self.cls(hidden[where])
        target = labels[where]
        losses = nnf.cross_entropy(logits.float(), target, reduction="none",
                                   label_smoothing=self.config.label_smoothing)
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
            logp = self.cls(self.hidden(seqs, cmask, tags, tmask, feats, fmask)[:, t]).float().log_softmax(-1)
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
