"""Benchmark: mmcn's recall from a score matrix against Chinese-CLIP's query-at-a-time method.

    python bench/retrieval.py [--queries 5000] [--items 25000] [--gold 5] [--baseline-queries 500]

Random float32 scores (gold items get a boost, so recall is neither 0 nor 100) with
`--gold` gold items per query. mmcn: `recall_at_k` on the whole matrix (and `topk`, k=10,
for the prediction files). Chinese-CLIP: per query, a list of (id, score) tuples sorted
with `sorted(..., reverse=True)` to its top 10 (make_topk_predictions.py), then the
any-gold-in-top-k loop (evaluation.py). That method takes ~15 ms a query here, so it is
timed on `--baseline-queries` queries and its time for all queries extrapolated linearly;
the hits of those queries are checked against mmcn's.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from mmcn.eval.retrieval_metrics import gold_ranks, recall_at_k, topk


def chinese_clip_hits(scores: np.ndarray, gold: list[set[int]], ks=(1, 5, 10)) -> np.ndarray:
    """(n_queries, len(ks)) hits, one query at a time, as Chinese-CLIP does."""
    hits = np.zeros((len(scores), len(ks)), dtype=bool)
    for q, row in enumerate(scores):
        score_tuples = list(zip(range(len(row)), row.tolist()))
        top10 = [i for i, _ in sorted(score_tuples, key=lambda x: x[1], reverse=True)[:10]]
        for j, k in enumerate(ks):
            hits[q, j] = any([idx in top10[:k] for idx in gold[q]])
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--items", type=int, default=25000)
    parser.add_argument("--gold", type=int, default=5, help="gold items per query")
    parser.add_argument("--baseline-queries", type=int, default=500, help="queries timed with Chinese-CLIP's method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    scores = rng.standard_normal((args.queries, args.items), dtype=np.float32)
    gold = [set(rng.choice(args.items, args.gold, replace=False).tolist()) for _ in range(args.queries)]
    for q, items in enumerate(gold):
        scores[q, list(items)] += 2.5
    print(f"{args.queries} queries x {args.items} items (float32, {scores.nbytes / 2**20:.0f} MiB), "
          f"{args.gold} gold per query")

    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        recalls = recall_at_k(scores, gold)
        best = min(best, time.perf_counter() - t0)
    t0 = time.perf_counter()
    topk(scores, 10)
    t_topk = time.perf_counter() - t0

    n = min(args.baseline_queries, args.queries)
    t0 = time.perf_counter()
    hits = chinese_clip_hits(scores[:n], gold[:n])
    t_base = (time.perf_counter() - t0) * args.queries / n
    ranks = gold_ranks(scores[:n], gold[:n])
    same = bool((hits == (ranks[:, None] < np.array([1, 5, 10]))).all())

    print(f"mmcn recall_at_k   {best:7.3f} s  ({', '.join(f'{k} {v:.2f}' for k, v in recalls.items())})")
    print(f"mmcn topk(k=10)    {t_topk:7.3f} s")
    measured = "all queries" if n == args.queries else f"extrapolated from {n} queries"
    print(f"Chinese-CLIP loop  {t_base:7.1f} s  ({measured})")
    print(f"speed-up {t_base / best:.0f}x; hits identical on the {n} baseline queries: {same}")


if __name__ == "__main__":
    main()
