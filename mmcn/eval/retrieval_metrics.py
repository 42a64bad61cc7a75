"""Retrieval recall R@1/5/10 and mean recall, as Chinese-CLIP's ``evaluation.py`` / ``evaluation_tr.py`` compute them.

A query hits at k when ANY of its gold ids is among its top k; R@k is hits over ALL the
queries of the references (a query without gold ids is a miss); a predictions file that
leaves out a reference query is an error, as in Chinese-CLIP ("The following text_ids have
no prediction in your submission"), unless ``allow_missing``, which counts it as a miss;
mean recall = (R@1 + R@5 + R@10) / 3; everything in percent, computed in the same
order of float operations as Chinese-CLIP. Each query ranks exactly 10 candidates, as
Chinese-CLIP requires, except where the gallery has fewer than 10 (mmcn's own rule; Chinese-
CLIP's would refuse a small test split's predictions): then each query ranks all of them.
The gallery is every candidate the files name: the image ids of the texts file and of the
predictions (t2i), the text ids of the texts file and of the predictions (i2t). The result
states its size (``gallery_images`` / ``gallery_texts``) and ``notes`` say which R@k rank
the whole gallery (R@10 of 8 images is 100 for every query with gold: no information). Text-to-image queries are the texts of the
texts file; image-to-text queries are the images named in some text's ``image_ids``
(Chinese-CLIP's ``transform_ir_annotation_to_tr.py``), each with the texts naming it.

From a score matrix, items are ranked by score, highest first, and on equal scores the
lower column index first: the order of Chinese-CLIP's ``make_topk_predictions.py`` (a
stable ``sorted(..., reverse=True)`` over the items in file order). Recall does not sort:
a query's best gold item (highest score, lowest index) has rank
``#{score > s} + #{score == s, index < its index}``, and hits at k iff that rank < k;
rows are processed in batches, so no copy of the whole matrix is made.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from mmcn.data import tsv
from mmcn.data.eval_files import (RETRIEVAL_KEYS, TOP_K, Direction, EvalFileError, RetrievalPrediction,
                                  format_ids, read_retrieval_predictions)

KS = (1, 5, 10)
NEVER = np.iinfo(np.int64).max  # the rank of a query that cannot hit
_BATCH_ELEMENTS = 1 << 22  # score elements per batch of rows


def recall_at_k(scores: Any, gold: Sequence[Collection[int]], ks: Sequence[int] = KS,
                batch_rows: int | None = None) -> dict[str, float]:
    """``{"r1", "r5", "r10", "mean_recall"}`` in percent for a ``[n_queries, n_items]`` score matrix.

    ``scores``: numpy array or torch tensor (any device; rows are moved to the CPU a batch
    at a time). ``gold[q]``: the column indices that count as hits for query q.
    """
    return recalls_from_ranks(gold_ranks(scores, gold, batch_rows), ks)


def retrieval_scores(text_image_scores: Any, text_gold: Sequence[Collection[int]], ks: Sequence[int] = KS,
                     batch_rows: int | None = None) -> dict[str, Any]:
    """Both directions from one ``[n_texts, n_images]`` matrix: ``{"t2i": {...}, "i2t": {...}, "mean_recall"}``.

    Image-to-text queries are the images that are gold for at least one text.
    """
    n_images = text_image_scores.shape[1]
    image_gold: list[list[int]] = [[] for _ in range(n_images)]
    for t, images in enumerate(text_gold):
        for i in images:
            image_gold[i].append(t)
    queries = np.array([i for i in range(n_images) if image_gold[i]], dtype=np.int64)
    t2i = recall_at_k(text_image_scores, text_gold, ks, batch_rows)
    i2t = recalls_from_ranks(gold_ranks(text_image_scores.T, image_gold, batch_rows)[queries], ks)
    return {"t2i": t2i, "i2t": i2t, "mean_recall": (t2i["mean_recall"] + i2t["mean_recall"]) / 2}


def gold_ranks(scores: Any, gold: Sequence[Collection[int]], batch_rows: int | None = None) -> np.ndarray:
    """Per query, the 0-based rank of its best-ranked gold item (:data:`NEVER` without gold)."""
    n_queries, n_items = scores.shape
    if len(gold) != n_queries:
        raise ValueError(f"gold has {len(gold)} entries for {n_queries} score rows; give one set per query")
    gold_query = np.repeat(np.arange(n_queries), [len(g) for g in gold])
    gold_item = np.fromiter(itertools.chain.from_iterable(gold), dtype=np.int64, count=len(gold_query))
    bad = (gold_item < 0) | (gold_item >= n_items)
    if bad.any():
        q = int(gold_query[bad][0])
        raise ValueError(f"query {q}: gold index {int(gold_item[bad][0])} is outside the {n_items} score columns")
    ranks = np.full(n_queries, NEVER, dtype=np.int64)
    for b0, rows in _row_batches(scores, batch_rows):
        lo, hi = np.searchsorted(gold_query, [b0, b0 + len(rows)])
        if lo == hi:
            continue
        q, item = gold_query[lo:hi] - b0, gold_item[lo:hi]
        s = rows[q, item]
        # best gold per query: highest score, then lowest index
        best = np.lexsort((item, -s.astype(np.float64), q))
        best = best[np.r_[True, q[best][1:] != q[best][:-1]]]
        q, item, s = q[best], item[best], s[best]
        sub = rows[q]
        greater = np.count_nonzero(sub > s[:, None], axis=1)
        equal = sub == s[:, None]
        ties_before = np.zeros(len(q), dtype=np.int64)
        for j in np.flatnonzero(np.count_nonzero(equal, axis=1) > 1):
            ties_before[j] = np.count_nonzero(equal[j, : item[j]])
        ranks[b0 + q] = greater + ties_before
    return ranks


def topk(scores: Any, k: int, batch_rows: int | None = None) -> np.ndarray:
    """``[n_queries, k]`` column indices, best first; equal scores: lower index first."""
    n_queries, n_items = scores.shape
    if not 0 < k <= n_items:
        raise ValueError(f"k={k} must be between 1 and the number of columns ({n_items})")
    out = np.empty((n_queries, k), dtype=np.int64)
    for b0, rows in _row_batches(scores, batch_rows):
        kth = np.partition(rows, n_items - k, axis=1)[:, n_items - k, None]  # k-th largest per row
        take = rows > kth
        need = k - np.count_nonzero(take, axis=1)  # how many of the entries equal to kth to keep
        equal = rows == kth
        n_equal = np.count_nonzero(equal, axis=1)
        take[n_equal == need] |= equal[n_equal == need]
        for j in np.flatnonzero(n_equal > need):  # ties at the cut: the lowest indices
            take[j, np.flatnonzero(equal[j])[: need[j]]] = True
        cols = np.nonzero(take)[1].reshape(len(rows), k)
        vals = np.take_along_axis(rows, cols, axis=1).astype(np.float64)
        out[b0: b0 + len(rows)] = np.take_along_axis(cols, np.argsort(-vals, axis=1, kind="stable"), axis=1)
    return out


def recalls_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """R@k (percent) for each k and their mean, from best-gold ranks; Chinese-CLIP's arithmetic."""
    n = len(ranks)
    if n == 0:
        raise ValueError("no queries: recall is undefined")
    fractions = [int(np.count_nonzero(ranks < k)) * 1.0 / n for k in ks]
    mean = sum(fractions) / float(len(fractions))
    return {**{f"r{k}": f * 100 for k, f in zip(ks, fractions)}, "mean_recall": mean * 100}


def gold_from_texts(texts: Sequence[tsv.Text], direction: Direction) -> dict[int, set[int]]:
    """Queries and their gold ids, in file order: texts -> image ids (t2i) or images -> text ids (i2t)."""
    seen: set[int] = set()
    for t in texts:
        if t.text_id in seen:
            raise ValueError(f"text_id {t.text_id} appears twice in the texts file; text ids must be unique")
        seen.add(t.text_id)
    if direction == "t2i":
        return {t.text_id: set(t.image_ids) for t in texts}
    if direction != "i2t":
        raise ValueError(f"direction must be t2i or i2t, not {direction!r}")
    gold: dict[int, set[int]] = {}
    for t in texts:
        for image_id in t.image_ids:
            gold.setdefault(image_id, set()).add(t.text_id)
    return gold


GALLERY_KEYS = {"t2i": ("gallery_images", "images"), "i2t": ("gallery_texts", "texts")}


def gallery_notes(size: int, noun: str, ks: Sequence[int] = KS) -> list[str]:
    """What a recall means little with a gallery of ``size`` ``noun``: the R@k whose k covers it all."""
    trivial = [f"R@{k}" for k in ks if k >= size]
    if not trivial:
        return []
    return [f"the gallery has {size} {noun}: {', '.join(trivial)} rank{'s' if len(trivial) == 1 else ''} all of "
            f"them, so {'it is' if len(trivial) == 1 else 'they are'} 100 for every query with a gold item and "
            "say nothing about the model; use a larger test split"]


def evaluate_predictions(gold: Mapping[int, Collection[int]], predictions: Mapping[int, RetrievalPrediction],
                         direction: Direction = "t2i", source: str | Path = "predictions",
                         allow_missing: bool = False, candidates: Collection[int] = ()) -> dict[str, Any]:
    """Recall of top-10 predictions against ``gold`` plus ``n_queries``, ``n_missing``, the
    gallery's size (``gallery_images`` / ``gallery_texts``) and ``notes``.

    A prediction for a query that is not in ``gold`` is an error naming its line in ``source``;
    so is a query of ``gold`` without a prediction (listing them all, as Chinese-CLIP's
    ``evaluation.py`` / ``evaluation_tr.py`` do) unless ``allow_missing``: then it is a miss.
    The gallery: ``candidates`` plus every id of ``gold`` and of the predictions; a prediction
    with fewer than 10 ids is an error unless it ranks the whole gallery of fewer than 10.
    """
    query_key, ids_key = RETRIEVAL_KEYS[direction]
    gallery = set(candidates).union(*gold.values(), *(p.ranked_ids for p in predictions.values()))
    need = min(TOP_K, len(gallery))
    short = [p for p in predictions.values() if len(p.ranked_ids) < need]
    if short:
        p = short[0]
        raise EvalFileError(f"{source}:{p.line}: {query_key} {p.query_id} has {len(p.ranked_ids)} {ids_key}; "
                            f"Chinese-CLIP's evaluation requires exactly {TOP_K} per query, and the gallery has at "
                            f"least {len(gallery)} {GALLERY_KEYS[direction][1]} (the ids in the texts file and the "
                            f"predictions), so {need} are needed ({len(short)} such lines: "
                            f"{format_ids([f'{q.query_id} (line {q.line})' for q in short])})")
    unknown = [p for q, p in predictions.items() if q not in gold]
    if unknown:
        raise EvalFileError(f"{source}:{unknown[0].line}: {query_key} {unknown[0].query_id} is not a query of the "
                            f"references ({len(unknown)} such lines: "
                            f"{format_ids([f'{p.query_id} (line {p.line})' for p in unknown])}); "
                            "predict the reference queries only")
    missing = [q for q in gold if q not in predictions]
    if missing and not allow_missing:
        raise EvalFileError(f"{source}: the following {query_key}s have no prediction in your submission, please check "
                            f"again: {format_ids(missing, limit=100)} ({len(missing)} of {len(gold)} queries; as in "
                            "Chinese-CLIP's evaluation, every reference query needs a prediction; --allow-missing "
                            "scores them as misses instead)")
    ranks = np.array([_first_hit(predictions[q].ranked_ids, g) if q in predictions else NEVER
                      for q, g in gold.items()], dtype=np.int64)
    key, noun = GALLERY_KEYS[direction]
    return {**recalls_from_ranks(ranks, KS), "n_queries": len(gold), "n_missing": len(missing),
            key: len(gallery), "notes": gallery_notes(len(gallery), noun)}


def _first_hit(ranked: Sequence[int], gold: Collection[int]) -> int:
    return next((rank for rank, item in enumerate(ranked) if item in gold), NEVER)


def evaluate_retrieval_files(texts_path: Path, predictions_path: Path, direction: Direction = "t2i",
                             allow_missing: bool = False) -> dict[str, Any]:
    """Chinese-CLIP's result JSON for a texts file and a predictions file; never raises on bad input.
    A reference query without a prediction fails the file (listing them) unless
    ``allow_missing`` (then it counts as a miss and ``n_missing`` says how many).

    Success: ``{"success": true, "score", "scoreJson": {"score", "mean_recall", "r1", "r5",
    "r10"}, "n_queries", "n_missing", "gallery_images" (t2i) or "gallery_texts" (i2t),
    "notes"}``; failure: ``{"success": false, "score": 0, "scoreJson": {}, "errorMsg",
    "errorDetail"}`` with the file, line and query named. Fewer than 10 ids per query: only
    when they rank the whole gallery (module docstring).
    """
    try:
        texts = tsv.read_texts(texts_path)
        try:
            gold = gold_from_texts(texts, direction)
        except ValueError as e:
            raise EvalFileError(f"{texts_path}: {e}") from None
        predictions = read_retrieval_predictions(predictions_path, direction, TOP_K, fewer=True)
        candidates = [i for t in texts for i in t.image_ids] if direction == "t2i" else [t.text_id for t in texts]
        result = evaluate_predictions(gold, predictions, direction, predictions_path, allow_missing, candidates)
    except (ValueError, OSError) as e:  # EvalFileError is a ValueError
        message = str(e)
        return {"success": False, "score": 0, "scoreJson": {}, "errorMsg": message, "errorDetail": message}
    mean = result["mean_recall"]
    return {"success": True, "score": mean,
            "scoreJson": {"score": mean, "mean_recall": mean, "r1": result["r1"], "r5": result["r5"],
                          "r10": result["r10"]},
            "n_queries": result["n_queries"], "n_missing": result["n_missing"],
            **{k: result[k] for k in (GALLERY_KEYS[direction][0], "notes")}}


def _row_batches(scores: Any, batch_rows: int | None):
    """``(first_row, rows as a numpy array)`` batches of a numpy array or torch tensor; rejects NaN."""
    n_queries, n_items = scores.shape
    step = batch_rows or max(1, _BATCH_ELEMENTS // max(n_items, 1))
    for b0 in range(0, n_queries, step):
        rows = scores[b0: b0 + step]
        if not isinstance(rows, np.ndarray):  # a torch tensor
            rows = rows.detach().cpu()
            rows = (rows.float() if str(rows.dtype) == "torch.bfloat16" else rows).numpy()
        if rows.dtype.kind == "f" and np.isnan(rows).any():
            raise ValueError(f"scores rows {b0}..{b0 + len(rows) - 1} contain NaN; rankings would be undefined")
        yield b0, rows
