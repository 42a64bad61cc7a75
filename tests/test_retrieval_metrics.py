"""Retrieval recall vs Chinese-CLIP's query-at-a-time evaluation (ties, multi-gold, misses); `mmcn eval-retrieval`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcn.cli import main as cli_main
from mmcn.data import tsv
from mmcn.eval.retrieval_metrics import evaluate_retrieval_files, gold_ranks, recall_at_k, retrieval_scores, topk


# --- Chinese-CLIP's method, one query at a time (make_topk_predictions.py + evaluation.py) ---

def reference_topk(row: np.ndarray, k: int = 10) -> list[int]:
    return [i for i, _ in sorted(enumerate(row.tolist()), key=lambda x: x[1], reverse=True)[:k]]


def reference_recall(gold: dict, predictions: dict) -> dict[str, float]:
    """Chinese-CLIP's loop; a query without a prediction is a miss (mmcn's rule for partial files)."""
    r1_stat, r5_stat, r10_stat = 0, 0, 0
    for qid in gold:
        ground_truth_ids = set(gold[qid])
        top10 = predictions.get(qid, [])
        if any([idx in top10[:1] for idx in ground_truth_ids]):
            r1_stat += 1
        if any([idx in top10[:5] for idx in ground_truth_ids]):
            r5_stat += 1
        if any([idx in top10[:10] for idx in ground_truth_ids]):
            r10_stat += 1
    r1, r5, r10 = r1_stat * 1.0 / len(gold), r5_stat * 1.0 / len(gold), r10_stat * 1.0 / len(gold)
    mean_recall = (r1 + r5 + r10) / 3.0
    return {"r1": r1 * 100, "r5": r5 * 100, "r10": r10 * 100, "mean_recall": mean_recall * 100}


def random_case(seed: int, n_texts: int = 120, n_images: int = 40, levels: int | None = 6):
    """Scores with many ties (``levels`` distinct values) and 0-3 gold images per text."""
    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, levels, (n_texts, n_images)) if levels else rng.normal(size=(n_texts, n_images)))
    gold = [set(rng.choice(n_images, rng.integers(0, 4), replace=False).tolist()) for _ in range(n_texts)]
    return scores.astype(np.float32), gold


@pytest.mark.parametrize("seed, levels", [(0, 6), (1, 2), (2, None), (3, 1)])
def test_recall_matches_chinese_clip_both_directions(seed, levels):
    scores, gold = random_case(seed, levels=levels)
    t2i = {q: reference_topk(scores[q]) for q in range(len(scores))}
    assert recall_at_k(scores, gold) == reference_recall(dict(enumerate(gold)), t2i)
    # image-to-text: queries are the images some text names, gold = the texts naming them
    image_gold: dict[int, set[int]] = {}
    for t, images in enumerate(gold):
        for i in images:
            image_gold.setdefault(i, set()).add(t)
    image_gold = dict(sorted(image_gold.items()))
    i2t = {i: reference_topk(scores[:, i]) for i in image_gold}
    both = retrieval_scores(scores, gold)
    assert both["t2i"] == reference_recall(dict(enumerate(gold)), t2i)
    assert both["i2t"] == reference_recall(image_gold, i2t)
    assert both["mean_recall"] == pytest.approx((both["t2i"]["mean_recall"] + both["i2t"]["mean_recall"]) / 2)


def test_batches_and_tensors_give_the_same_ranks():
    scores, gold = random_case(4)
    expected = gold_ranks(scores, gold)
    assert (gold_ranks(scores, gold, batch_rows=7) == expected).all()
    assert (gold_ranks(torch.from_numpy(scores), gold, batch_rows=16) == expected).all()
    assert (gold_ranks(scores.astype(np.int64), gold, batch_rows=5) == expected).all()


def test_ties_go_to_the_lower_index():
    scores = np.zeros((2, 12), dtype=np.float32)
    gold = [{10}, {0}]  # all scores equal: item 10 ranks 11th, item 0 first
    assert gold_ranks(scores, gold).tolist() == [10, 0]
    assert recall_at_k(scores, gold) == {"r1": 50.0, "r5": 50.0, "r10": 50.0, "mean_recall": 50.0}


def test_queries_without_gold_are_misses_in_the_denominator():
    scores = np.eye(4, dtype=np.float32)
    assert recall_at_k(scores, [{0}, {1}, set(), set()]) == {"r1": 50.0, "r5": 50.0, "r10": 50.0, "mean_recall": 50.0}


@pytest.mark.parametrize("levels", [3, None])
def test_topk_is_chinese_clips_order(levels):
    scores, _ = random_case(5, levels=levels)
    expected = np.array([reference_topk(row) for row in scores])
    assert (topk(scores, 10) == expected).all()
    assert (topk(torch.from_numpy(scores), 10, batch_rows=9) == expected).all()


def test_bad_inputs_raise():
    scores = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="outside the 3 score columns"):
        recall_at_k(scores, [{0}, {3}])
    with pytest.raises(ValueError, match="one set per query"):
        recall_at_k(scores, [{0}])
    scores[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(scores, [{0}, {1}])
    with pytest.raises(ValueError, match="between 1 and"):
        topk(scores, 4)


# --- CLI ----------------------------------------------------------------------------------

TEXTS = [tsv.Text(100, "一只猫", [1]), tsv.Text(101, "两只狗", [2, 3]), tsv.Text(102, "一辆车", [4]),
         tsv.Text(103, "猫和狗", [1, 2])]
IMAGES = list(range(1, 13))


def ranked(first: list[int], pool: list[int] = IMAGES) -> list[int]:
    return first + [i for i in pool if i not in first][: 10 - len(first)]


def write_files(tmp_path: Path, lines: list) -> tuple[Path, Path]:
    texts = tmp_path / "valid_texts.jsonl"
    tsv.write_texts(texts, TEXTS)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return texts, preds


def run_cli(capsys, texts: Path, preds: Path, direction: str = "t2i", *flags: str) -> tuple[int, dict, str]:
    code = cli_main(["eval-retrieval", "--texts", str(texts), "--predictions", str(preds), "--direction", direction,
                     *flags])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def t2i_lines() -> list[dict]:
    return [{"text_id": 100, "image_ids": ranked([1])},  # hit at 1
            {"text_id": 101, "image_ids": ranked([5, 6, 7, 3])},  # hit at 4
            {"text_id": 102, "image_ids": ranked([9, 8], [i for i in IMAGES if i != 4])},  # miss
            {"text_id": 103, "image_ids": ranked([7, 6, 5, 9, 8, 2])}]  # hit at 6


def test_cli_t2i_success(tmp_path, capsys):
    code, out, _ = run_cli(capsys, *write_files(tmp_path, t2i_lines()))
    expected = reference_recall({t.text_id: t.image_ids for t in TEXTS},
                                {x["text_id"]: x["image_ids"] for x in t2i_lines()})
    assert code == 0 and out["success"] is True
    assert out["scoreJson"] == {"score": expected["mean_recall"], **expected}
    assert out["score"] == expected["mean_recall"]
    assert (out["scoreJson"]["r1"], out["scoreJson"]["r5"], out["scoreJson"]["r10"]) == (25.0, 50.0, 75.0)
    assert (out["n_queries"], out["n_missing"]) == (4, 0)


def test_cli_i2t_missing_queries_fail_as_in_chinese_clip_or_are_misses_when_allowed(tmp_path, capsys):
    texts = [t.text_id for t in TEXTS] + list(range(200, 210))
    lines = [{"image_id": 1, "text_ids": ranked([103], texts)}, {"image_id": 2, "text_ids": ranked([200, 101], texts)},
             {"image_id": 4, "text_ids": ranked(list(range(200, 210)), texts)}]  # image 3: no prediction
    files = write_files(tmp_path, lines)
    # Chinese-CLIP's evaluation_tr.py: "The following image_ids have no prediction in your submission"
    code, out, _ = run_cli(capsys, *files, "i2t")
    assert code == 1 and out["success"] is False and out["score"] == 0 and out["scoreJson"] == {}
    assert "the following image_ids have no prediction in your submission, please check again: 3 (1 of 4" \
        in out["errorMsg"] and "--allow-missing" in out["errorMsg"]
    code, out, err = run_cli(capsys, *files, "i2t", "--allow-missing")
    gold = {1: [100, 103], 2: [101, 103], 3: [101], 4: [102]}
    expected = reference_recall(gold, {x["image_id"]: x["text_ids"] for x in lines})
    assert code == 0 and out["success"] is True and out["scoreJson"] == {"score": expected["mean_recall"], **expected}
    assert (out["scoreJson"]["r1"], out["scoreJson"]["r5"]) == (25.0, 50.0)
    assert (out["n_queries"], out["n_missing"]) == (4, 1) and "1 of 4 queries have no prediction" in err


def test_cli_t2i_lists_every_query_without_a_prediction(tmp_path, capsys):
    code, out, _ = run_cli(capsys, *write_files(tmp_path, t2i_lines()[1:3]))  # 100 and 103 left out
    assert code == 1 and out["success"] is False
    assert "preds.jsonl: the following text_ids have no prediction in your submission, please check again: " \
           "100, 103 (2 of 4 queries" in out["errorMsg"]
    assert evaluate_retrieval_files(tmp_path / "valid_texts.jsonl", tmp_path / "preds.jsonl", "t2i",
                                    allow_missing=True)["n_missing"] == 2
    code, out, _ = run_cli(capsys, *write_files(tmp_path, []))  # an empty file predicts nothing
    assert code == 1 and "100, 101, 102, 103 (4 of 4 queries" in out["errorMsg"]


@pytest.mark.parametrize("bad_line, message", [
    ({"text_id": 102, "image_ids": [1, 2, 3]}, "preds.jsonl:3: text_id 102 has 3 image_ids; Chinese-CLIP's "
                                               "evaluation requires exactly 10"),
    ({"text_id": 102, "image_ids": ranked([4])[:9] + ["11"]}, 'preds.jsonl:3: text_id 102 has a non-integer id "11" '
                                                              "at rank 10"),
    ({"text_id": 102, "image_ids": ranked([4])[:9] + [4]}, "preds.jsonl:3: text_id 102 ranks 4 more than once"),
    ({"text_id": 100, "image_ids": ranked([2])}, "preds.jsonl:3: text_id 100 already has a prediction on line 1"),
    ({"text_id": 555, "image_ids": ranked([2])}, "preds.jsonl:3: text_id 555 is not a query of the references"),
    ({"text_id": "102", "image_ids": ranked([4])}, 'preds.jsonl:3: "text_id" must be an integer, got "102"'),
    ({"text_id": 102, "image_ids": 4}, 'preds.jsonl:3: text_id 102: "image_ids" must be a list'),
    ('{"text_id": 102, ', "preds.jsonl:3: not valid JSON"),
])
def test_cli_bad_predictions_fail_with_the_line(tmp_path, capsys, bad_line, message):
    lines = t2i_lines()[:2] + [bad_line]
    code, out, _ = run_cli(capsys, *write_files(tmp_path, lines))
    assert code == 1
    assert out["success"] is False and out["score"] == 0 and out["scoreJson"] == {}
    assert message in out["errorMsg"]


def test_cli_i2t_keys_and_bad_texts_file(tmp_path, capsys):
    code, out, _ = run_cli(capsys, *write_files(tmp_path, t2i_lines()), direction="i2t")
    assert code == 1 and '"image_id" must be an integer, got missing' in out["errorMsg"]
    texts, preds = write_files(tmp_path, t2i_lines())
    texts.write_text('{"text_id": 1, "text": "猫", "image_ids": [1]}\nnot json\n', encoding="utf-8")
    code, out, _ = run_cli(capsys, texts, preds)
    assert code == 1 and "valid_texts.jsonl:2" in out["errorMsg"]
    code, out, _ = run_cli(capsys, tmp_path / "missing.jsonl", preds)
    assert code == 1 and "missing.jsonl" in out["errorMsg"]
    tsv.write_texts(texts, TEXTS + [tsv.Text(100, "又一只猫", [5])])
    code, out, _ = run_cli(capsys, texts, preds)
    assert code == 1 and "valid_texts.jsonl: text_id 100 appears twice" in out["errorMsg"]


# --- a gallery smaller than 10 (mmcn's rule: each query then ranks all of it) --------------

SMALL = [tsv.Text(200 + t, f"图{t}", [1 + t % 8]) for t in range(8)] + [tsv.Text(300, "两张", [2, 5])]


def test_a_gallery_under_10_accepts_the_pipelines_own_predictions_and_says_its_size(tmp_path, capsys):
    from mmcn.data.eval_files import write_retrieval_predictions

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(len(SMALL), 8)).astype(np.float32)  # texts x the 8 test images (ids 1..8)
    texts, preds = tmp_path / "test_texts.jsonl", tmp_path / "t2i_predictions.jsonl"
    tsv.write_texts(texts, SMALL)
    # as evaluate@retrieval writes it: min(10, gallery) ids per query
    write_retrieval_predictions(preds, "t2i", {t.text_id: [1 + i for i in topk(scores, min(10, 8))[q]]
                                               for q, t in enumerate(SMALL)})
    code, out, err = run_cli(capsys, texts, preds)
    assert code == 0 and out["success"] is True, out
    assert err == f"note: {out['notes'][0]}\n"
    expected = reference_recall({t.text_id: t.image_ids for t in SMALL},
                                {t.text_id: [1 + i for i in reference_topk(scores[q])] for q, t in enumerate(SMALL)})
    assert out["scoreJson"] == {"score": expected["mean_recall"], **expected} and expected["r10"] == 100.0
    assert out["gallery_images"] == 8
    assert len(out["notes"]) == 1 and out["notes"][0].startswith("the gallery has 8 images: R@10 ranks all of them")
    # i2t over 9 texts: R@10 ranks them all too; 9 ids per query accepted
    lines = [{"image_id": i, "text_ids": [t.text_id for t in SMALL]} for i in range(1, 9)]
    preds.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    code, out, _ = run_cli(capsys, texts, preds, "i2t")
    assert code == 0 and out["gallery_texts"] == 9 and "R@10" in out["notes"][0], out


def test_fewer_than_10_ids_are_refused_unless_they_rank_the_whole_gallery(tmp_path, capsys):
    texts, preds = tmp_path / "test_texts.jsonl", tmp_path / "preds.jsonl"
    tsv.write_texts(texts, SMALL)
    eight = [{"text_id": t.text_id, "image_ids": list(range(1, 9))} for t in SMALL]
    # five of the eight candidates: R@10 would count the three left out as misses
    preds.write_text("".join(json.dumps({**x, "image_ids": x["image_ids"][:5]}) + "\n" for x in eight))
    code, out, _ = run_cli(capsys, texts, preds)
    assert code == 1 and ("preds.jsonl:1: text_id 200 has 5 image_ids; Chinese-CLIP's evaluation requires "
                          "exactly 10 per query, and the gallery has at least 8 images") in out["errorMsg"]
    assert "so 8 are needed (9 such lines" in out["errorMsg"]
    # a gallery of 12 (the texts name 12 images): 8 ids are too few, as in Chinese-CLIP
    tsv.write_texts(texts, SMALL + [tsv.Text(400, "更多", [9, 10, 11, 12])])
    preds.write_text("".join(json.dumps(x) + "\n" for x in eight + [{"text_id": 400, "image_ids": ranked([9])}]))
    code, out, _ = run_cli(capsys, texts, preds)
    assert code == 1 and "has 8 image_ids" in out["errorMsg"] and "at least 12 images" in out["errorMsg"]
    assert "so 10 are needed" in out["errorMsg"]
    # a gallery over 10 (the ids the texts and the predictions name): no note
    code, out, _ = run_cli(capsys, *write_files(tmp_path, t2i_lines()))
    named = {i for t in TEXTS for i in t.image_ids} | {i for x in t2i_lines() for i in x["image_ids"]}
    assert code == 0 and out["gallery_images"] == len(named) == 11 and out["notes"] == []
