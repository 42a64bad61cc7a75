"""ClipCap (task clipcap): mapper shapes by ClipCap's rules, the loss on caption tokens only,
a tiny model that overfits a few pairs to their exact captions (greedy and beam), a frozen
GPT-2 that stays untouched, save/load round trips, seeded sampling, and the shared training
loop end to end on a tiny LMDB (cached CLIP embeddings, export layout)."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmcn.models.pixels.clip import build_clip, image_embeddings, image_processor, load_clip
from mmcn.models.pixels.clipcap import (ClipCapCollator, ClipCapDecoding, ClipCapGenerator, ClipCapModel, MLPMapper,
                                 TransformerMapper, build_clipcap)
from mmcn.models.tokenizer import build_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from conftest import pinned_numerics  # noqa: E402

CAPTIONS = ["一个红色的圆形", "两个蓝色的方块", "绿色三角形在左边", "黄色的星星在中间"]
COLOURS = [(230, 20, 20), (20, 20, 230), (20, 200, 20), (240, 230, 10)]


def image(colour, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random Chinese-CLIP saved as models/clip is (weights, tokenizer, image processor)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip") / "clip"
    tok = build_tokenizer(CAPTIONS)
    build_clip(len(tok), "tiny", image_size=32, embed_dim=24).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    image_processor(32).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CAPTIONS)


@pytest.fixture(scope="module")
def embeddings(clip_dir) -> torch.Tensor:
    model, _, processor = load_clip(clip_dir)
    return image_embeddings(model, processor, [image(c) for c in COLOURS])


def tiny(clip_dir, tokenizer, **settings) -> ClipCapModel:
    torch.manual_seed(0)
    return build_clipcap(len(tokenizer), "tiny", clip=str(clip_dir), **{
        "mapping": "mlp", "prefix_len": 4, "constant_len": 3, "num_layers": 1, "max_text_len": 16, **settings})


def fit(model: ClipCapModel, batch: dict, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mapping", ["mlp", "transformer"])
def test_mapper_shapes_follow_clipcap(clip_dir, tokenizer, mapping):
    """ClipCap's MLP: Linear(clip, d*P/2) Tanh Linear(d*P/2, d*P) -> P embeddings; its
    TransformerMapper: Linear(clip, P*d) tokens + C learned constants -> the C outputs."""
    model = tiny(clip_dir, tokenizer, mapping=mapping, prefix_len=4, constant_len=3, num_layers=2)
    d, clip_dim = model.gpt2.config.n_embd, 24
    mapper = model.mapper
    x = torch.randn(5, clip_dim)
    if mapping == "mlp":
        assert isinstance(mapper, MLPMapper)
        first, act, second = mapper.model
        assert (first.in_features, first.out_features) == (clip_dim, d * 4 // 2)
        assert isinstance(act, torch.nn.Tanh)
        assert (second.in_features, second.out_features) == (d * 4 // 2, d * 4)
        assert mapper(x).shape == (5, 4, d) == model.prefix(x).shape
        assert model.config.prefix_tokens == 4
    else:
        assert isinstance(mapper, TransformerMapper)
        assert (mapper.linear.in_features, mapper.linear.out_features) == (clip_dim, 4 * d)
        assert mapper.constants.shape == (3, d) and len(mapper.transformer.layers) == 2
        assert mapper(x).shape == (5, 3, d) == model.prefix(x).shape
        assert model.config.prefix_tokens == 3
        # the outputs are the constants' positions: the projected tokens, alone, give other values
        tokens = mapper.linear(x).view(5, 4, d)
        seq = torch.cat([tokens, mapper.constants.expand(5, -1, -1)], 1)
        assert torch.allclose(mapper.transformer(seq)[:, 4:], mapper(x), atol=1e-6)


def test_loss_scores_caption_tokens_only(clip_dir, tokenizer, embeddings):
    """Cross entropy of caption tokens + [SEP] after the prefix, computed here from GPT-2's
    own logits: prefix positions and padding never count."""
    model = tiny(clip_dir, tokenizer).eval()
    batch = ClipCapCollator(tokenizer, 16)([{"embedding": e, "caption": c} for e, c in zip(embeddings, CAPTIONS)])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids[0, :mask[0].sum()].tolist() == tokenizer.encode(CAPTIONS[0], add_special_tokens=False) + \
        [tokenizer.sep_token_id]
    prefix = model.prefix(batch["clip_embeds"])
    p = prefix.shape[1]
    logits = model.gpt2(inputs_embeds=torch.cat([prefix, model.gpt2.transformer.wte(ids)], 1),
                        attention_mask=torch.cat([torch.ones(4, p, dtype=torch.long), mask], 1)).logits
    nll, n = 0.0, 0
    for b in range(4):
        for t in range(int(mask[b].sum())):  # token t of the caption is predicted at position p - 1 + t
            nll -= logits[b, p - 1 + t].log_softmax(-1)[ids[b, t]].item()
            n += 1
    assert model(**batch).loss.item() == pytest.approx(nll / n, rel=1e-5)


def test_finetuned_tiny_clipcap_overfits_to_the_exact_captions(clip_dir, tokenizer, embeddings):
    with pinned_numerics():
        model = tiny(clip_dir, tokenizer, mapping="transformer", finetune_gpt2=True)
        batch = ClipCapCollator(tokenizer, 16)([{"embedding": e, "caption": c} for e, c in zip(embeddings, CAPTIONS)])
        losses = fit(model, batch, 120, 3e-3)
        assert losses[-1] < 0.05 < losses[0]
        model.eval()
        for beams in (1, 3):
            captions, scores = ClipCapGenerator(model, tokenizer, ClipCapDecoding(num_beams=beams)).from_embeddings(
                embeddings)
            assert captions == CAPTIONS and all(-0.1 < s <= 0 for s in scores)


def test_greedy_generate_on_prefix_embeddings_is_the_argmax_chain(clip_dir, tokenizer, embeddings):
    """transformers' generate(inputs_embeds=prefix) in this version: greedy equals feeding GPT-2
    its own argmax token after the prefix, step by step ([PAD]/[CLS]/[MASK] never chosen,
    stop at [SEP])."""
    model = tiny(clip_dir, tokenizer, mapping="transformer").eval()
    ids, _ = model.generate(embeddings, ClipCapDecoding(num_beams=1, max_length=7), tokenizer.sep_token_id,
                            tokenizer.pad_token_id, [tokenizer.pad_token_id, tokenizer.cls_token_id,
                                                     tokenizer.mask_token_id])
    banned = [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.mask_token_id]
    with torch.no_grad():
        for k in range(len(embeddings)):
            seq, chain = model.prefix(embeddings[k:k + 1]), []
            for _ in range(7):
                logits = model.gpt2(inputs_embeds=seq).logits[0, -1]
                logits[banned] = float("-inf")
                token = int(logits.argmax())
                if token == tokenizer.sep_token_id:
                    break
                chain.append(token)
                seq = torch.cat([seq, model.gpt2.transformer.wte(torch.tensor([[token]]))], 1)
            assert ids[k] == chain


def test_frozen_gpt2_trains_the_mapper_alone(clip_dir, tokenizer, embeddings):
    with pinned_numerics():
        model = tiny(clip_dir, tokenizer, finetune_gpt2=False)
        before = {k: v.clone() for k, v in model.gpt2.state_dict().items()}
        batch = ClipCapCollator(tokenizer, 16)([{"embedding": e, "caption": c} for e, c in zip(embeddings, CAPTIONS)])
        model.train()
        assert not model.gpt2.training and model.mapper.training  # ClipCap's ClipCaptionPrefix: GPT-2 in eval
        model(**batch).loss.backward()
        assert all(p.grad is None for p in model.gpt2.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mapper.parameters())
        model.zero_grad()
        # a random frozen GPT-2 is a poor language model to steer (a pretrained Chinese GPT-2 is what
        # ClipCap freezes): the check is that the prefix alone lowers the loss, GPT-2 untouched
        losses = fit(model, batch, 60, 1e-2)
        assert losses[-1] < losses[0] - 0.1
        assert all(torch.equal(before[k], v) for k, v in model.gpt2.state_dict().items())


def test_save_load_round_trip_gives_identical_captions(clip_dir, tokenizer, embeddings, tmp_path):
    with pinned_numerics():
        model = tiny(clip_dir, tokenizer, mapping="transformer")
        batch = ClipCapCollator(tokenizer, 16)([{"embedding": e, "caption": c} for e, c in zip(embeddings, CAPTIONS)])
        fit(model, batch, 30, 3e-3)
        model.eval()
        model.save_pretrained(tmp_path / "m")
        tokenizer.save_pretrained(str(tmp_path / "m"))
        config = json.loads((tmp_path / "m" / "config.json").read_text())
        assert config["model_type"] == "mmcn_clipcap" and config["clip"] == "clip"
        assert config["clip_source"] == str(clip_dir) and config["clip_dim"] == 24 and config["mapping"] == "transformer"
        assert {"config.json", "mapper.safetensors", "gpt2", "clip"} <= {p.name for p in (tmp_path / "m").iterdir()}
        assert (tmp_path / "m" / "gpt2" / "config.json").is_file() and (tmp_path / "m" / "clip" / "tokenizer_config.json").is_file()
        images = [image(c) for c in COLOURS]
        decoding = ClipCapDecoding(num_beams=2, max_length=12)
        original = ClipCapGenerator(model, tokenizer, decoding)(images)
        loaded = ClipCapGenerator.from_dir(tmp_path / "m", decoding)
        assert loaded.model.config.clip == str(tmp_path / "m" / "clip")  # its own copy of the CLIP model
        assert loaded(images) == original
        state, again = model.state_dict(), loaded.model.state_dict()
        assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)


def test_sampling_is_deterministic_under_a_seed(clip_dir, tokenizer, embeddings):
    model = tiny(clip_dir, tokenizer).eval()
    two = embeddings[1:3]
    for mode in ("top_k", "top_p"):
        gen = lambda seed: ClipCapGenerator(model, tokenizer, ClipCapDecoding(  # noqa: E731
            decoding=mode, top_k=20, top_p=0.95, max_length=6, seed=seed))
        first = gen(0).from_embeddings(two)
        torch.manual_seed(123)  # the global stream does not decide
        assert gen(0).from_embeddings(two) == first
        assert gen(0).from_embeddings(two[1:])[0] == first[0][1:]  # nor the batch the image is in
    others = [gen(s).from_embeddings(two[:1])[0][0] for s in (1, 2, 3)]
    assert any(o != first[0][0] for o in others)  # the seed does


def test_bad_settings_are_errors(clip_dir, tokenizer):
    with pytest.raises(ValueError, match="mapping: must be one of mlp, transformer"):
        tiny(clip_dir, tokenizer, mapping="lstm")
    with pytest.raises(ValueError, match="prefix_len: must be an integer >= 1"):
        tiny(clip_dir, tokenizer, prefix_len=0)
    with pytest.raises(FileNotFoundError, match="clipcap.model.clip"):
        build_clipcap(len(tokenizer), "tiny", clip=str(clip_dir.parent / "none"))
    with pytest.raises(ValueError, match="decoding: must be one of beam, top_k, top_p"):
        ClipCapDecoding(decoding="greedy")
    with pytest.raises(ValueError, match="top_p: must be in"):
        ClipCapDecoding(top_p=0)


def test_training_loop_and_evaluation_end_to_end(ray_session, clip_dir, tmp_path):
    """The shared Ray Train loop (in-process) trains clipcap on a tiny LMDB: embeddings cached
    once in the run folder, valid loss/accuracy per epoch, export in the saved layout; the
    evaluation's Ray Data actors caption the stored image bytes as the generator does, scored
    with evaluate@caption's metric keys and files."""
    from test_lmdb import make_dataset

    from mmcn.data.lmdb_build import build_lmdb
    from mmcn.data.lmdb_store import LmdbStore
    from mmcn.models.factory import load_model
    from mmcn.train.loop import ModelSpec, TrainConfig, train

    lmdb = tmp_path / "lmdb"
    lmdb.mkdir()
    for split, n in (("train", 8), ("valid", 3)):
        d = make_dataset(tmp_path / split, n_images=n, split=split)
        build_lmdb(d["tsv"], tmp_path / f"built-{split}", d["features"], d["tags"])
        (tmp_path / f"built-{split}" / split).rename(lmdb / split)
    settings = {"clip": str(clip_dir), "mapping": "mlp", "prefix_len": 2, "max_text_len": 16, "finetune_gpt2": True}
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, workers=0, checkpoint_every=100)
    summary = train(ModelSpec("clipcap", "tiny", settings=settings), lmdb, tmp_path / "model", cfg, tmp_path / "ray")
    steps = len(LmdbStore(lmdb / "train").pairs) // 4
    assert summary["steps"] == steps == len(summary["train"]) and [v["epoch"] for v in summary["valid"]] == [1]
    assert {"valid_loss", "valid_token_accuracy"} <= set(summary["valid"][-1])
    caches = sorted(p.name for p in (tmp_path / "ray" / summary["run"] / "clip-embeddings").iterdir())
    assert caches == ["train.safetensors", "valid.safetensors"]
    task, model = load_model(tmp_path / "model")
    assert task == "clipcap" and isinstance(model, ClipCapModel) and model.config.clip_source == str(clip_dir)
    assert (tmp_path / "model" / "tokenizer_config.json").is_file() and (tmp_path / "model" / "clip" / "config.json").is_file()
    meta = json.loads((tmp_path / "model" / "mmcn.json").read_text())
    assert meta["task"] == "clipcap" and meta["model"]["settings"]["clip"] == str(clip_dir)
    store = LmdbStore(lmdb / "valid")
    captions, scores = ClipCapGenerator.from_dir(tmp_path / "model", ClipCapDecoding(max_length=6))(
        [store.get(i, ("image",)).image for i in range(len(store))])
    assert len(captions) == 3 and all(s <= 0 for s in scores)

    from mmcn.data.eval_files import read_caption_predictions, read_caption_scores
    from mmcn.eval.caption_metrics import METRICS
    from mmcn.eval.evaluate import evaluate_clipcap
    from mmcn.models.pixels.clipcap import ClipCapEvalConfig

    metrics = evaluate_clipcap(tmp_path / "model", lmdb, tmp_path / "report", ClipCapEvalConfig(
        batch_size=2, max_length=6), split="valid")
    assert set(METRICS) <= set(metrics) and metrics["n_images"] == 3 and metrics["decoding"] == "beam"
    assert set(METRICS) <= set(metrics["baseline_most_frequent_caption"])
    predicted = {int(r.image_id): r.caption for r in read_caption_predictions(tmp_path / "report" / "predictions.jsonl")}
    assert predicted == {int(i): c for i, c in zip(store.image_ids, captions)}
    assert len(read_caption_scores(tmp_path / "report" / "per_image.jsonl")) == 3


def test_mmcn_caption_with_a_clipcap_folder_reads_raw_images(clip_dir, tokenizer, embeddings, tmp_path, monkeypatch,
                                                             capsys):
    """`mmcn caption --model <clipcap folder>`: no detector; decoding from clipcap.eval of
    ./params.yaml; a bad file is skipped and named (exit 1)."""
    from mmcn.cli import main

    with pinned_numerics():
        model = tiny(clip_dir, tokenizer)
        batch = ClipCapCollator(tokenizer, 16)([{"embedding": e, "caption": c} for e, c in zip(embeddings, CAPTIONS)])
        fit(model, batch, 60, 3e-3)
    model.eval().save_pretrained(tmp_path / "clipcap")
    tokenizer.save_pretrained(str(tmp_path / "clipcap"))
    files = []
    for k, colour in enumerate(COLOURS[:2]):
        files.append(tmp_path / f"{k}.png")
        files[-1].write_bytes(image(colour))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "params.yaml").write_text("clipcap:\n  eval:\n    num_beams: 2\n    max_length: 12\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    expected, _ = ClipCapGenerator(model, tokenizer, ClipCapDecoding(num_beams=2, max_length=12))(
        [f.read_bytes() for f in files])
    code = main(["caption", "--model", str(tmp_path / "clipcap"), "--json", "--device", "cpu",
                 *map(str, files), str(tmp_path / "bad.jpg")])
    out = capsys.readouterr()
    assert code == 1 and "bad.jpg" in out.err
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["caption"] for r in rows] == expected and [r["image"] for r in rows] == list(map(str, files))


def test_report_compares_the_caption_families(tmp_path):
    """The report's family table (Oscar-style vs ClipCap: CIDEr-D, BLEU-4, ROUGE-L, training
    time) and each gallery image's ClipCap caption beside the Oscar-style one."""
    import html

    from test_lmdb import make_dataset

    from mmcn.data.eval_files import write_caption_scores
    from mmcn.data.lmdb_build import build_lmdb
    from mmcn.data.lmdb_store import LmdbStore
    from mmcn.eval.report import ReportConfig, build_report

    d = make_dataset(tmp_path / "data", n_images=3, split="test")
    build_lmdb(d["tsv"], tmp_path / "lmdb", d["features"], d["tags"])
    ids = [int(i) for i in LmdbStore(tmp_path / "lmdb" / "test").image_ids]
    for task, caption, cider in (("caption", "区域模型的描述", 0.25), ("clipcap", "前缀模型的描述", 0.75)):
        (tmp_path / "reports" / task).mkdir(parents=True)
        write_caption_scores(tmp_path / "reports" / task / "per_image.jsonl", (
            {"image_id": i, "caption": f"{caption}{k}", "references": ["参考"], "CIDEr": cider + k, "Bleu_4": 0.1}
            for k, i in enumerate(ids)))
        (tmp_path / f"{task}.json").write_text(json.dumps({"CIDEr": cider, "Bleu_4": 0.5, "ROUGE_L": 0.625,
                                                           "n_images": 3}))
        (tmp_path / f"train_{task}.json").write_text(json.dumps({"seconds": 60.0 if task == "caption" else 42.4}))
    metrics = {name: tmp_path / f"{name}.json" for name in ("caption", "clipcap", "train_caption", "train_clipcap")}
    counts = build_report(tmp_path / "index.html", tmp_path / "lmdb" / "test", tmp_path / "reports" / "caption", None,
                          metrics, [], ReportConfig(), None, {"ClipCap": tmp_path / "reports" / "clipcap" /
                                                              "per_image.jsonl"})
    page = html.unescape((tmp_path / "index.html").read_text(encoding="utf-8"))
    assert counts["caption_images"] == 3
    table = page[page.index('<section id="families">'):page.index("</section>", page.index('id="families"'))]
    assert "<th>CIDEr-D</th><th>BLEU-4</th><th>ROUGE-L</th>" in table and "METEOR" not in table  # none has METEOR
    assert "<td>caption</td><td>0.250</td><td>0.500</td><td>0.625</td><td>3</td><td>60</td>" in table
    assert "<td>clipcap</td><td>0.750</td><td>0.500</td><td>0.625</td><td>3</td><td>42</td>" in table
    for k in range(3):  # each card: the Oscar-style caption, then ClipCap's with its own CIDEr-D
        card = page[page.index(f"区域模型的描述{k}"):]
        assert card.index(f"前缀模型的描述{k}") < card.index("</article>")
        assert f"ClipCap</b> 前缀模型的描述{k} <span class=\"scores\">CIDEr-D {0.75 + k:.3f}" in card


def test_a_clipcap_model_that_ignores_the_images_is_told_to_look_at_its_clip():
    from mmcn.eval.evaluate import caption_warnings

    (same,) = caption_warnings({i: "一只猫" for i in range(3)}, "clipcap")
    assert "CLIP image embeddings" in same and "region features" not in same
    (empty,) = caption_warnings({i: "" for i in range(3)}, "clipcap")
    assert "metrics/train_clipcap.json" in empty
