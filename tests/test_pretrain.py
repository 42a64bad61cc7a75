"""Oscar+ pretraining: the collator's polluted pairs, truncation and masking (statistics over
many draws, against the rules of microsoft/Oscar's OscarTSVDataset), the loss and the pooled
contrastive logits against a computation by hand, Oscar export/import round trip with its key
names, and fine-tunes that start from the pretrained model."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcn.models.regions import oscar
from mmcn.models.regions.base import bidirectional
from mmcn.models.factory import build_model, load_model
from mmcn.models.regions.inputs import PretrainCollator, truncate_pair
from mmcn.models.regions.pretrain import PretrainConfig, contrast_classes
from mmcn.models.tokenizer import build_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from conftest import pinned_numerics  # noqa: E402

CAPTIONS = ["一只红色的猫坐在桌子上", "两个蓝色的方块", "绿色的星星和黄色的心", "一辆白色的车停在路边"]
TAGS = ["红色 猫 桌子", "蓝色 方块", "绿色 星星 黄色 心", "白色 车 路"]


class Pool:
    """Four images, two captions each (pairs 2k and 2k+1 show image 10 + k)."""

    def __len__(self) -> int:
        return 8

    def pair_caption(self, j: int) -> str:
        return CAPTIONS[j // 2] + ("。" if j % 2 else "")

    def pair_tags(self, j: int) -> str:
        return TAGS[j // 2]

    def pair_image_id(self, j: int) -> int:
        return 10 + j // 2


def item(j: int, n_regions: int = 3) -> dict:
    pool = Pool()
    g = torch.Generator().manual_seed(j)
    return {"image_id": pool.pair_image_id(j), "caption": pool.pair_caption(j), "tags": pool.pair_tags(j),
            "features": torch.randn(n_regions, 2054, generator=g)}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CAPTIONS + TAGS + ["。"])


def config(**kw) -> PretrainConfig:
    return PretrainConfig(**{"vocab_size": 60, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "intermediate_size": 64, "max_text_len": 35, "max_regions": 4, **kw})


def test_contrast_classes_follow_oscar():
    assert [contrast_classes(p) for p in (0.0, 0.25, 0.49, 0.5, 1.0)] == [2, 3, 3, 2, 2]


def test_truncation_pops_the_longer_side_b_on_a_tie():
    a, b = list(range(5)), list(range(3))
    truncate_pair(a, b, 6)
    assert (a, b) == ([0, 1, 2], [0, 1, 2])
    a, b = list(range(3)), list(range(3))
    truncate_pair(a, b, 4)
    assert (a, b) == ([0, 1], [0, 1])


@pytest.mark.parametrize("mode", [0, 1])
def test_polluted_pairs_masking_and_layout(tokenizer, mode):
    cfg = config(textb_sample_mode=mode)
    collate = PretrainCollator(tokenizer, cfg, Pool(), mask_prob=0.15, generator=torch.Generator().manual_seed(0))
    tok = tokenizer
    labels, masked, maskable, b_from_captions = [], 0, 0, 0
    captions = {Pool().pair_caption(j) for j in range(8)}
    for draw in range(400):
        items = [item(j) for j in range(8)]
        batch = collate(items)
        labels += batch["contrast_labels"].tolist()
        for i, it in enumerate(items):
            n = int(batch["text_mask"][i].sum())
            row, types, lm = batch["input_ids"][i, :n], batch["token_type_ids"][i, :n], batch["lm_labels"][i, :n]
            # a random replacement may be any token, [SEP] too: the segments are found by type
            seps = [int((types == 0).sum()) - 1, n - 1]
            assert row[0] == tok.cls_token_id and row[seps[0]] == row[seps[1]] == tok.sep_token_id
            assert types[:seps[0] + 1].eq(0).all() and types[seps[0] + 1:].eq(1).all()
            assert (batch["input_ids"][i, n:] == tok.pad_token_id).all() and (batch["lm_labels"][i, n:] == -100).all()
            assert lm[[0, *seps]].eq(-100).all()  # [CLS] and [SEP] are never predicted
            label = int(batch["contrast_labels"][i])
            a_len, b_len = seps[0] - 1, seps[1] - seps[0] - 1
            # the unmasked text: masked positions hold their label, others the token itself
            original = torch.where(lm != -100, lm, row)
            a = tok.decode(original[1:seps[0]]).replace(" ", "")
            b = tok.decode(original[seps[0] + 1:seps[1]]).replace(" ", "")
            if label == 0:
                assert (a, b) == (it["caption"], it["tags"].replace(" ", ""))
            elif label == 1:
                assert a == it["caption"] and b != it["tags"].replace(" ", "")
                b_from_captions += b in captions
                assert mode == 0 or b in {t.replace(" ", "") for t in TAGS}
            else:
                assert a != it["caption"] and a in captions and b == it["tags"].replace(" ", "")
            # regions are never masked: the features pass through as given
            assert torch.equal(batch["img_feats"][i], it["features"]) and batch["img_mask"][i].all()
            changed = lm[1:seps[1]] != -100
            masked += int(changed.sum())
            maskable += a_len + b_len
            assert a_len + b_len <= 35 - 3
    shares = np.bincount(labels, minlength=3) / len(labels)
    np.testing.assert_allclose(shares, [0.5, 0.25, 0.25], atol=0.025)
    assert abs(masked / maskable - 0.15) < 0.01
    assert (b_from_captions > 0) == (mode == 0)


def test_masked_tokens_are_80_10_10(tokenizer):
    collate = PretrainCollator(tokenizer, config(), Pool(), mask_prob=0.15, generator=torch.Generator().manual_seed(1))
    kinds = np.zeros(3)
    ids = tokenizer(CAPTIONS[0], add_special_tokens=False)["input_ids"] * 20
    for _ in range(300):
        out, labels = collate.mask(list(ids))
        for o, t, lab in zip(out, ids, labels):
            if lab != -100:
                assert lab == t
                kinds[0 if o == tokenizer.mask_token_id else 2 if o == t else 1] += 1
    shares = kinds / kinds.sum()  # [MASK] / random (a random token may also be the same one: rare) / kept
    np.testing.assert_allclose(shares, [0.8, 0.1, 0.1], atol=0.02)


def test_no_loss_on_a_polluted_b_when_asked(tokenizer):
    collate = PretrainCollator(tokenizer, config(mask_loss_for_unmatched=False), Pool(), mask_prob=0.5,
                               generator=torch.Generator().manual_seed(2))
    seen = 0
    for _ in range(50):
        batch = collate([item(j) for j in range(8)])
        for i in (batch["contrast_labels"] == 1).nonzero().flatten().tolist():
            types, lm = batch["token_type_ids"][i], batch["lm_labels"][i]
            assert (lm[types == 1] == -100).all()
            seen += 1
    assert seen > 50


def test_loss_and_pooled_logits_by_hand(tokenizer):
    with pinned_numerics():
        model = build_model("pretrain", len(tokenizer), "tiny", max_text_len=24, max_regions=4).eval()
        collate = PretrainCollator(tokenizer, model.config, Pool(), mask_prob=0.3,
                                   generator=torch.Generator().manual_seed(3))
        batch = collate([item(j) for j in range(6)])
        out = model(**batch)
        keys = torch.cat([batch["text_mask"], batch["img_mask"]], 1)
        hidden = model.encode(batch["input_ids"], batch["token_type_ids"], batch["img_feats"], bidirectional(keys))
        pooler, head = model.bert.pooler.dense, model.cls.seq_relationship
        pooled = torch.tanh(hidden[:, 0] @ pooler.weight.T + pooler.bias)  # BERT's pooler: tanh(W h_[CLS] + b)
        logits = pooled @ head.weight.T + head.bias
        torch.testing.assert_close(out.contrast_logits, logits)
        assert logits.shape == (6, 3)
        target = batch["contrast_labels"]
        contrast = -(logits.log_softmax(-1)[torch.arange(6), target]).mean()
        where = batch["lm_labels"] != -100
        scores = model.cls.predictions(hidden[:, :24][where])
        mlm = -(scores.log_softmax(-1)[torch.arange(int(where.sum())), batch["lm_labels"][where]]).mean()
        torch.testing.assert_close(out.contrast_loss, contrast)
        torch.testing.assert_close(out.mlm_loss, mlm)
        torch.testing.assert_close(out.loss, mlm + contrast)
        # full attention over the valid positions only: more padding changes nothing
        wider = dict(batch)
        wider["img_feats"] = torch.cat([batch["img_feats"], torch.randn(6, 2, 2054)], 1)
        wider["img_mask"] = torch.cat([batch["img_mask"], torch.zeros(6, 2, dtype=torch.bool)], 1)
        torch.testing.assert_close(model(**wider).loss, out.loss)
        # the decoder is tied to the word embeddings
        assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()


def test_oscar_round_trip_and_fine_tune_starts(tokenizer, tmp_path):
    model = build_model("pretrain", len(tokenizer), "tiny", max_text_len=30, max_regions=10, texta_false_prob=0.25)
    model.save_pretrained(tmp_path / "pretrain")
    tokenizer.save_pretrained(tmp_path / "pretrain")
    task, loaded = load_model(tmp_path / "pretrain")
    assert task == "pretrain"
    written = oscar.export(loaded, tokenizer, tmp_path / "oscar")
    assert written["task"] == "pretrained" and written["side_file"] is None
    state = torch.load(tmp_path / "oscar" / "pytorch_model.bin", weights_only=True)
    # Oscar's BertImgForPreTraining names: bert.img_embedding, bert.LayerNorm (the image one), cls.*
    assert {"bert.img_embedding.weight", "bert.LayerNorm.weight", "bert.pooler.dense.weight",
            "cls.seq_relationship.weight", "cls.predictions.bias", "cls.predictions.decoder.weight"} <= set(state)
    assert state["cls.seq_relationship.weight"].shape == (3, 64)
    assert oscar.checkpoint_task(state) == "pretrained"
    args = oscar.read_training_args(tmp_path / "oscar")
    assert (args["max_seq_length"], args["max_img_seq_length"], args["texta_false_prob"]) == (30, 10, 0.25)
    back = build_model("pretrain", 0, init=str(tmp_path / "oscar"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    assert (back.config.max_text_len, back.config.max_regions, back.config.num_contrast_classes) == (30, 10, 3)
    # fine-tunes from mmcn's pretrained folder and from its Oscar export share its encoder
    for init in (tmp_path / "pretrain", tmp_path / "oscar"):
        cap = build_model("caption", 0, init=str(init), max_text_len=12, max_tag_len=8, max_regions=4)
        ret = build_model("retrieval", 0, init=str(init), max_text_len=12, max_tag_len=8, max_regions=4)
        for m in (cap, ret):
            assert torch.equal(m.bert.encoder.layer[1].output.dense.weight, model.bert.encoder.layer[1].output.dense.weight)
            assert torch.equal(m.img_embedding.weight, model.img_embedding.weight)
        assert torch.equal(cap.cls.predictions.transform.dense.weight, model.cls.predictions.transform.dense.weight)


def test_bad_settings():
    with pytest.raises(ValueError, match="textb_sample_mode"):
        config(textb_sample_mode=2)
    with pytest.raises(ValueError, match="texta_false_prob"):
        config(texta_false_prob=1.5)
    with pytest.raises(ValueError, match="add_pooler"):
        config(add_pooler=False)
