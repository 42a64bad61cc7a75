"""Switches that reproduce microsoft/Oscar's fine-tuning: its label-smoothed captioning loss
(``loss_form: oscar``), drop-worst only after ``drop_worst_after`` training forwards, its
caption masking (``mask_type: oscar``) and one random negative per positive for the
retrieval matcher (``negatives: random``). The expected values are computed here from
Oscar's rules, independently of the code under test."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as nnf

from mmcn.models.regions.caption import CaptionConfig, drop_worst
from mmcn.models.factory import build_model, load_model
from mmcn.models.regions.inputs import CaptionCollator, RetrievalCollator, segment
from mmcn.models.regions.retrieval import RetrievalConfig, random_negatives
from mmcn.models.tokenizer import build_tokenizer
from mmcn.train.loop import TrainConfig

LAYOUT = {"max_text_len": 16, "max_tag_len": 8, "max_regions": 4}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
CAPTIONS = ["红色的圆形在左边", "蓝色三角形", "上方有黄色星形和绿色十字形", "白色方块"]
TAGS = ["红色 圆形", "蓝色 三角形", "黄色 星形 绿色 十字形", "白色 方块"]


def items(image_ids=(100, 101, 102, 103), text_ids=(200, 201, 202, 203), seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image_id": im, "text_id": tx, "caption": CAPTIONS[i % 4], "text": CAPTIONS[i % 4],
             "tags": TAGS[im % 4], "features": torch.randn(2 + im % 3, 2054, generator=g)}
            for i, (im, tx) in enumerate(zip(image_ids, text_ids))]


def tokenizer():
    return build_tokenizer(CAPTIONS + TAGS)


def oscar_kl(logp: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-token loss of Oscar's BertCaptioningLoss, built the way it states it: the one-hot
    target smoothed to 1 - eps on the target and eps / (V - 1) elsewhere, KL divergence
    (torch's KLDivLoss, no reduction) summed over the vocabulary."""
    v = logp.shape[1]
    q = torch.full_like(logp, eps / (v - 1))
    q[torch.arange(len(target)), target] = 1 - eps
    return nnf.kl_div(logp, q, reduction="none").sum(1)


# --------------------------------------------------------------------------- (a) label smoothing

@pytest.mark.parametrize("copy_tags", [False, True])
def test_oscar_label_smoothing_is_the_kl_to_the_smoothed_one_hot(copy_tags, pinned_torch):
    tok = tokenizer()
    model = build_model("caption", len(tok), "tiny", label_smoothing=0.1, loss_form="oscar", copy_tags=copy_tags,
                        **LAYOUT).eval()
    batch = CaptionCollator(tok, model.config, mask_prob=0.5, max_masked=6,
                            generator=torch.Generator().manual_seed(3))(items())
    target = batch["labels"][batch["labels"] != -100]
    with torch.no_grad():
        out = model(**batch)
    assert len(target) > 8
    expected = oscar_kl(out.logits, target, 0.1).mean()
    assert torch.allclose(out.loss, expected, rtol=1e-5, atol=1e-6), (out.loss, expected)

    # mmcn's form is another loss (smoothing over all V tokens, no entropy term) ...
    model.config.loss_form = "mmcn"
    with torch.no_grad():
        mmcn = model(**batch).loss
    assert not torch.allclose(mmcn, expected, rtol=1e-3)
    # ... and without smoothing both are the plain negative log-likelihood
    model.config.label_smoothing = 0.0
    for form in ("mmcn", "oscar"):
        model.config.loss_form = form
        with torch.no_grad():
            assert torch.allclose(model(**batch).loss, nnf.nll_loss(out.logits, target), rtol=1e-6)


def test_oscar_label_smoothing_gradient_has_no_smoothing_mass_on_the_target(pinned_torch):
    """d loss / d log p = -q: 1 - eps on the target, eps / (V - 1) on every other token."""
    from mmcn.models.regions.caption import masked_token_losses

    logp = torch.randn(5, 11).log_softmax(-1).requires_grad_()
    target = torch.tensor([0, 3, 10, 3, 7])
    masked_token_losses(logp, target, 0.2, "oscar").sum().backward()
    q = torch.full((5, 11), 0.2 / 10)
    q[torch.arange(5), target] = 0.8
    assert torch.allclose(logp.grad, -q, atol=1e-7)
    value = masked_token_losses(logp.detach(), target, 0.2, "oscar")
    assert torch.allclose(value, oscar_kl(logp.detach(), target, 0.2), atol=1e-6)


# --------------------------------------------------------------------------- (b) drop_worst_after

def test_drop_worst_waits_for_drop_worst_after_training_forwards(pinned_torch):
    tok = tokenizer()
    model = build_model("caption", len(tok), "tiny", label_smoothing=0.1, loss_form="oscar", drop_worst_ratio=0.3,
                        drop_worst_after=2, **LAYOUT, **NO_DROPOUT)
    batch = CaptionCollator(tok, model.config, mask_prob=0.5, max_masked=6,
                            generator=torch.Generator().manual_seed(5))(items())
    target = batch["labels"][batch["labels"] != -100]
    n = len(target)
    assert int(n * 0.7) != n - int(n * 0.3), n  # so that the check below tells Oscar's count from mmcn's
    model.train()
    for forward in range(1, 5):
        out = model(**batch)
        assert model.train_forwards == forward
        token = oscar_kl(out.logits.detach(), target, 0.1)
        if forward <= 2:  # Oscar: drops only once self.iter > drop_worst_after (iter counted before)
            expected = token.mean()
        else:
            expected = token.sort().values[:int(n * (1 - 0.3))].mean()
        assert torch.allclose(out.loss.detach(), expected, rtol=1e-5, atol=1e-6), forward
    model.eval()  # evaluation neither counts nor drops
    with torch.no_grad():
        out = model(**batch)
    assert model.train_forwards == 4
    assert torch.allclose(out.loss, oscar_kl(out.logits, target, 0.1).mean(), rtol=1e-5, atol=1e-6)


def test_drop_worst_counts_and_the_counter_stays_out_of_the_weights(tmp_path):
    losses = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    assert drop_worst(losses, 0.3, "mmcn").tolist() == [1.0, 2.0, 3.0, 4.0]   # 5 - int(1.5) = 4 kept
    assert drop_worst(losses, 0.3, "oscar").tolist() == [1.0, 2.0, 3.0]       # int(5 * 0.7) = 3 kept
    assert drop_worst(torch.tensor([2.0]), 0.5, "oscar").tolist() == [2.0]    # at least one (Oscar: NaN)

    tok = tokenizer()
    model = build_model("caption", len(tok), "tiny", loss_form="oscar", drop_worst_ratio=0.2, drop_worst_after=20000,
                        **LAYOUT)
    model.train_forwards = 7
    assert not [k for k in model.state_dict() if "forward" in k]  # weights only: Oscar checkpoints map 1:1
    model.save_pretrained(str(tmp_path))
    _, loaded = load_model(tmp_path)
    assert (loaded.config.loss_form, loaded.config.drop_worst_after, loaded.config.drop_worst_ratio) == \
        ("oscar", 20000, 0.2)
    assert loaded.train_forwards == 0


def test_fine_tuning_switches_reject_unknown_values():
    with pytest.raises(ValueError, match="loss_form"):
        CaptionConfig(loss_form="kl")
    with pytest.raises(ValueError, match="drop_worst_after"):
        CaptionConfig(drop_worst_after=-1)
    with pytest.raises(ValueError, match="label_smoothing"):
        CaptionConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="mask_type"):
        TrainConfig(mask_type="bert")
    with pytest.raises(ValueError, match="mask_type"):
        CaptionCollator(tokenizer(), CaptionConfig(), mask_type="bert")
    with pytest.raises(ValueError, match="negatives"):
        RetrievalConfig(negatives="semi-hard")


# --------------------------------------------------------------------------- (c) masking

# Oscar's count, min(max(round(0.15 * L), 1), 3) with L = [CLS] + caption + [SEP], worked out by hand
OSCAR_COUNT = {2: 1, 3: 1, 4: 1, 9: 1, 10: 2, 16: 2, 17: 3, 23: 3, 30: 3, 40: 3}
MMCN_COUNT_DIFFERS = {10: 1, 17: 2}   # mmcn rounds 0.15 * (L - 1): one fewer at these lengths


def test_oscar_masking_counts_candidates_and_replacements():
    text = "红色的圆形在左边蓝色三角形上方有黄色星形和绿色十字形白色方块小大中心右下角"  # 38 characters
    captions = [text[:k] for k in range(0, 39)]        # L = k + 2 = 2 .. 40
    tok = build_tokenizer(captions)
    config = CaptionConfig(max_text_len=40, max_tag_len=4, max_regions=2)
    data = [{"image_id": i, "caption": c, "tags": "", "features": torch.zeros(1, 2054)} for i, c in enumerate(captions)]
    plain, valid = segment(tok, captions, config.max_text_len, cls=True)   # before masking
    collate = CaptionCollator(tok, config, mask_prob=0.15, max_masked=3, mask_type="oscar",
                              generator=torch.Generator().manual_seed(0))
    mmcn = CaptionCollator(tok, config, mask_prob=0.15, max_masked=3, generator=torch.Generator().manual_seed(0))
    lengths = valid.sum(1)
    outcome, sep_masked, drawn = Counter(), 0, Counter()
    vocab = tok.vocab_size
    for _ in range(200):
        b = collate(data)
        chosen = b["labels"] != -100
        # the masked token's label is the original token; nothing outside the caption changes
        assert torch.equal(b["labels"][chosen], plain[chosen])
        assert torch.equal(b["caption_ids"][~chosen], plain[~chosen])
        assert not chosen[:, 0].any() and not chosen[~valid].any()        # never [CLS], never padding
        for i, length in enumerate(lengths.tolist()):
            count = int(chosen[i].sum())
            assert count == min(max(round(0.15 * length), 1), 3), (length, count)
            if length in OSCAR_COUNT:
                assert count == OSCAR_COUNT[length]
        sep_masked += int(chosen[torch.arange(len(data)), lengths - 1].sum())
        now, before = b["caption_ids"][chosen], plain[chosen]
        is_mask = now == tok.mask_token_id
        kept = ~is_mask & (now == before)
        outcome.update(mask=int(is_mask.sum()), kept=int(kept.sum()), other=int((~is_mask & ~kept).sum()))
        assert (now < vocab).all()
        drawn.update((now[~is_mask & ~kept]).tolist())
    total = sum(outcome.values())
    assert total > 15_000
    assert sep_masked > 0                                                  # [SEP] is a candidate, as in Oscar
    # 80% [MASK]; the remaining 20% split in half: a random id of 0..V (V+1 values), or kept
    assert abs(outcome["mask"] / total - 0.8) < 0.01
    assert abs(outcome["kept"] / total - (0.1 + 0.1 / (vocab + 1))) < 0.01
    assert abs(outcome["other"] / total - 0.1 * vocab / (vocab + 1)) < 0.01
    # [UNK] is drawn twice as often as any other id: as itself and as the id one past the vocabulary
    others = [drawn[i] for i in range(vocab) if i not in (tok.unk_token_id, tok.mask_token_id)]
    ratio = drawn[tok.unk_token_id] / (sum(others) / len(others))
    assert 1.4 < ratio < 2.7, ratio                                       # (1.75 here; 1 without the extra id)
    assert min(others) > 0                                                 # every id, special ones included

    # the same seed gives the same masks; mmcn's rule masks fewer at some lengths
    again = CaptionCollator(tok, config, mask_prob=0.15, max_masked=3, mask_type="oscar",
                            generator=torch.Generator().manual_seed(0))(data)
    first = CaptionCollator(tok, config, mask_prob=0.15, max_masked=3, mask_type="oscar",
                            generator=torch.Generator().manual_seed(0))(data)
    assert torch.equal(again["caption_ids"], first["caption_ids"]) and torch.equal(again["labels"], first["labels"])
    counts = (mmcn(data)["labels"] != -100).sum(1)
    for length, n in MMCN_COUNT_DIFFERS.items():
        assert int(counts[lengths.tolist().index(length)]) == n


# --------------------------------------------------------------------------- (d) random negatives

def test_random_negatives_one_per_positive_from_other_images_and_texts():
    image_ids = torch.tensor([1, 1, 2, 3, 3, 4])
    text_keys = torch.tensor([10, 11, 12, 13, 14, 10])   # text 10 belongs to images 1 and 4
    allowed = (image_ids[:, None] != image_ids[None, :]) & (text_keys[:, None] != text_keys[None, :])
    g = torch.Generator().manual_seed(0)
    picks, swaps = Counter(), []
    for _ in range(2000):
        partner, swap_text = random_negatives(image_ids, text_keys, g)
        assert partner.shape == swap_text.shape == (6,) and swap_text.dtype == torch.bool
        assert allowed[torch.arange(6), partner].all()                  # another image and another text
        picks.update(zip(range(6), partner.tolist()))
        swaps.append(swap_text)
    for i in range(6):   # uniform among the allowed partners
        counts = [picks[(i, j)] for j in range(6) if allowed[i, j]]
        assert all(abs(c / 2000 - 1 / len(counts)) < 0.05 for c in counts), (i, counts)
        assert sum(counts) == 2000
    share = torch.stack(swaps).float().mean().item()
    assert abs(share - 0.5) < 0.02                                      # text or image at 50/50
    first = random_negatives(image_ids, text_keys, torch.Generator().manual_seed(7))
    again = random_negatives(image_ids, text_keys, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(first, again))          # seeded
    alone, _ = random_negatives(torch.tensor([5, 5]), torch.tensor([1, 2]))
    assert alone.tolist() == [-1, -1]                                   # nothing to pair with: no negative


def test_random_negatives_train_the_matcher_as_oscar(pinned_torch):
    tok = tokenizer()
    data = items(image_ids=(100, 100, 101, 102, 103, 103), text_ids=(200, 201, 202, 203, 204, 205))
    hardest = build_model("retrieval", len(tok), "tiny", match_weight=1.0, **LAYOUT)
    assert "neg_partner" not in RetrievalCollator(tok, hardest.config)(data)
    model = build_model("retrieval", len(tok), "tiny", match_weight=1.0, negatives="random", **LAYOUT).eval()
    batch = RetrievalCollator(tok, model.config, generator=torch.Generator().manual_seed(1))(data)
    partner, swap = batch["neg_partner"], batch["neg_swap_text"]
    assert (partner >= 0).all() and (batch["image_ids"][partner] != batch["image_ids"]).all()
    with torch.no_grad():
        out = model(**batch)
        args = ("text_ids", "text_mask", "tag_ids", "tag_mask", "img_feats", "img_mask")
        pos = model.match_logits(*[batch[k] for k in args])
        texts = torch.where(swap, partner, torch.arange(6))
        images = torch.where(swap, torch.arange(6), partner)
        neg = model.match_logits(*[batch[k][texts if k.startswith("text") else images] for k in args])
    # Oscar: cross entropy over 2 classes, positives label 1 and negatives label 0, one mean over all
    expected = nnf.cross_entropy(torch.cat([pos, neg]), torch.tensor([1] * 6 + [0] * 6))
    assert torch.allclose(out.match_loss, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.loss, out.contrastive_loss + expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- through the training loop

def test_training_with_oscar_switches_keeps_the_forward_count_in_its_checkpoints(tmp_path):
    """The settings reach the model and the collator through the loop; each checkpoint holds
    the count of training forwards (two per optimizer step here) next to the weights, not in
    them (a resumed run restores it from there)."""
    import json
    import sys
    from pathlib import Path

    from mmcn.data.lmdb_build import build_lmdb
    from mmcn.train.loop import ModelSpec, train

    sys.path.insert(0, str(Path(__file__).parent))
    from test_lmdb import make_dataset

    d = make_dataset(tmp_path / "data", n_images=8, split="train")
    build_lmdb(d["tsv"], tmp_path / "built", d["features"], d["tags"])
    settings = {**LAYOUT, "loss_form": "oscar", "drop_worst_ratio": 0.2, "drop_worst_after": 3}
    cfg = TrainConfig(epochs=1, batch_size=2, grad_accum=2, lr=1e-3, checkpoint_every=1, workers=0, mask_type="oscar",
                      mask_prob=0.15, max_masked=3)
    summary = train(ModelSpec("caption", "tiny", settings=settings), tmp_path / "built", tmp_path / "model", cfg,
                    tmp_path / "ray")
    assert summary["steps"] >= 2
    import tempfile  # the in-process mode keeps its last two checkpoints where the loop stages them

    states = sorted((Path(tempfile.gettempdir()) / "mmcn-checkpoints" / summary["run"]).glob("step-*/state.pt"))
    assert len(states) == 2
    for path in states:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["train_forwards"] == 2 * state["step"] and not [k for k in state["model"] if "forward" in k]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (config["loss_form"], config["drop_worst_after"]) == ("oscar", 3)
    assert json.loads((tmp_path / "model" / "mmcn.json").read_text())["train"]["mask_type"] == "oscar"
