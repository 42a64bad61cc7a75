"""Oscar / Mengzi-Oscar checkpoints in and out: random checkpoints in Oscar's exact key names,
shapes and config fields (small hidden size), imported with nothing left over; caption logits
and matcher logits against an independent re-computation of Oscar's forward (written here
from Oscar's rules, from the raw Oscar state dict, not through mmcn's model code); export
round trips; bad checkpoints are clear errors."""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from mmcn.cli import main
from mmcn.models.factory import build_model, load_model
from mmcn.models.regions.inference import CaptionGenerator, Decoding
from mmcn.models.regions.oscar import OscarCheckpointError, export
from mmcn.models.tokenizer import load_tokenizer

H, LAYERS, HEADS, INTER, VOCAB = 32, 2, 4, 64, 40
SEQ_A, SEQ, REGIONS = 8, 14, 5          # max_seq_a_length, max_seq_length, max_img_seq_length
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)


def oscar_state(task: str, seed: int = 0, tied: bool = True, img_layernorm: bool = True) -> dict[str, torch.Tensor]:
    """Random weights under Oscar's own key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    sd = {"bert.embeddings.word_embeddings.weight": r(VOCAB, H), "bert.embeddings.position_embeddings.weight": r(64, H),
          "bert.embeddings.token_type_embeddings.weight": r(2, H),
          "bert.embeddings.LayerNorm.weight": 1 + r(H), "bert.embeddings.LayerNorm.bias": r(H)}
    for i in range(LAYERS):
        p = f"bert.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = r(H, H), r(H)
        sd[p + "attention.output.LayerNorm.weight"], sd[p + "attention.output.LayerNorm.bias"] = 1 + r(H), r(H)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = r(INTER, H), r(INTER)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = r(H, INTER), r(H)
        sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"] = 1 + r(H), r(H)
    sd["bert.pooler.dense.weight"], sd["bert.pooler.dense.bias"] = r(H, H), r(H)
    sd["bert.img_embedding.weight"], sd["bert.img_embedding.bias"] = r(H, 2054) * 0.1, r(H)
    if img_layernorm:
        sd["bert.LayerNorm.weight"], sd["bert.LayerNorm.bias"] = 1 + r(H), r(H)
    if task in ("caption", "pretrained"):
        sd["cls.predictions.bias"] = r(VOCAB)
        sd["cls.predictions.transform.dense.weight"], sd["cls.predictions.transform.dense.bias"] = r(H, H), r(H)
        sd["cls.predictions.transform.LayerNorm.weight"] = 1 + r(H)
        sd["cls.predictions.transform.LayerNorm.bias"] = r(H)
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"] if tied else r(VOCAB, H)
    if task == "pretrained":
        sd["cls.seq_relationship.weight"], sd["cls.seq_relationship.bias"] = r(3, H), r(3)
    if task == "retrieval":
        sd["classifier.weight"], sd["classifier.bias"] = r(2, H), r(2)
    return sd


def write_oscar(path: Path, task: str, state: dict | None = None, img_layernorm: bool = True, args: object = "default",
                **config_extra) -> Path:
    """An Oscar folder as its run_captioning.py / run_retrieval.py save_checkpoint writes it."""
    path.mkdir(parents=True)
    config = {"attention_probs_dropout_prob": 0.1, "finetuning_task": None, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": H, "img_feature_dim": 2054, "img_feature_type": "frcnn",
              "initializer_range": 0.02, "intermediate_size": INTER, "layer_norm_eps": 1e-12,
              "max_position_embeddings": 64, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
              "num_labels": 2, "output_attentions": False, "output_hidden_states": False, "torchscript": False,
              "type_vocab_size": 2, "vocab_size": VOCAB, "use_img_layernorm": int(img_layernorm),
              "img_layer_norm_eps": 1e-5}
    if task == "caption":
        config.update(tie_weights=True, freeze_embedding=False, label_smoothing=0.1, drop_worst_ratio=0.2,
                      drop_worst_after=20000)
    elif task == "retrieval":
        config.update(loss_type="sfmx")
    else:
        config.update(num_contrast_classes=3)
    config.update(config_extra)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(state if state is not None else oscar_state(task, img_layernorm=img_layernorm), path / "pytorch_model.bin")
    (path / "vocab.txt").write_text("".join(t + "\n" for t in SPECIAL + [chr(0x4e00 + i) for i in range(VOCAB - 5)]),
                                    encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps({"unk_token": "[UNK]", "sep_token": "[SEP]",
                                                              "pad_token": "[PAD]", "cls_token": "[CLS]",
                                                              "mask_token": "[MASK]"}))
    (path / "added_tokens.json").write_text("{}")
    if args == "default":
        args = argparse.Namespace(max_seq_length=SEQ, max_seq_a_length=SEQ_A, max_img_seq_length=REGIONS,
                                  add_od_labels=True, do_lower_case=True, od_label_type="vg", learning_rate=3e-5)
    if args is not None:
        torch.save(args, path / "training_args.bin")
    return path


# ---------------------------------------------------------------- Oscar's forward, re-computed

def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def oscar_forward(sd, input_ids, token_type, position_ids, feats, allowed, img_layernorm=True, img_eps=1e-5):
    """BertImgModel: word + position + type embeddings -> LayerNorm; regions: img_embedding ->
    image LayerNorm (when on); concatenated; BERT layers (post-LayerNorm) under the
    (B, L, L) attention mask with -10000 for forbidden keys. Returns (sequence, pooled)."""
    e = sd["bert.embeddings.word_embeddings.weight"][input_ids] + \
        sd["bert.embeddings.position_embeddings.weight"][position_ids] + \
        sd["bert.embeddings.token_type_embeddings.weight"][token_type]
    x = _ln(e, sd["bert.embeddings.LayerNorm.weight"], sd["bert.embeddings.LayerNorm.bias"], 1e-12)
    v = feats @ sd["bert.img_embedding.weight"].T + sd["bert.img_embedding.bias"]
    if img_layernorm:
        v = _ln(v, sd["bert.LayerNorm.weight"], sd["bert.LayerNorm.bias"], img_eps)
    x = torch.cat([x, v], 1)
    bias = (1.0 - allowed.float())[:, None] * -10000.0
    b, n, d = x.shape[0], x.shape[1], H // HEADS
    for i in range(LAYERS):
        p = f"bert.encoder.layer.{i}."
        lin = lambda t, name: t @ sd[p + name + ".weight"].T + sd[p + name + ".bias"]  # noqa: E731
        split = lambda t: t.view(b, n, HEADS, d).transpose(1, 2)  # noqa: E731
        q, k, val = (split(lin(x, f"attention.self.{m}")) for m in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, -1)
        ctx = (att @ val).transpose(1, 2).reshape(b, n, H)
        x = _ln(lin(ctx, "attention.output.dense") + x, sd[p + "attention.output.LayerNorm.weight"],
                sd[p + "attention.output.LayerNorm.bias"], 1e-12)
        x = _ln(lin(_gelu(lin(x, "intermediate.dense")), "output.dense") + x, sd[p + "output.LayerNorm.weight"],
                sd[p + "output.LayerNorm.bias"], 1e-12)
    pooled = torch.tanh(x[:, 0] @ sd["bert.pooler.dense.weight"].T + sd["bert.pooler.dense.bias"])
    return x, pooled


def oscar_caption_logits(sd, caption, tags, feats, img_layernorm=True):
    """BertForImageCaptioning on Oscar's caption layout: [CLS] caption [SEP] padded to
    max_seq_a_length, tags [SEP] after it (type 1), regions; positions 0..max_seq_length-1;
    caption tokens see the caption causally plus tags + regions; tags + regions see each
    other only. Scores of every caption position through cls.predictions."""
    b = len(caption)
    ids = torch.full((b, SEQ), PAD, dtype=torch.long)
    allowed = torch.zeros(b, SEQ + REGIONS, SEQ + REGIONS, dtype=torch.bool)
    for i, (c, t) in enumerate(zip(caption, tags)):
        a = [CLS, *c, SEP]
        ids[i, :len(a)] = torch.tensor(a)
        ids[i, SEQ_A:SEQ_A + len(t) + 1] = torch.tensor([*t, SEP])
        ctx = list(range(SEQ_A, SEQ_A + len(t) + 1)) + list(range(SEQ, SEQ + REGIONS))
        for q in range(len(a)):
            allowed[i, q, :q + 1] = True
            allowed[i, q, ctx] = True
        for q in ctx:
            allowed[i, q, ctx] = True
    token_type = torch.zeros_like(ids)
    token_type[:, SEQ_A:] = 1
    seq, _ = oscar_forward(sd, ids, token_type, torch.arange(SEQ).expand(b, SEQ), feats, allowed, img_layernorm)
    h = seq[:, :SEQ_A] @ sd["cls.predictions.transform.dense.weight"].T + sd["cls.predictions.transform.dense.bias"]
    h = _ln(_gelu(h), sd["cls.predictions.transform.LayerNorm.weight"], sd["cls.predictions.transform.LayerNorm.bias"],
            1e-12)
    return h @ sd["cls.predictions.decoder.weight"].T + sd["cls.predictions.bias"]


def oscar_match_logits(sd, text, tags, feats):
    """ImageBertForSequenceClassification: [CLS] text [SEP] tags [SEP] packed (contiguous
    positions), padded to max_seq_length, regions after; full attention over valid positions;
    classifier(pooled)."""
    b = len(text)
    ids = torch.full((b, SEQ), PAD, dtype=torch.long)
    token_type = torch.zeros_like(ids)
    allowed = torch.zeros(b, SEQ + REGIONS, SEQ + REGIONS, dtype=torch.bool)
    for i, (x, t) in enumerate(zip(text, tags)):
        a, bb = [CLS, *x, SEP], [*t, SEP]
        ids[i, :len(a) + len(bb)] = torch.tensor(a + bb)
        token_type[i, len(a):len(a) + len(bb)] = 1
        valid = list(range(len(a) + len(bb))) + list(range(SEQ, SEQ + REGIONS))
        allowed[i, :, valid] = True
    _, pooled = oscar_forward(sd, ids, token_type, torch.arange(SEQ).expand(b, SEQ), feats, allowed)
    return pooled @ sd["classifier.weight"].T + sd["classifier.bias"]


CAPTIONS = [[5, 6, 7], [8, 9, 10, 11, 12]]
TAGS = [[13, 14], [15, 16, 17]]


def regions(seed=1):
    return torch.randn(2, REGIONS, 2054, generator=torch.Generator().manual_seed(seed))


def mmcn_caption_logits(model, caption, tags, feats):
    b = len(caption)
    cap = torch.full((b, SEQ_A), PAD, dtype=torch.long)
    cmask = torch.zeros(b, SEQ_A, dtype=torch.bool)
    tag = torch.full((b, SEQ - SEQ_A), PAD, dtype=torch.long)
    tmask = torch.zeros_like(tag, dtype=torch.bool)
    for i, (c, t) in enumerate(zip(caption, tags)):
        cap[i, :len(c) + 2], cmask[i, :len(c) + 2] = torch.tensor([CLS, *c, SEP]), True
        tag[i, :len(t) + 1], tmask[i, :len(t) + 1] = torch.tensor([*t, SEP]), True
    hidden = model.hidden(cap, cmask, tag, tmask, feats, torch.ones(b, REGIONS, dtype=torch.bool))
    return model.cls(hidden[:, :SEQ_A]), cmask


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("tied, img_layernorm", [(True, True), (False, True), (True, False)])
def test_caption_checkpoint_imports_whole_and_gives_oscars_logits(tmp_path, tied, img_layernorm, pinned_torch):
    sd = oscar_state("caption", tied=tied, img_layernorm=img_layernorm)
    folder = write_oscar(tmp_path / "oscar", "caption", sd, img_layernorm=img_layernorm)
    task, model = load_model(folder)
    assert task == "caption" and model.config.max_text_len == SEQ_A and model.config.max_tag_len == SEQ - SEQ_A
    assert model.config.tie_word_embeddings is tied and model.config.use_img_layernorm is img_layernorm
    model.eval()
    with torch.no_grad():
        ours, valid = mmcn_caption_logits(model, CAPTIONS, TAGS, regions())
        theirs = oscar_caption_logits(sd, CAPTIONS, TAGS, regions(), img_layernorm)
    diff = (ours - theirs)[valid].abs().max().item()
    assert diff < 1e-5, diff


def test_retrieval_checkpoint_matches_oscars_matcher(tmp_path, pinned_torch):
    sd = oscar_state("retrieval")
    task, model = load_model(write_oscar(tmp_path / "oscar", "retrieval", sd))
    assert task == "retrieval" and not model.config.dual_encoder and model.config.match_head == "oscar"
    texts, tags = [[5, 6, 7], [8, 9, 10, 11]], [[13, 14], [15, 16, 17]]
    lt, lg = model.config.max_text_len, model.config.max_tag_len
    tid = torch.full((2, lt), PAD)
    tm = torch.zeros(2, lt, dtype=torch.bool)
    gid = torch.full((2, lg), PAD)
    gm = torch.zeros(2, lg, dtype=torch.bool)
    for i, (x, t) in enumerate(zip(texts, tags)):
        tid[i, :len(x) + 2], tm[i, :len(x) + 2] = torch.tensor([CLS, *x, SEP]), True
        gid[i, :len(t) + 1], gm[i, :len(t) + 1] = torch.tensor([*t, SEP]), True
    model.eval()
    with torch.no_grad():
        ours = model.match_logits(tid, tm, gid, gm, regions(), torch.ones(2, REGIONS, dtype=torch.bool))
        theirs = oscar_match_logits(sd, texts, tags, regions())
    assert (ours - theirs).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="no dual encoder"):
        model.encode_text(tid, tm)


def test_pretrained_checkpoint_initialises_both_tasks(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mmcn.models.regions.oscar")
    folder = write_oscar(tmp_path / "oscar", "pretrained", args=None)
    sd = oscar_state("pretrained")
    caption = build_model("caption", 0, init=str(folder), max_text_len=SEQ_A, max_tag_len=6, max_regions=REGIONS)
    assert torch.equal(caption.cls.predictions.transform.dense.weight, sd["cls.predictions.transform.dense.weight"])
    assert torch.equal(caption.img_norm.weight, sd["bert.LayerNorm.weight"])
    assert "cls.seq_relationship" in caplog.text  # left out, said so
    retrieval = build_model("retrieval", 0, init=str(folder), max_text_len=SEQ, max_tag_len=SEQ, max_regions=REGIONS)
    assert torch.equal(retrieval.bert.pooler.dense.weight, sd["bert.pooler.dense.weight"])
    assert "match_head" in caplog.text  # a new head, said so
    with pytest.raises(ValueError, match="pretrained Oscar checkpoint"):
        load_model(folder)


def test_export_round_trip_is_bit_exact(tmp_path):
    folder = write_oscar(tmp_path / "oscar", "caption", oscar_state("caption", tied=False), tie_weights=False)
    _, first = load_model(folder)
    assert main(["export-model", str(folder), str(tmp_path / "out")]) == 0
    saved = torch.load(tmp_path / "out/pytorch_model.bin", weights_only=True)
    original = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert set(saved) == set(original) and all(torch.equal(saved[k], original[k]) for k in original)
    assert json.loads((tmp_path / "out/config.json").read_text()) == json.loads((folder / "config.json").read_text())
    with torch.serialization.safe_globals([argparse.Namespace]):
        args = torch.load(tmp_path / "out/training_args.bin", weights_only=True)
    assert (args.max_seq_length, args.max_seq_a_length, args.max_img_seq_length) == (SEQ, SEQ_A, REGIONS)
    assert (tmp_path / "out/vocab.txt").read_text(encoding="utf-8") == (folder / "vocab.txt").read_text(encoding="utf-8")
    _, again = load_model(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def test_an_mmcn_model_exports_with_its_extra_heads_beside(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mmcn.models.regions.oscar")
    from mmcn.models.tokenizer import build_tokenizer

    tok = build_tokenizer(["红色的圆形", "蓝色 方形"])
    model = build_model("caption", len(tok), "tiny", copy_tags=True, max_text_len=8, max_tag_len=6, max_regions=4)
    written = export(model, tok, tmp_path / "out")
    assert written["side_file"] and "copy_query" in caplog.text
    keys = set(torch.load(tmp_path / "out/pytorch_model.bin", weights_only=True))
    assert "bert.img_embedding.weight" in keys and "bert.LayerNorm.weight" in keys and "cls.predictions.bias" in keys
    assert not any(k.startswith(("copy_", "img_norm", "img_embedding")) for k in keys)
    assert load_tokenizer(tmp_path / "out").convert_tokens_to_ids("圆") == tok.convert_tokens_to_ids("圆")


def test_an_oscar_caption_folder_captions_through_the_inference_api(tmp_path):
    folder = write_oscar(tmp_path / "oscar", "caption")
    generator = CaptionGenerator.from_dir(folder, Decoding(num_beams=2, max_length=5))
    captions, scores = generator([{"image_id": 1, "features": torch.randn(3, 2054), "tags": "丁 七"}])
    assert len(captions) == 1 and scores[0] <= 0


@pytest.mark.parametrize("damage, message", [
    ("missing", "missing: bert.encoder.layer.1.output.dense.bias"),
    ("extra", "no place: bert.encoder.layer.9.output.dense.bias"),
    ("shape", "bert.pooler.dense.weight (32, 16) vs (32, 32)"),
    ("args", "training_args.bin"),
])
def test_bad_checkpoints_are_clear_errors(tmp_path, damage, message):
    sd = oscar_state("caption")
    args = "default"
    if damage == "missing":
        del sd["bert.encoder.layer.1.output.dense.bias"]
    elif damage == "extra":
        sd["bert.encoder.layer.9.output.dense.bias"] = torch.zeros(H)
    elif damage == "shape":
        sd["bert.pooler.dense.weight"] = torch.zeros(H, H // 2)
    else:
        args = {"max_seq_length": SEQ}  # a dict, not Oscar's argparse.Namespace
    folder = write_oscar(tmp_path / "oscar", "caption", sd, args=args)
    with pytest.raises(OscarCheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model(folder)


def test_a_plain_bert_init_loads_the_masked_token_head_or_fails(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    from mmcn.models.tokenizer import build_tokenizer

    tok = build_tokenizer(["红色的圆形"])
    shape = BertConfig(vocab_size=len(tok), hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       intermediate_size=INTER, max_position_embeddings=64)
    torch.manual_seed(0)
    BertForMaskedLM(shape).save_pretrained(tmp_path / "mlm")
    tok.save_pretrained(str(tmp_path / "mlm"))
    mlm = BertForMaskedLM.from_pretrained(tmp_path / "mlm")
    caption = build_model("caption", 0, init=str(tmp_path / "mlm"), max_text_len=8, max_tag_len=6, max_regions=4)
    assert torch.equal(caption.cls.predictions.transform.dense.weight, mlm.cls.predictions.transform.dense.weight)
    assert torch.equal(caption.bert.encoder.layer[1].output.dense.bias, mlm.bert.encoder.layer[1].output.dense.bias)
    BertModel(shape).save_pretrained(tmp_path / "encoder-only")  # no MLM head: a caption model cannot start from it
    with pytest.raises(ValueError, match="masked-token head"):
        build_model("caption", 0, init=str(tmp_path / "encoder-only"), max_text_len=8, max_tag_len=6, max_regions=4)
    retrieval = build_model("retrieval", 0, init=str(tmp_path / "encoder-only"), max_text_len=8, max_tag_len=6,
                            max_regions=4)
    assert retrieval.bert.embeddings.word_embeddings.weight.shape == (len(tok), H)


def test_fine_tuning_from_an_oscar_checkpoint_then_evaluating_it(tmp_path, ray_session):
    """train@caption's library call with init = a Mengzi-Oscar-layout caption folder: Oscar's
    architecture, layout and vocabulary, fine-tuned on an LMDB, exported, evaluated; the same
    for retrieval from a retrieval fine-tune (ranked by its matcher: no dual encoder)."""
    import sys

    from mmcn.data.lmdb_build import build_lmdb
    from mmcn.eval.evaluate import EvalConfig, evaluate_captions, evaluate_retrieval
    from mmcn.train.loop import ModelSpec, TrainConfig, train

    sys.path.insert(0, str(Path(__file__).parent))
    from test_lmdb import make_dataset

    lmdb = tmp_path / "lmdb"
    for split, n in (("train", 8), ("valid", 3), ("test", 4)):
        d = make_dataset(tmp_path / split, n_images=n, split=split)
        build_lmdb(d["tsv"], tmp_path / f"built-{split}", d["features"], d["tags"])
        lmdb.mkdir(exist_ok=True)
        (tmp_path / f"built-{split}" / split).rename(lmdb / split)
    folder = write_oscar(tmp_path / "oscar", "caption")
    summary = train(ModelSpec("caption", init=str(folder), settings={"copy_tags": False, "label_smoothing": 0.0}),
                    lmdb, tmp_path / "model", TrainConfig(epochs=1, batch_size=4, lr=1e-4, workers=0), tmp_path / "ray")
    task, model = load_model(tmp_path / "model")
    assert summary["steps"] > 0 and task == "caption" and model.config.max_text_len == SEQ_A
    assert model.config.oscar["training_args"]["max_seq_length"] == SEQ and model.bert.pooler is not None
    assert load_tokenizer(tmp_path / "model").convert_tokens_to_ids("丁") == 6  # Oscar's vocabulary
    metrics = evaluate_captions(tmp_path / "model", lmdb, tmp_path / "reports", EvalConfig(num_beams=2, max_length=5,
                                                                                           batch_size=4))
    assert metrics["n_images"] == 4 and 0 <= metrics["CIDEr"]
    assert main(["export-model", str(tmp_path / "model"), str(tmp_path / "back")]) == 0
    _, again = load_model(tmp_path / "back")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    folder = write_oscar(tmp_path / "oscar-retrieval", "retrieval")
    settings = {"negatives": "hardest", "match_weight": 0.0}  # params.yaml's: a matcher-only model keeps its own
    summary = train(ModelSpec("retrieval", init=str(folder), settings=settings), lmdb, tmp_path / "retrieval",
                    TrainConfig(epochs=1, batch_size=4, lr=1e-4, workers=0), tmp_path / "ray")
    task, model = load_model(tmp_path / "retrieval")
    assert task == "retrieval" and not model.config.dual_encoder and model.config.negatives == "random"
    assert summary["train"][0]["loss"] > 0 and summary["valid"][-1]["valid_match_loss"] > 0
    metrics = evaluate_retrieval(tmp_path / "retrieval", lmdb, tmp_path / "reports-r", EvalConfig(batch_size=8))
    assert metrics["ranker"] == "cross_encoder" and metrics["n_images"] == 4
