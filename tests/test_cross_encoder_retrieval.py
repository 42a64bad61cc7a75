"""Retrieval with a cross-encoder only (Oscar's retrieval checkpoints have no dual encoder):
the evaluation stage and the searcher score every (text, image) pair with the matcher and
rank as the model's own scores, computed here pair by pair, say."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcn.cli import main
from mmcn.models.regions.datasets import RetrievalDataset
from mmcn.data.lmdb_build import build_lmdb
from mmcn.data.lmdb_store import LmdbStore
from mmcn.eval.evaluate import EvalConfig, evaluate_retrieval
from mmcn.infer import Searcher
from mmcn.models.factory import build_model
from mmcn.models.regions.inference import RetrievalEncoder, embed_texts
from mmcn.models.regions.inputs import RetrievalCollator
from mmcn.models.tokenizer import build_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_lmdb import make_dataset  # noqa: E402

LAYOUT = {"max_text_len": 16, "max_tag_len": 12, "max_regions": 6}


@pytest.fixture(scope="module")
def matcher_only(tmp_path_factory) -> Path:
    """A test split of 12 images and 15 texts (180 pairs) and a random tiny retrieval model
    without a dual encoder, with Oscar's matcher head, saved as a model folder."""
    root = tmp_path_factory.mktemp("cross-encoder")
    data = make_dataset(root / "data", n_images=12)
    build_lmdb(data["tsv"], root / "lmdb", data["features"], data["tags"])
    tok = build_tokenizer([t.text for t in data["texts"]] + ["红色 圆形", "一个红色的圆形"])
    torch.manual_seed(0)  # weights wider than BERT's 0.02: pairs' scores then differ by far more than float noise
    model = build_model("retrieval", tok.vocab_size, "tiny", dual_encoder=False, match_head="oscar", add_pooler=True,
                        negatives="random", initializer_range=0.15, **LAYOUT)
    model.save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    return root


def direct_scores(root: Path) -> np.ndarray:
    """log P(match) of every (text, image) pair by ``model.match_score``, all pairs in one call."""
    encoder = RetrievalEncoder.from_dir(root / "model")
    data = RetrievalDataset(root / "lmdb" / "test")
    pairs = [(t, i) for t in range(data.num_texts) for i in range(data.num_images)]
    b = RetrievalCollator(encoder.tok, encoder.model.config)([{**data.text(t), **data.image(i)} for t, i in pairs])
    with torch.no_grad():
        s = encoder.model.match_score(*(b[k] for k in ("text_ids", "text_mask", "tag_ids", "tag_mask", "img_feats",
                                                       "img_mask")))
    return s.numpy().reshape(data.num_texts, data.num_images)


def recall(scores: np.ndarray, gold: list[set[int]], k: int) -> float:
    """Chinese-CLIP's rule: a query hits at k when any of its gold items is in its top k (percent)."""
    hits = [bool(set(np.argsort(-row, kind="stable")[:k].tolist()) & g) for row, g in zip(scores, gold) if g]
    return 100.0 * sum(hits) / len(hits)


def test_the_model_has_no_dual_encoder(matcher_only):
    encoder = RetrievalEncoder.from_dir(matcher_only / "model")
    assert not encoder.dual_encoder and encoder.dim == 0
    with pytest.raises(ValueError, match="no dual encoder"):
        embed_texts(encoder, RetrievalDataset(matcher_only / "lmdb" / "test"))


def test_evaluation_ranks_every_pair_by_the_cross_encoder(ray_session, matcher_only, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mmcn.eval.evaluate"):
        metrics = evaluate_retrieval(matcher_only / "model", matcher_only / "lmdb", tmp_path,
                                     EvalConfig(batch_size=8, rerank_k=3))
    assert metrics["ranker"] == "cross_encoder" and metrics["rerank_k"] == 0
    assert "dual_encoder" not in metrics and "reranked" not in metrics
    assert metrics["n_texts"] == 15 and metrics["n_images"] == 12 and metrics["pairs_scored"] == 180
    assert "rerank_k 3 is ignored" in caplog.text and "cross-encoder: 180/180 pair (100%)" in caplog.text

    scores = direct_scores(matcher_only)
    for axis in (0, 1):  # no near-ties either way: other batchings' float noise (< 1e-6) cannot reorder
        assert np.diff(np.sort(scores, axis=axis), axis=axis).min() > 2e-6
    store = LmdbStore(matcher_only / "lmdb" / "test")
    position = {int(i): k for k, i in enumerate(store.image_ids)}
    texts = list(store.texts())
    text_gold = [{position[i] for i in t.image_ids} for t in texts]
    image_gold = [{t for t in range(len(texts)) if i in text_gold[t]} for i in range(len(store))]
    for direction, s, gold in (("t2i", scores, text_gold), ("i2t", scores.T, image_gold)):
        for k in (1, 5, 10):
            assert metrics[direction][f"r{k}"] == pytest.approx(recall(s, gold, k), abs=1e-3), (direction, k)

    t2i = {r["text_id"]: r["image_ids"]
           for r in map(json.loads, (tmp_path / "t2i_predictions.jsonl").read_text(encoding="utf-8").splitlines())}
    assert t2i == {t.text_id: [int(store.image_ids[i]) for i in np.argsort(-scores[k])[:10]]
                   for k, t in enumerate(texts)}


def test_search_ranks_by_the_matcher(matcher_only, capsys):
    searcher = Searcher.from_dir(matcher_only / "model", None, device="cpu", batch_size=5)  # 12 images: 3 calls
    assert searcher.index_lmdb(matcher_only / "lmdb" / "test") == 12 and len(searcher.items) == 12
    store = LmdbStore(matcher_only / "lmdb" / "test")
    scores = direct_scores(matcher_only)
    for t, text in enumerate(list(store.texts())[:3]):
        hits = searcher.search(text.text, k=12)
        order = np.argsort(-scores[t])
        assert [h.name for h in hits] == [str(store.image_ids[i]) for i in order]
        assert [h.score for h in hits] == pytest.approx(scores[t][order].tolist(), abs=1e-5)
    assert [h.rank for h in searcher.search("一个红色的圆形", k=3)] == [1, 2, 3]

    query = next(store.texts()).text
    assert main(["search", query, "--lmdb", str(matcher_only / "lmdb" / "test"), "--model",
                 str(matcher_only / "model"), "--top-k", "3", "--json", "--device", "cpu"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [h["image"] for h in hits] == [str(store.image_ids[i]) for i in np.argsort(-scores[0])[:3]]
