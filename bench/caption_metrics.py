"""Benchmark: mmcn's BLEU, ROUGE-L and CIDEr-D against pycocoevalcap 1.2, same tokens, same run.

    python bench/caption_metrics.py [--images 5000] [--refs 5] [--repeat 3] [--seed 0]

Generates Chinese-like captions (characters drawn with a Zipf-like frequency from 3000 CJK
characters, 8-24 characters long; a third of the predictions are edited copies of a
reference), tokenized per character, then times each metric `--repeat` times, interleaved,
and reports the best run of each with the largest absolute difference (corpus and per
image). Tokenization is not timed; mmcn's time includes encoding the tokens.
Goals (issue): CIDEr-D >= 10x, BLEU and ROUGE-L >= 5x faster, max |diff| <= 1e-9.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from mmcn.eval.caption_metrics import BLEU_KEYS, score_captions


def make_captions(n_images: int, n_refs: int, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    chars = np.array([chr(0x4E00 + i) for i in rng.choice(20000, 3000, replace=False)])
    weights = 1.0 / np.arange(1, len(chars) + 1)
    weights /= weights.sum()

    def sentence() -> list[str]:
        return chars[rng.choice(len(chars), rng.integers(8, 25), p=weights)].tolist()

    refs = {i: [sentence() for _ in range(n_refs)] for i in range(n_images)}
    preds = {}
    for i in range(n_images):
        if i % 3 == 0:  # an edited copy of a reference: realistic overlap
            base = list(refs[i][rng.integers(n_refs)])
            for _ in range(rng.integers(1, 5)):
                base[rng.integers(len(base))] = sentence()[0]
            preds[i] = base[: rng.integers(len(base) // 2, len(base) + 1)]
        else:
            preds[i] = sentence()
    return refs, preds


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5, help="references per image")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    refs, preds = make_captions(args.images, args.refs, args.seed)
    gts = {i: [" ".join(r) for r in refs[i]] for i in refs}
    res = {i: [" ".join(preds[i])] for i in refs}
    n_tokens = sum(len(r) for rs in refs.values() for r in rs) + sum(len(p) for p in preds.values())
    print(f"{args.images} images x {args.refs} references, {n_tokens} tokens, best of {args.repeat}")

    def coco_bleu():
        corpus, images = Bleu(4).compute_score(gts, res, verbose=0)
        return {k: (corpus[n], np.array(images[n])) for n, k in enumerate(BLEU_KEYS)}

    def coco_rouge():
        corpus, images = Rouge().compute_score(gts, res)
        return {"ROUGE_L": (corpus, np.array(images))}

    def coco_cider():
        corpus, images = Cider().compute_score(gts, res)
        return {"CIDEr": (corpus, np.array(images))}

    def ours(family: str):
        def run():
            s = score_captions(refs, preds, metrics=(family,))
            return {k: (s.corpus[k], s.per_image[k]) for k in s.corpus}
        return run

    for label, family, theirs, goal in [("CIDEr-D", "CIDEr", coco_cider, 10), ("BLEU-1..4", "Bleu", coco_bleu, 5),
                                        ("ROUGE-L", "ROUGE_L", coco_rouge, 5)]:
        times = {"mmcn": float("inf"), "pycocoevalcap": float("inf")}
        for _ in range(args.repeat):  # interleaved
            t, ours_result = best_time(ours(family), 1)
            times["mmcn"] = min(times["mmcn"], t)
            t, their_result = best_time(theirs, 1)
            times["pycocoevalcap"] = min(times["pycocoevalcap"], t)
        corpus_diff = max(abs(ours_result[k][0] - their_result[k][0]) for k in their_result)
        image_diff = max(float(np.abs(ours_result[k][1] - their_result[k][1]).max()) for k in their_result)
        ratio = times["pycocoevalcap"] / times["mmcn"]
        verdict = "ok" if ratio >= goal and max(corpus_diff, image_diff) <= 1e-9 else "MISSED"
        print(f"{label:<10} mmcn {times['mmcn']:7.3f} s  pycocoevalcap {times['pycocoevalcap']:7.3f} s  "
              f"speed-up {ratio:6.1f}x (goal {goal}x)  max|diff| corpus {corpus_diff:.1e} "
              f"per-image {image_diff:.1e}  {verdict}")


if __name__ == "__main__":
    main()
