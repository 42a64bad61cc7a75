"""Evaluation stages' library: Ray Data generation and ranking, metrics equal to the
scorers run on the written files, baselines."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mmcn.data.lmdb_store import LmdbStore
from mmcn.eval.caption_metrics import evaluate_caption_files
from mmcn.eval.evaluate import EvalConfig, chance_recall, evaluate_captions, evaluate_retrieval
from mmcn.eval.retrieval_metrics import evaluate_retrieval_files


@pytest.fixture(scope="module")
def trained(chain_project):
    """Tiny caption and retrieval models on a few demo images (conftest.py; 12 test images:
    Chinese-CLIP scores top-10 lists)."""
    return chain_project


def test_caption_metrics_match_the_scorer_on_the_written_files(ray_session, trained, tmp_path):
    metrics = evaluate_captions(trained / "models/caption", trained / "lmdb", tmp_path, EvalConfig(batch_size=4, num_beams=2,
                                                                                            max_length=8))
    store = LmdbStore(trained / "lmdb" / "test")
    assert metrics["n_images"] == len(store) and metrics["split"] == "test"
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(p["image_id"] for p in preds) == sorted(store.image_ids.tolist())
    refs = tmp_path / "refs.jsonl"
    rows = [json.loads(line) for line in (tmp_path / "per_image.jsonl").read_text(encoding="utf-8").splitlines()]
    refs.write_text("".join(json.dumps({"image_id": r["image_id"], "captions": r["references"]}, ensure_ascii=False)
                            + "\n" for r in rows), encoding="utf-8")
    again = evaluate_caption_files(refs, tmp_path / "predictions.jsonl").summary
    for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert metrics[key] == pytest.approx(again[key], abs=1e-6)
        assert key in metrics["baseline_most_frequent_caption"]
    assert metrics["baseline_most_frequent_caption"]["caption"]
    assert all("CIDEr" in r and r["caption"] == next(p["caption"] for p in preds if p["image_id"] == r["image_id"])
               for r in rows)
    # degenerate output is called out: > half empty, or one caption for > half of the images
    captions = [p["caption"] for p in preds]
    empty = sum(not c.strip() for c in captions)
    top = max([captions.count(c) for c in captions if c.strip()], default=0)
    assert any(" generated captions are empty" in w for w in metrics["warnings"]) == (empty * 2 > len(captions))
    assert any(w.startswith("one caption, ") for w in metrics["warnings"]) == (top * 2 > len(captions))
    # the references' characters the model's vocabulary lacks (demo captions: one token per character)
    assert_oov(metrics, trained / "models/caption", [c for r in rows for c in r["references"]])


def assert_oov(metrics: dict, model_dir, texts: list[str]) -> None:
    from mmcn.models.tokenizer import load_tokenizer

    vocab = load_tokenizer(model_dir).get_vocab()
    chars = [ch for t in texts for ch in t if not ch.isspace()]
    assert all("\u4e00" <= ch <= "\u9fff" or ch in "，。、：；" for ch in chars)  # BERT splits each one off
    unknown = [ch for ch in chars if ch not in vocab]
    assert (metrics["oov_unk_tokens"], metrics["oov_total_tokens"]) == (len(unknown), len(chars))
    assert metrics["oov_rate"] == round(len(unknown) / len(chars), 6)


def test_retrieval_metrics_match_chinese_clip_scoring_of_the_written_files(ray_session, trained, tmp_path):
    metrics = evaluate_retrieval(trained / "models/retrieval", trained / "lmdb", tmp_path, EvalConfig(batch_size=4,
                                                                                              rerank_k=3))
    assert set(metrics) >= {"t2i", "i2t", "mean_recall", "dual_encoder", "reranked", "baseline_chance"}
    assert metrics["ranker"] == "dual_encoder+rerank"
    texts = tmp_path / "texts.jsonl"
    store = LmdbStore(trained / "lmdb" / "test")
    texts.write_text("".join(json.dumps(t.to_json(), ensure_ascii=False) + "\n" for t in store.texts()),
                     encoding="utf-8")
    for direction in ("t2i", "i2t"):
        scored = evaluate_retrieval_files(texts, tmp_path / f"{direction}_predictions.jsonl", direction)
        assert scored["success"], scored
        for k in ("r1", "r5"):
            assert metrics[direction][k] == pytest.approx(scored["scoreJson"][k], abs=1e-3)
    assert 0 <= metrics["mean_recall"] <= 100
    # the gallery: 12 test images, over 10 texts: no R@k ranks all of either
    assert (metrics["gallery_images"], metrics["gallery_texts"]) == (len(store), store.num_texts)
    assert len(store) > 10 and store.num_texts > 10 and metrics["notes"] == []
    assert_oov(metrics, trained / "models/retrieval", [t.text for t in store.texts()])


def test_chance_recall():
    assert chance_recall(10, [1, 1]) == {"r1": pytest.approx(10.0), "r5": pytest.approx(50.0), "r10": 100.0,
                                         "mean_recall": pytest.approx(160 / 3)}
    two = chance_recall(10, [2])
    assert two["r1"] == pytest.approx(20.0) and two["r5"] == pytest.approx(100 * (1 - 56 / 252))


def test_re_ranking_needs_a_trained_matcher(trained, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained / "models/retrieval", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "match_weight": 0.0}))
    with pytest.raises(ValueError, match="without its cross-encoder matcher"):
        evaluate_retrieval(model, trained / "lmdb", tmp_path / "out", EvalConfig(rerank_k=3))


def test_reranked_candidates_are_placed_by_rank_however_unlikely_their_match():
    """log P(match) of -20 and -12 still put both candidates above every other image, in match order."""
    from mmcn.eval.evaluate import _place_by_rank

    scores = np.array([[0.9, 0.5, 0.1, -0.2]])
    match = {0: -20.0, 1: -12.0}
    out = _place_by_rank(scores, np.array([[0, 1]]), lambda q, c: match[c])
    assert np.argsort(-out[0], kind="stable").tolist() == [1, 0, 2, 3]
    assert np.array_equal(out[0, 2:], scores[0, 2:])  # the others keep their cosines
    tied = _place_by_rank(scores, np.array([[0, 1]]), lambda q, c: -5.0)
    assert np.argsort(-tied[0], kind="stable").tolist() == [0, 1, 2, 3]  # ties: the dual encoder's order
