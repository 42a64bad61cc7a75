"""``decoding: oscar``: microsoft/Oscar's greedy and beam search (oscar/modeling/modeling_utils.py:
``_generate_no_beam_search``, ``_generate_beam_search``, ``BeamHypotheses``) against a reference
written here from Oscar's rules, on tiny caption models whose captions end by themselves or are
cut off; and the setting's way from params / EvalConfig / the CLI to the generator."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcn.cli import _chain_settings, build_parser
from mmcn.eval.evaluate import EvalConfig
from mmcn.models.factory import build_model
from mmcn.models.regions.inference import CaptionGenerator, Decoding
from mmcn.models.regions.inputs import CaptionCollator
from mmcn.models.tokenizer import detokenize
sys.path.insert(0, str(Path(__file__).parent))
from test_models import LAYOUT, items, tokenizer  # noqa: E402

CONTEXT = ("tag_ids", "tag_mask", "img_feats", "img_mask")


def half_trained(copy_tags: bool, steps: int = 80):
    """A tiny model part way to the training captions: its captions vary in length and beam
    search finds other ones than greedy."""
    tok = tokenizer()
    model = build_model("caption", len(tok), "tiny", label_smoothing=0.0, copy_tags=copy_tags, **LAYOUT)
    collate = CaptionCollator(tok, model.config, train=True, mask_prob=0.5, max_masked=8,
                              generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        loss = model(**collate(items())).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def step_log_probs(model, tok, batch, rows_per_image: int):
    """The model's next-token log-probabilities for explicit prefixes: ``step(prefixes, t)``,
    one prefix (tokens after [CLS]) per row, ``rows_per_image`` rows per image in order."""
    context = [batch[k].repeat_interleave(rows_per_image, 0) for k in CONTEXT]
    la = model.config.max_text_len

    @torch.no_grad()
    def step(prefixes: list[list[int]], t: int) -> np.ndarray:
        ids = torch.full((len(prefixes), la), tok.pad_token_id)
        ids[:, 0] = tok.cls_token_id
        for r, p in enumerate(prefixes):
            ids[r, 1:1 + len(p)] = torch.tensor(p, dtype=torch.long)
        ids[:, t] = tok.mask_token_id
        seen = torch.zeros(len(prefixes), la, dtype=torch.bool)
        seen[:, :t + 1] = True
        hidden = model.hidden(ids, seen, *context)
        return model.log_probs(hidden[:, t], hidden[:, la:], context[0], context[1]).numpy()

    return step


def reference_greedy(step, n: int, sep: int, max_gen_length: int):
    """Oscar's greedy: argmax until [SEP] or ``max_gen_length`` positions ([CLS] counted); a caption
    cut off loses its last token to [SEP]; score = mean log p over the steps up to and including
    the closing one (no length penalty)."""
    tokens, logps, open_ = [[] for _ in range(n)], [[] for _ in range(n)], [True] * n
    t = 1
    while t < max_gen_length and any(open_):
        logp = step(tokens, t)
        for i in range(n):
            if open_[i]:
                word = int(np.argmax(logp[i]))
                logps[i].append(float(logp[i, word]))
                if word == sep:
                    open_[i] = False
                else:
                    tokens[i].append(word)
        t += 1
    return [(x[:-1] if cut else x, sum(lp) / len(lp)) for x, lp, cut in zip(tokens, logps, open_)]


class KeptHypotheses:
    """Oscar's n-best list of finished captions: a caption of m tokens scores
    ``sum log p / (m + 1) ** length_penalty`` ([CLS] + tokens, i.e. the tokens + the closing
    step); it enters if the list is not full or it beats the worst, which then leaves."""

    def __init__(self, n: int, max_gen_length: int, length_penalty: float):
        self.n, self.longest, self.lp = n, max_gen_length - 1, length_penalty
        self.items: list[tuple[float, list[int]]] = []

    def add(self, tokens: list[int], sum_logprobs: float) -> None:
        score = sum_logprobs / (len(tokens) + 1) ** self.lp
        if len(self.items) < self.n or score > min(s for s, _ in self.items):
            self.items.append((score, tokens))
            if len(self.items) > self.n:
                worst = min(range(len(self.items)), key=lambda j: self.items[j][0])  # the first of equals
                del self.items[worst]

    def done(self, best_candidate: float) -> bool:
        """early_stopping=False: nothing open can still beat the worst kept, even at full length."""
        return len(self.items) >= self.n and min(s for s, _ in self.items) >= best_candidate / self.longest ** self.lp


def reference_beam(step, n: int, k: int, sep: int, max_gen_length: int, length_penalty: float):
    """Oscar's beam search (num_keep_best 1): float32 beam scores, beam 0 at 0 and the others at
    -1e9; each step the best 2k of all beams' continuations, in order: one ending in [SEP] (or
    any, at the last step) is a finished caption of the beam's tokens; the others fill the next
    beam up to k. An image stops once done (checked before its candidates are looked at)."""
    f32 = np.float32
    beams = [[(f32(0.0) if j == 0 else f32(-1e9), []) for j in range(k)] for _ in range(n)]
    kept = [KeptHypotheses(1, max_gen_length, length_penalty) for _ in range(n)]
    done = [False] * n
    t = 1
    while t < max_gen_length:
        logp = step([tokens for image in beams for _, tokens in image], t)
        for i in range(n):
            if done[i]:
                continue
            cands = [(f32(score + logp[i * k + j, w]), j, w)
                     for j, (score, _) in enumerate(beams[i]) for w in range(logp.shape[1])]
            cands = sorted(cands, key=lambda c: -c[0])[:2 * k]  # stable: equal scores in (beam, token) order
            done[i] = kept[i].done(float(cands[0][0]))
            if done[i]:
                continue
            nxt = []
            for score, j, w in cands:
                tokens = beams[i][j][1]
                if w == sep or t + 1 == max_gen_length:
                    kept[i].add(tokens, float(score))
                else:
                    nxt.append((score, tokens + [w]))
                if len(nxt) == k:
                    break
            beams[i] = nxt if nxt else beams[i]  # last step: nothing goes on
        t += 1
        if all(done):
            break
    return [(h.items[0][1], h.items[0][0]) for h in kept]


def oscar(model, tok, batch, **kw):
    return model.generate_oscar(*(batch[k] for k in CONTEXT), tok.cls_token_id, tok.sep_token_id,
                                tok.mask_token_id, tok.pad_token_id, **kw)


def check_against_reference(model, tok, batch, num_beams, max_gen_length, length_penalty=1.0):
    n, sep = batch["tag_ids"].shape[0], tok.sep_token_id
    ids, scores = oscar(model, tok, batch, num_beams=num_beams, max_gen_length=max_gen_length,
                        length_penalty=length_penalty)
    step = step_log_probs(model, tok, batch, num_beams)
    if num_beams == 1:
        expected = reference_greedy(step, n, sep, max_gen_length)
    else:
        expected = reference_beam(step, n, num_beams, sep, max_gen_length, length_penalty)
    assert ids == [e[0] for e in expected]
    assert scores == pytest.approx([e[1] for e in expected], abs=1e-6, rel=1e-6)
    return ids, scores


@pytest.mark.parametrize("copy_tags", [False, True])
def test_captions_that_end_by_themselves(copy_tags, pinned_torch):
    model, tok = half_trained(copy_tags, steps=80 if not copy_tags else 60)
    batch = CaptionCollator(tok, model.config, train=False)(items(1) + items(2))
    longest = model.config.max_text_len  # 16: at most 14 tokens
    greedy, _ = check_against_reference(model, tok, batch, 1, longest)
    assert all(len(x) < longest - 2 for x in greedy)  # every greedy caption said [SEP]
    beam, _ = check_against_reference(model, tok, batch, 3, longest)
    check_against_reference(model, tok, batch, 4, longest, length_penalty=0.6)
    check_against_reference(model, tok, batch, 2, longest, length_penalty=1.5)
    if not copy_tags:
        assert beam != greedy  # the search matters on this model
    # Oscar's greedy is mmcn's greedy on captions that end by themselves (nothing banned was said)
    mmcn_ids, _ = model.generate(*(batch[k] for k in CONTEXT), tok.cls_token_id, tok.sep_token_id,
                                 tok.mask_token_id, tok.pad_token_id, num_beams=1, max_length=longest - 2)
    assert mmcn_ids == greedy


@pytest.mark.parametrize("copy_tags", [False, True])
def test_captions_cut_off_at_max_gen_length(copy_tags, pinned_torch):
    model, tok = half_trained(copy_tags)
    batch = CaptionCollator(tok, model.config, train=False)(items(1) + items(2))
    for beams in (1, 3):
        ids, _ = check_against_reference(model, tok, batch, beams, 6)
        assert [len(x) for x in ids] == [4] * len(ids)  # max_gen_length 6 = [CLS] + 4 tokens + [SEP]
    check_against_reference(model, tok, batch, 3, 6, length_penalty=0.5)
    ids, _ = check_against_reference(model, tok, batch, 3, 2)  # one step: the empty caption
    assert ids == [[]] * len(ids)


def test_max_gen_length_must_fit_the_caption_segment():
    tok = tokenizer()
    model = build_model("caption", len(tok), "tiny", **LAYOUT).eval()
    batch = CaptionCollator(tok, model.config, train=False)(items())
    for bad in (1, LAYOUT["max_text_len"] + 1):
        with pytest.raises(ValueError, match="max_gen_length"):
            oscar(model, tok, batch, num_beams=2, max_gen_length=bad)


def test_decoding_setting_reaches_the_generator(tmp_path, pinned_torch):
    assert Decoding().mode == "mmcn"
    with pytest.raises(ValueError, match="caption.eval.decoding"):
        Decoding(mode="beam")
    assert Decoding.of(EvalConfig(decoding="oscar", num_beams=5)) == Decoding(num_beams=5, mode="oscar")
    assert Decoding.of_params({"decoding": "oscar", "max_length": 20, "tokenize": "char"}) == \
        Decoding(max_length=20, mode="oscar")

    params = tmp_path / "params.yaml"
    params.write_text("caption:\n  eval:\n    num_beams: 4\n    decoding: oscar\n", encoding="utf-8")
    args = build_parser().parse_args(["caption", "x.jpg", "--params", str(params)])
    assert args.decoding is None  # no flag: params (or the library) decide
    _, decoding = _chain_settings(args)
    assert (decoding.num_beams, decoding.mode) == (4, "oscar")
    args = build_parser().parse_args(["caption", "x.jpg", "--params", str(params), "--decoding", "mmcn"])
    assert _chain_settings(args)[1].mode == "mmcn"

    model, tok = half_trained(False, steps=60)
    data = items(1)
    batch = CaptionCollator(tok, model.config, train=False)(data)
    ids, scores = oscar(model, tok, batch, num_beams=3, max_gen_length=10)
    texts, got = CaptionGenerator(model, tok, Decoding(num_beams=3, max_length=10, mode="oscar"))(data)
    assert texts == [detokenize(tok.decode(x, skip_special_tokens=True)) for x in ids]
    assert got == pytest.approx(scores)
    ids, scores = model.generate(*(batch[k] for k in CONTEXT), tok.cls_token_id, tok.sep_token_id,
                                 tok.mask_token_id, tok.pad_token_id, num_beams=3, max_length=10)
    texts, got = CaptionGenerator(model, tok, Decoding(num_beams=3, max_length=10))(data)  # mmcn's, the default
    assert texts == [detokenize(tok.decode(x)) for x in ids] and got == pytest.approx(scores)
