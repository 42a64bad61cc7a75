"""Oscar-style captioning: ``[CLS] caption [SEP] tags [SEP]`` + regions in one BERT under a
seq2seq attention mask, trained by masked-token prediction on the caption, decoded by
greedy or beam search (one [MASK] appended per step): mmcn's own (:meth:`CaptionModel.generate`)
or microsoft/Oscar's, rule for rule (:meth:`CaptionModel.generate_oscar`).

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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import nn
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from mmcn.models.regions.base import MaskedTokenHeadModel, VLConfig


class CaptionConfig(VLConfig):
    model_type = "mmcn_caption"

    def __init__(self, label_smoothing: float = 0.1, drop_worst_ratio: float = 0.0, copy_tags: bool = False,
                 loss_form: str = "mmcn", drop_worst_after: int = 0, **kwargs):
        super().__init__(**kwargs)
        if loss_form not in LOSS_FORMS:
            raise ValueError(f"loss_form: caption loss form must be one of {', '.join(LOSS_FORMS)}, got {loss_form!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: must be in [0, 1), got {label_smoothing!r}")
        if not 0.0 <= drop_worst_ratio < 1.0:
            raise ValueError(f"drop_worst_ratio: must be in [0, 1), got {drop_worst_ratio!r}")
        if isinstance(drop_worst_after, bool) or not isinstance(drop_worst_after, int) or drop_worst_after < 0:
            raise ValueError(f"drop_worst_after: must be an integer >= 0 (training forwards), "
                             f"got {drop_worst_after!r}")
        self.label_smoothing = label_smoothing
        self.drop_worst_ratio = drop_worst_ratio  # drop this share of the highest token losses (Oscar)
        self.drop_worst_after = drop_worst_after  # ... only once this many training forwards are done (Oscar)
        self.loss_form = loss_form                # mmcn | oscar: see masked_token_losses
        self.copy_tags = copy_tags                # pointer-generator output: copy tag tokens


LOSS_FORMS = ("mmcn", "oscar")


def masked_token_losses(logp: torch.Tensor, target: torch.Tensor, eps: float, form: str = "mmcn") -> torch.Tensor:
    """Per-token loss (N,) of log-probabilities ``logp`` (N, V) against ``target`` (N,), label
    smoothing ``eps``.

    * ``mmcn``: cross entropy to ``(1 - eps) one_hot + eps / V`` (the smoothing mass spread over
      all V tokens, the target included), less its constant entropy:
      ``(1 - eps) nll - eps mean_v log p_v``.
    * ``oscar``: Oscar's ``BertCaptioningLoss`` (oscar/modeling/modeling_bert.py): the KL
      divergence, summed over the vocabulary, from the smoothed one-hot ``q`` (``1 - eps`` on
      the target, ``eps / (V - 1)`` on each other token) to ``p``:
      ``sum_v q_v log q_v + (1 - eps) nll - eps / (V - 1) sum_{v != target} log p_v``.
      Its gradient differs from mmcn's (no smoothing mass on the target) and its value by
      the entropy of ``q``. With ``eps = 0`` both are the plain nll.
    """
    nll = nnf.nll_loss(logp, target, reduction="none")
    if not eps:
        return nll
    if form == "mmcn":
        return (1 - eps) * nll - eps * logp.mean(-1)
    off = eps / (logp.shape[-1] - 1)  # each non-target token's share of q
    q_log_q = (1 - eps) * math.log(1 - eps) + eps * math.log(off)  # sum_v q_v log q_v (eps in (0, 1))
    return q_log_q + (1 - eps) * nll - off * (logp.sum(-1) + nll)  # sum_{v != t} log p_v = sum_v log p_v + nll


def drop_worst(losses: torch.Tensor, ratio: float, form: str = "mmcn") -> torch.Tensor:
    """The losses left once the share ``ratio`` of the highest is dropped: mmcn keeps
    ``n - int(n ratio)``, Oscar (``BertCaptioningLoss``: ``topk`` of the lowest) keeps
    ``int(n (1 - ratio))``, which can be one fewer; both keep at least one (Oscar's
    ``int`` reaches 0 below ``n = 1 / (1 - ratio)`` tokens, and its mean is then NaN)."""
    n = len(losses)
    keep = n - int(n * ratio) if form == "mmcn" else int(n * (1 - ratio))
    return torch.topk(losses, max(keep, 1), largest=False).values


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


class CaptionModel(MaskedTokenHeadModel):
    config_class = CaptionConfig

    def __init__(self, config: CaptionConfig):
        super().__init__(config)
        self.cls = BertOnlyMLMHead(config)
        if config.copy_tags:
            h = config.hidden_size
            self.copy_query, self.copy_key, self.copy_gate = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, 1)
        # Training forwards so far, for ``drop_worst_after`` (Oscar's BertCaptioningLoss counts
        # its calls the same way: micro-batches, evaluation excluded). A plain attribute, not
        # a buffer, so the state_dict (and checkpoints converted to and from Oscar's) holds
        # weights only; mmcn.train.loop saves it next to the weights and restores it on resume
        # (Oscar's counter restarts at 0 when a run resumes).
        self.train_forwards = 0
        self.post_init()

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
        """Masked-token loss over the positions where ``labels`` != -100: :func:`masked_token_losses`
        (label smoothing, ``loss_form``), averaged over the tokens after :func:`drop_worst` when
        training and more than ``drop_worst_after`` training forwards are done (this one counted,
        as Oscar's ``self.iter > drop_worst_after``)."""
        la = caption_ids.shape[1]
        hidden = self.hidden(caption_ids, caption_mask, tag_ids, tag_mask, img_feats, img_mask)
        where = labels != -100
        rows = where.nonzero()[:, 0]  # the image of each masked position
        logits = self.log_probs(hidden[:, :la][where], hidden[:, la:][rows], tag_ids[rows], tag_mask[rows])
        target = labels[where]
        c = self.config
        losses = masked_token_losses(logits, target, c.label_smoothing, c.loss_form)
        if self.training:
            self.train_forwards += 1
            if c.drop_worst_ratio > 0 and self.train_forwards > c.drop_worst_after and len(losses) > 1:
                losses = drop_worst(losses, c.drop_worst_ratio, c.loss_form)
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

    @torch.no_grad()
    def generate_oscar(self, tag_ids, tag_mask, img_feats, img_mask, cls_id: int, sep_id: int, mask_id: int,
                       pad_id: int = 0, num_beams: int = 1, max_gen_length: int = 20,
                       length_penalty: float = 1.0) -> tuple[list[list[int]], list[float]]:
        """Captions (token ids without [CLS]/[SEP]) and their scores for each image, decoded as
        microsoft/Oscar's ``BertForImageCaptioning.generate`` does at test time
        (``oscar/run_captioning.py`` ``test``: ``do_sample=False``, ``num_keep_best=1``,
        ``num_return_sequences=1``, ``repetition_penalty=1``; ``_generate_no_beam_search``,
        ``_generate_beam_search`` and ``BeamHypotheses`` of ``oscar/modeling/modeling_utils.py``).
        Nothing is banned and no n-gram is blocked: the model may say [PAD], [CLS], [MASK], [UNK]
        (Oscar's ``tokenizer.decode(..., skip_special_tokens=True)`` drops them from the text).

        Lengths: ``max_gen_length`` counts the [CLS]. Step ``cur_len`` = 1, 2, .. while
        ``cur_len < max_gen_length`` predicts position ``cur_len`` from ``[CLS] y_1 .. y_{cur_len-1}
        [MASK]``, so a caption has at most ``max_gen_length - 2`` tokens before its [SEP]. The
        length ``n`` of a caption with ``m`` tokens is ``m + 1``: the tokens and the step that closed it
        (its [SEP], or the step at which it was cut off).

        Greedy (``num_beams`` = 1): the argmax token at each step, its log-probability added,
        until every caption has said [SEP] or ``cur_len`` reaches ``max_gen_length``; a caption
        still open then has its last token replaced by [SEP] (that token's log-probability still
        counts). Score: the summed log-probabilities / ``n``; ``length_penalty`` is not used.
        (Oscar takes the argmax of the logits, this of their log-softmax, or of the copy mixture
        with ``copy_tags``: the same token unless two logits lie within a float rounding step.)

        Beam search (``num_beams`` = k > 1): beam 0 starts at 0, beams 1.. at -1e9. At each step
        the k * vocab continuations ``beam score + log p`` give their top 2k (``torch.topk``,
        sorted). Before they are looked at, an image is done for good once it has a finished
        hypothesis (``early_stopping=False``) and ``best_finished >= top candidate / (max_gen_length
        - 1) ** length_penalty``; a done image takes no further candidates. Otherwise the
        candidates are taken in order: one ending in [SEP], or any candidate at the last step
        (``cur_len + 1 == max_gen_length``), becomes a finished hypothesis: the beam's tokens so
        far (the [SEP] or the cut-off token not included) with score ``sum of log p (including
        that last token's) / cur_len ** length_penalty``, ``cur_len`` being ``n``; it replaces
        the kept one only when strictly better (Oscar's ``BeamHypotheses`` with one hypothesis).
        Any other candidate enters the next beam (finished captions leave the beam); at k, the
        rest of the 2k are skipped. The search stops at ``max_gen_length`` or when every image is
        done. Returned: the kept hypothesis and its score (Oscar's ``conf`` is exp of it), as
        float32 like Oscar's output tensor; scores are compared as Python floats as Oscar does.
        """
        b, k, la = tag_ids.shape[0], num_beams, self.config.max_text_len
        if not 2 <= max_gen_length <= la:
            raise ValueError(f"Oscar decoding: max_gen_length {max_gen_length} must lie in 2..{la}, the model's "
                             "caption segment (max_text_len, which counts [CLS]); lower the decoding max_length")
        if k < 1:
            raise ValueError(f"Oscar decoding: num_beams {k} must be at least 1")
        rep = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731  (B, ...) -> (B*K, ...)
        context = (rep(tag_ids), rep(tag_mask), rep(img_feats), rep(img_mask))
        seqs = torch.full((b * k, la), pad_id, dtype=torch.long, device=tag_ids.device)
        seqs[:, 0] = cls_id
        if k == 1:
            return self._oscar_greedy(seqs, context, sep_id, mask_id, pad_id, max_gen_length)
        return self._oscar_beam(seqs, context, k, sep_id, mask_id, pad_id, max_gen_length, length_penalty)

    def _next_log_probs(self, seqs: torch.Tensor, t: int, context, mask_id: int) -> torch.Tensor:
        """log p of the token at caption position ``t`` (N, vocab) given ``seqs[:, :t]`` (writes
        [MASK] at ``t``); ``context``: the rows' tag ids, tag mask, regions, region mask."""
        la = seqs.shape[1]
        tags, tmask, feats, fmask = context
        seqs[:, t] = mask_id
        cmask = torch.zeros_like(seqs, dtype=torch.bool)
        cmask[:, :t + 1] = True
        hidden = self.hidden(seqs, cmask, tags, tmask, feats, fmask)
        return self.log_probs(hidden[:, t], hidden[:, la:], tags, tmask)

    def _oscar_greedy(self, seqs, context, sep_id, mask_id, pad_id, max_gen_length):
        """Oscar's ``_generate_no_beam_search`` (see :meth:`generate_oscar`)."""
        b = seqs.shape[0]
        open_ = torch.ones(b, dtype=torch.long, device=seqs.device)
        logprobs, counted = [], []
        cur_len = 1
        while cur_len < max_gen_length:
            logp = self._next_log_probs(seqs, cur_len, context, mask_id)
            token = logp.argmax(-1)
            logprobs.append(logp.gather(1, token[:, None]))
            counted.append(open_)
            token = token * open_ + pad_id * (1 - open_)  # a closed caption continues with [PAD]
            seqs[:, cur_len] = token
            open_ = open_ * token.ne(sep_id).long()
            cur_len += 1
            if open_.max() == 0:
                break
        if cur_len == max_gen_length:  # cut off: the last token becomes [SEP]
            seqs[:, cur_len - 1].masked_fill_(open_.bool(), sep_id)
        counted_f = torch.stack(counted, dim=1).float()
        scores = (torch.cat(logprobs, dim=1) * counted_f).sum(dim=1) / counted_f.sum(dim=1)
        out = []
        for row in seqs[:, 1:cur_len].tolist():
            out.append(row[:row.index(sep_id)])
        return out, [float(s) for s in scores]

    def _oscar_beam(self, seqs, context, k, sep_id, mask_id, pad_id, max_gen_length, length_penalty):
        """Oscar's ``_generate_beam_search`` + ``BeamHypotheses`` (see :meth:`generate_oscar`)."""
        b = seqs.shape[0] // k
        beam_scores = torch.zeros(b, k, device=seqs.device)
        beam_scores[:, 1:] = -1e9
        beam_scores = beam_scores.view(-1)
        kept: list[tuple[float, list[int]] | None] = [None] * b  # the best finished hypothesis
        done = [False] * b
        best_possible_len = (max_gen_length - 1) ** length_penalty
        cur_len = 1
        while cur_len < max_gen_length:
            logp = self._next_log_probs(seqs, cur_len, context, mask_id)
            vocab = logp.shape[1]
            cand = (logp + beam_scores[:, None]).view(b, k * vocab)
            top_scores, top_idx = torch.topk(cand, 2 * k, dim=1, largest=True, sorted=True)
            last = cur_len + 1 == max_gen_length
            nxt: list[tuple[float, int, int]] = []  # (score, token, row it continues)
            for i, (scores_i, idx_i) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
                if not done[i] and kept[i] is not None:
                    done[i] = kept[i][0] >= max(scores_i) / best_possible_len
                beam: list[tuple[float, int, int]] = []
                if not done[i]:
                    for score, idx in zip(scores_i, idx_i):
                        row, token = i * k + idx // vocab, idx % vocab
                        if token == sep_id or last:
                            normed = score / cur_len ** length_penalty
                            if kept[i] is None or normed > kept[i][0]:
                                kept[i] = (normed, seqs[row, 1:cur_len].tolist())
                        else:
                            beam.append((score, token, row))
                        if len(beam) == k:
                            break
                nxt.extend(beam if len(beam) == k else [(0.0, pad_id, i * k)] * k)  # done or last: padding
            beam_scores = torch.tensor([x[0] for x in nxt], dtype=torch.float32, device=seqs.device)
            seqs = seqs[torch.tensor([x[2] for x in nxt], device=seqs.device)]
            seqs[:, cur_len] = torch.tensor([x[1] for x in nxt], device=seqs.device)
            cur_len += 1
            if all(done):
                break
        return ([h[1] for h in kept],
                [float(torch.tensor(h[0], dtype=torch.float32)) for h in kept])


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
