"""Caption metrics BLEU-1..4, ROUGE-L and CIDEr-D: pycocoevalcap 1.2's numbers, vectorised with numpy.

Given the same tokens, every score equals pycocoevalcap's ``Bleu(4)``, ``Rouge()`` and
``Cider()`` (which is CIDEr-D) to within 1e-9, per image and for the corpus:

- BLEU: n-gram counts clipped by their maximum count in any one reference; the reference
  length is the closest to the candidate's, ties to the shorter; per image
  ``prod_k((correct_k + 1e-15) / (guess_k + 1e-9)) ** (1/n)`` with the brevity penalty
  ``exp(1 - 1/ratio)`` when ``ratio = (len + 1e-15) / (ref_len + 1e-9) < 1``. The corpus
  score applies the same formula to counts and lengths summed over images (it is not
  the mean of the per-image scores).
- ROUGE-L: LCS-based precision and recall against each reference, their maxima over the
  references taken independently, F with beta = 1.2 (0 when either maximum is 0).
  pycocoevalcap splits on ``" "``, so an empty sentence is one empty token; so here.
- CIDEr-D: tf-idf vectors of 1..4-grams, idf = log(N) - log(max(1, df)) with df counted
  over the N images' reference sets; per reference and order
  ``sum_g min(h_g, r_g) * r_g / (|h| |r|)`` times ``exp(-(len_h - len_r)^2 / (2 sigma^2))``,
  sigma = 6; mean over orders, mean over references, times 10; the corpus score is the
  mean over images.

Tokens come in as lists of strings (see :mod:`mmcn.text.segment`); each token must be
non-empty and free of whitespace, as it is when pycocoevalcap is fed ``" ".join(tokens)``.
Sentences are encoded once into integer arrays and scored with sorts, ``bincount`` and
``reduceat`` over the whole corpus instead of per-sentence dictionaries. N-grams are
numbered order by order (an n-gram is its (n-1)-gram's id followed by a token): BLEU
numbers only the candidates' n-grams, per image; CIDEr-D every n-gram of the corpus. The
LCS of ROUGE-L uses the bit-parallel recurrence of Allison & Dix (1986) / Crochemore et
al. (2001) on uint64 words, for all (candidate, reference) pairs at once.

METEOR and SPICE are not provided: their reference implementations are Java programs.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from mmcn.data.eval_files import (CaptionPrediction, ImageId, format_ids, read_caption_predictions,
                                  read_caption_references)
from mmcn.text.segment import Mode, tokenize

log = logging.getLogger(__name__)

BLEU_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
METRICS = (*BLEU_KEYS, "ROUGE_L", "CIDEr")
FAMILIES = ("Bleu", "ROUGE_L", "CIDEr")  # what ``score_captions(metrics=...)`` selects from
MAX_N = 4  # n-gram orders of BLEU and CIDEr-D
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's BLEU epsilons


@dataclass
class CaptionScores:
    """Scores of a caption set: ``corpus[key]`` and ``per_image[key][i]`` for ``image_ids[i]``."""

    image_ids: list[ImageId]
    corpus: dict[str, float]
    per_image: dict[str, np.ndarray]

    def rows(self) -> list[dict[str, Any]]:
        """One ``{"image_id", <metric>: score, ...}`` dict per image, in ``image_ids`` order."""
        columns = {key: values.tolist() for key, values in self.per_image.items()}
        return [{"image_id": image_id, **{key: col[i] for key, col in columns.items()}}
                for i, image_id in enumerate(self.image_ids)]


class CaptionMatchError(ValueError):
    """Predictions and references do not cover the same images; the message lists which."""


def score_captions(refs: Mapping[ImageId, Sequence[Sequence[str]]], preds: Mapping[ImageId, Sequence[str]],
                   metrics: Collection[str] = FAMILIES, sigma: float = 6.0) -> CaptionScores:
    """Score one tokenized prediction per image against that image's tokenized references.

    ``refs`` and ``preds`` must have the same keys; images are reported in ``refs`` order.
    ``metrics`` picks among ``"Bleu"`` (Bleu_1..4), ``"ROUGE_L"`` and ``"CIDEr"``.
    """
    unknown = set(metrics) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    if refs.keys() != preds.keys():
        only_refs = [i for i in refs if i not in preds]
        only_preds = [i for i in preds if i not in refs]
        raise ValueError(f"refs and preds must have the same image ids: {len(only_refs)} only in refs "
                         f"({format_ids(only_refs)}), {len(only_preds)} only in preds ({format_ids(only_preds)})")
    image_ids = list(refs)
    if not image_ids:
        raise ValueError("no images to score")
    corpus = _Corpus.encode(image_ids, refs, preds)
    scores = CaptionScores(image_ids, {}, {})
    if "Bleu" in metrics:
        corpus_bleu, image_bleu = _bleu(corpus)
        for k, key in enumerate(BLEU_KEYS):
            scores.corpus[key], scores.per_image[key] = float(corpus_bleu[k]), image_bleu[:, k]
    if "ROUGE_L" in metrics:
        image_rouge = _rouge_l(corpus)
        scores.corpus["ROUGE_L"], scores.per_image["ROUGE_L"] = float(image_rouge.mean()), image_rouge
    if "CIDEr" in metrics:
        image_cider = _cider_d(corpus, _NgramCounts.count_corpus(corpus), sigma)
        scores.corpus["CIDEr"], scores.per_image["CIDEr"] = float(image_cider.mean()), image_cider
    return scores


@dataclass
class CaptionEvaluation:
    """The outcome of :func:`evaluate_caption_files`: what the CLI prints, and the scores."""

    summary: dict[str, Any]
    scores: CaptionScores


def evaluate_caption_files(refs_path: Path, preds_path: Path, mode: Mode = "char",
                           allow_partial: bool = False) -> CaptionEvaluation:
    """Read, match, tokenize and score a reference file and a prediction file.

    Every reference image needs exactly one prediction and every prediction a reference
    image; otherwise :class:`CaptionMatchError` lists the offending ids and lines. With
    ``allow_partial`` the images present in both are scored and the summary counts the
    missing references (``n_missing``) and the predictions for unknown images
    (``n_unknown``). Two predictions for one image are an error either way.
    """
    refs = read_caption_references(refs_path)
    all_preds = read_caption_predictions(preds_path)
    preds = match_predictions(refs, all_preds, allow_partial, refs_path, preds_path)
    image_ids = list(preds)
    scores = score_captions({i: [tokenize(c, mode) for c in refs[i]] for i in image_ids},
                            {i: tokenize(preds[i].caption, mode) for i in image_ids})
    n_unknown = sum(1 for p in all_preds if p.image_id not in refs)
    summary = {**{k: scores.corpus[k] for k in METRICS}, "n_images": len(image_ids),
               "n_missing": len(refs) - len(image_ids), "n_unknown": n_unknown, "tokenize": mode}
    return CaptionEvaluation(summary, scores)


def match_predictions(refs: Mapping[ImageId, Sequence[str]], preds: Sequence[CaptionPrediction],
                      allow_partial: bool = False, refs_path: Path | str = "references",
                      preds_path: Path | str = "predictions") -> dict[ImageId, CaptionPrediction]:
    """The prediction of each reference image, in reference order (see :func:`evaluate_caption_files`)."""
    by_id: dict[ImageId, CaptionPrediction] = {}
    duplicates = []
    for pred in preds:
        if pred.image_id in by_id:
            duplicates.append(f"{pred.image_id!r} (lines {by_id[pred.image_id].line} and {pred.line})")
        else:
            by_id[pred.image_id] = pred
    if duplicates:
        raise CaptionMatchError(f"{preds_path}: {len(duplicates)} image(s) have more than one prediction: "
                                f"{format_ids(duplicates)}; keep one caption per image")
    missing = [i for i in refs if i not in by_id]
    unknown = [f"{p.image_id!r} (line {p.line})" for p in by_id.values() if p.image_id not in refs]
    matched = {i: by_id[i] for i in refs if i in by_id}
    if (missing or unknown) and not allow_partial:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of {len(refs)} reference images have no prediction "
                            f"({format_ids(missing)})")
        if unknown:
            problems.append(f"{len(unknown)} predictions are for images not in {refs_path}: {format_ids(unknown)}")
        raise CaptionMatchError(f"{preds_path}: {'; '.join(problems)}. Predict every reference image, or pass "
                                "--allow-partial (allow_partial=True) to score only the images in both files")
    if not matched:
        raise CaptionMatchError(f"{preds_path}: none of its image ids is in {refs_path}; nothing to score "
                                "(do the ids have the same type, e.g. 1 vs \"1\"?)")
    if missing or unknown:
        log.warning("scoring %d of %d reference images (%d without prediction, %d predictions for unknown images)",
                    len(matched), len(refs), len(missing), len(unknown))
    return matched


@dataclass
class _Corpus:
    """Token ids of the references and candidates, flat, with offsets; references grouped by image."""

    vocab_size: int
    hyp_tokens: np.ndarray  # int64, candidates of all images, concatenated
    hyp_starts: np.ndarray  # (n_images + 1,) offsets into hyp_tokens
    ref_tokens: np.ndarray
    ref_starts: np.ndarray  # (n_refs + 1,)
    ref_image: np.ndarray  # (n_refs,) image index of each reference
    image_refs: np.ndarray  # (n_images + 1,) offsets of each image's references

    @classmethod
    def encode(cls, image_ids: list[ImageId], refs: Mapping[ImageId, Sequence[Sequence[str]]],
               preds: Mapping[ImageId, Sequence[str]]) -> "_Corpus":
        vocab: dict[str, int] = {}
        hyps = []
        for i in image_ids:
            if isinstance(preds[i], str):
                raise TypeError(f"prediction of image {i!r} is a string; pass its list of tokens")
            hyps.append(preds[i])
        ref_sents, n_refs = [], []
        for i in image_ids:
            if isinstance(refs[i], str) or not refs[i] or any(isinstance(r, str) for r in refs[i]):
                raise ValueError(f"image {i!r}: references must be a non-empty list of token lists")
            ref_sents.extend(refs[i])
            n_refs.append(len(refs[i]))
        hyp_tokens, hyp_starts = _encode_sentences(hyps, vocab)
        ref_tokens, ref_starts = _encode_sentences(ref_sents, vocab)
        n_refs_arr = np.asarray(n_refs, dtype=np.int64)
        return cls(len(vocab), hyp_tokens, hyp_starts, ref_tokens, ref_starts,
                   np.repeat(np.arange(len(image_ids)), n_refs_arr), _offsets(n_refs_arr))

    @property
    def n_images(self) -> int:
        return len(self.hyp_starts) - 1

    @property
    def hyp_len(self) -> np.ndarray:
        return np.diff(self.hyp_starts)

    @property
    def ref_len(self) -> np.ndarray:
        return np.diff(self.ref_starts)


def _encode_sentences(sentences: Sequence[Sequence[str]], vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (adding new tokens to ``vocab``) and offsets of ``sentences``."""
    lengths = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
    flat = list(itertools.chain.from_iterable(sentences))
    for token in dict.fromkeys(flat):
        vocab.setdefault(token, len(vocab))
    return np.fromiter(map(vocab.__getitem__, flat), dtype=np.int64, count=len(flat)), _offsets(lengths)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


@dataclass
class _NgramCounts:
    """Every (sentence, n-gram, count) of the corpus, n = 1..4, as sparse entries (for CIDEr-D).

    Sentences are laid out image by image, its references then its candidate
    (``ref_sent[r]``, ``hyp_sent[i]``: where reference r and the candidate of image i
    are). N-grams get ids ``0..n_grams-1``, 1-grams first, and the entries are sorted by
    (gram, sentence); so the entries of one n-gram in one image (at most one per
    reference, then at most one of the candidate) are adjacent. ``hyp_count`` is, for
    every entry, the candidate's count of that n-gram in that image (0 if none);
    ``df[g]`` the number of images with g in a reference.
    """

    gram: np.ndarray
    order: np.ndarray  # n - 1
    sent: np.ndarray
    count: np.ndarray
    hyp_count: np.ndarray
    df: np.ndarray
    ref_sent: np.ndarray
    hyp_sent: np.ndarray

    @classmethod
    def count_corpus(cls, c: _Corpus) -> "_NgramCounts":
        n_refs, n_images = len(c.ref_starts) - 1, c.n_images
        ref_sent = np.arange(n_refs) + c.ref_image
        hyp_sent = c.image_refs[1:] + np.arange(n_images)
        tokens, starts = _interleave(c, ref_sent, hyp_sent)
        n_sents = len(starts) - 1
        sent = np.repeat(np.arange(n_sents), np.diff(starts))
        left = _tokens_left(starts)  # an n-gram starts where this is >= n
        shift = n_sents.bit_length()  # occurrence key: n-gram code << shift | sentence
        grams, sents, counts, n_grams = [], [], [], []
        prefix, n_prefixes = np.zeros(len(tokens), dtype=np.int64), 1  # 1-grams: one empty prefix
        for n in range(1, MAX_N + 1):
            # an n-gram's code: the id of its (n-1)-gram prefix, then its last token
            pos = np.flatnonzero(left >= n)
            codes = prefix[pos] * c.vocab_size + tokens[pos + n - 1]
            if (n_prefixes * c.vocab_size).bit_length() + shift > 62:  # keep the keys within int64
                codes = _dense_ids(codes)[1]
            # one sort by (code, sentence) numbers the n-grams and groups their occurrences
            keys = (codes << shift) | sent[pos]
            by_key = np.argsort(keys)
            keys = keys[by_key]
            gram = np.cumsum(np.r_[True, (keys[1:] >> shift) != (keys[:-1] >> shift)]) - 1 if len(keys) else keys
            prefix = np.full(len(tokens), -1, dtype=np.int64)
            prefix[pos[by_key]] = gram
            n_prefixes = int(gram[-1]) + 1 if len(gram) else 0
            first = _group_starts(keys)
            grams.append(gram[first] + sum(n_grams))
            sents.append(keys[first] & ((1 << shift) - 1))
            counts.append(np.diff(np.append(first, len(keys))))
            n_grams.append(n_prefixes)
        gram, s, count = np.concatenate(grams), np.concatenate(sents), np.concatenate(counts)
        is_hyp = np.zeros(n_sents, dtype=bool)
        is_hyp[hyp_sent] = True
        sent_image = np.repeat(np.arange(n_images), np.diff(c.image_refs) + 1)
        groups = _group_starts((gram << shift) | sent_image[s])  # (gram, image)
        sizes = np.diff(np.append(groups, len(gram)))
        last = groups + sizes - 1  # the candidate's entry, if the group has one
        hyp_count = np.repeat(np.where(is_hyp[s[last]], count[last], 0), sizes)
        df = np.bincount(gram[groups][~is_hyp[s[groups]]], minlength=sum(n_grams))  # groups with a reference
        order = np.repeat(np.arange(MAX_N), list(map(len, counts)))
        return cls(gram, order, s, count, hyp_count, df, ref_sent, hyp_sent)


def _interleave(c: _Corpus, ref_sent: np.ndarray, hyp_sent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and offsets of all sentences, reference r at ``ref_sent[r]``, candidate i at ``hyp_sent[i]``."""
    lengths = np.empty(len(ref_sent) + len(hyp_sent), dtype=np.int64)
    lengths[ref_sent], lengths[hyp_sent] = c.ref_len, c.hyp_len
    starts = _offsets(lengths)
    tokens = np.empty(int(starts[-1]), dtype=np.int64)
    for slot, part, part_starts in ((ref_sent, c.ref_tokens, c.ref_starts), (hyp_sent, c.hyp_tokens, c.hyp_starts)):
        tokens[np.arange(len(part)) + np.repeat(starts[slot] - part_starts[:-1], np.diff(part_starts))] = part
    return tokens, starts


def _dense_ids(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` by one sort (numpy 2's ``np.unique`` is slower here)."""
    order = np.argsort(keys)
    sorted_keys = keys[order]
    starts = _group_starts(sorted_keys)
    new = np.zeros(len(keys), dtype=np.int64)
    new[starts] = 1
    ids = np.empty(len(keys), dtype=np.int64)
    ids[order] = np.cumsum(new) - 1
    return sorted_keys[starts], ids


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Indices at which a new value begins in ``sorted_keys``."""
    if not len(sorted_keys):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


def _bleu(c: _Corpus) -> tuple[np.ndarray, np.ndarray]:
    """(corpus Bleu_1..4 (4,), per-image Bleu_1..4 (n_images, 4))."""
    correct = _clipped_matches(c)
    hyp_len = c.hyp_len
    guess = np.maximum(0, hyp_len[:, None] - np.arange(MAX_N)[None, :])
    # closest reference length, ties to the shorter: minimise (|ref - hyp|, ref)
    ref_len = c.ref_len
    span = int(max(ref_len.max(), hyp_len.max())) + 1
    closeness = np.abs(ref_len - hyp_len[c.ref_image]) * span + ref_len
    closest = np.minimum.reduceat(closeness, c.image_refs[:-1]) % span
    per_image = _bleu_formula(correct, guess, hyp_len, closest)
    corpus = _bleu_formula(correct.sum(0)[None], guess.sum(0)[None], hyp_len.sum()[None], closest.sum()[None])[0]
    return corpus, per_image


def _clipped_matches(c: _Corpus) -> np.ndarray:
    """BLEU's matches per image and order, (n_images, 4): candidate n-gram counts clipped by
    the largest count of the n-gram in any one reference of the image.

    Only the candidate's n-grams matter, so ids are given to (image, candidate n-gram)
    pairs, order by order: an n-gram's code is its (n-1)-gram's id (for n = 1, the
    image) followed by its last token. A reference n-gram takes the id of the same code
    in its image's candidate; where there is none, no longer n-gram starting there can
    match either, so reference positions drop out as n grows.
    """
    n_images, n_refs = c.n_images, len(c.ref_starts) - 1
    hyp_left, ref_left = _tokens_left(c.hyp_starts), _tokens_left(c.ref_starts)
    hyp_image = np.repeat(np.arange(n_images), c.hyp_len)  # per candidate token
    ref_sent = np.repeat(np.arange(n_refs), c.ref_len)  # per reference token
    hyp_prefix, ref_prefix = hyp_image, c.ref_image[ref_sent]
    correct = np.zeros((n_images, MAX_N))
    for n in range(1, MAX_N + 1):
        hyp_pos = np.flatnonzero(hyp_left >= n)
        codes, hyp_ids = _dense_ids(hyp_prefix[hyp_pos] * c.vocab_size + c.hyp_tokens[hyp_pos + n - 1])
        id_image = np.zeros(len(codes), dtype=np.int64)
        id_image[hyp_ids] = hyp_image[hyp_pos]
        ref_pos = np.flatnonzero((ref_left >= n) & (ref_prefix >= 0))
        ref_ids = _lookup(codes, np.arange(len(codes)), ref_prefix[ref_pos] * c.vocab_size
                          + c.ref_tokens[ref_pos + n - 1], -1)
        ref_pos, ref_ids = ref_pos[ref_ids >= 0], ref_ids[ref_ids >= 0]
        # count of each id in each reference (key: id, reference), then the maximum over references
        shift = max(n_refs, 1).bit_length()
        occurrences = np.sort((ref_ids << shift) | ref_sent[ref_pos])
        first = _group_starts(occurrences)
        per_ref = np.diff(np.append(first, len(occurrences)))
        ids = occurrences[first] >> shift
        max_in_ref = np.zeros(len(codes), dtype=np.int64)
        groups = _group_starts(ids)
        if len(groups):
            max_in_ref[ids[groups]] = np.maximum.reduceat(per_ref, groups)
        clipped = np.minimum(np.bincount(hyp_ids, minlength=len(codes)), max_in_ref)
        correct[:, n - 1] = np.bincount(id_image, weights=clipped, minlength=n_images)
        hyp_prefix = np.full(len(c.hyp_tokens), -1, dtype=np.int64)
        hyp_prefix[hyp_pos] = hyp_ids
        ref_prefix = np.full(len(c.ref_tokens), -1, dtype=np.int64)
        ref_prefix[ref_pos] = ref_ids
    return correct


def _tokens_left(starts: np.ndarray) -> np.ndarray:
    """For each token, the number of tokens from it to the end of its sentence (itself included)."""
    lengths = np.diff(starts)
    return np.repeat(starts[1:], lengths) - np.arange(int(starts[-1]))


def _bleu_formula(correct: np.ndarray, guess: np.ndarray, test_len: np.ndarray, ref_len: np.ndarray) -> np.ndarray:
    """pycocoevalcap's BLEU from clipped counts (rows, 4), guesses (rows, 4) and lengths (rows,)."""
    precision_product = np.cumprod((correct + _TINY) / (guess + _SMALL), axis=1)
    bleu = precision_product ** (1.0 / np.arange(1, MAX_N + 1))
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    with np.errstate(over="ignore"):
        brevity = np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)
    return bleu * brevity[:, None]


def _rouge_l(c: _Corpus, beta: float = 1.2) -> np.ndarray:
    """Per-image ROUGE-L."""
    empty = c.vocab_size  # the token of an empty sentence
    hyp_tokens, hyp_starts = _empty_as_one_token(c.hyp_tokens, c.hyp_starts, empty)
    ref_tokens, ref_starts = _empty_as_one_token(c.ref_tokens, c.ref_starts, empty)
    lcs = _lcs_lengths(hyp_tokens, hyp_starts, ref_tokens, ref_starts, c.ref_image, c.vocab_size + 1)
    precision = lcs / np.diff(hyp_starts)[c.ref_image]
    recall = lcs / np.diff(ref_starts)
    p = np.maximum.reduceat(precision, c.image_refs[:-1])
    r = np.maximum.reduceat(recall, c.image_refs[:-1])
    b2 = beta ** 2
    nonzero = (p != 0) & (r != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(nonzero, ((1 + b2) * p * r) / (r + b2 * p), 0.0)


def _empty_as_one_token(tokens: np.ndarray, starts: np.ndarray, empty: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.diff(starts)
    if lengths.all():
        return tokens, starts
    new_starts = _offsets(np.maximum(lengths, 1))
    out = np.full(int(new_starts[-1]), empty, dtype=np.int64)
    out[np.arange(len(tokens)) + np.repeat(new_starts[:-1] - starts[:-1], lengths)] = tokens
    return out, new_starts


def _lcs_lengths(a_tokens: np.ndarray, a_starts: np.ndarray, b_tokens: np.ndarray, b_starts: np.ndarray,
                 b_to_a: np.ndarray, vocab_size: int) -> np.ndarray:
    """LCS length of each sentence b with sentence ``a[b_to_a[b]]`` (a sentences non-empty).

    Bit-parallel: a's positions are the bits of ``words`` uint64s, V starts all ones, and
    for each token of b with match mask M: ``V = (V + (V & M)) | (V & ~M)``; the LCS
    length is the number of zero bits left. Bits above a's length stay 1 (their M bit is
    0), so they never count. Pairs are grouped by word count and run together, the
    longest b first so that the pairs still running are always a prefix.
    """
    a_len = np.diff(a_starts)
    words = (a_len + 63) // 64
    out = np.zeros(len(b_to_a), dtype=np.int64)
    pair_words = words[b_to_a]
    for w in np.unique(pair_words):
        pairs = np.flatnonzero(pair_words == w)
        out[pairs] = _lcs_group(a_tokens, a_starts, b_tokens, b_starts, b_to_a[pairs], pairs, int(w), vocab_size)
    return out


def _lcs_group(a_tokens: np.ndarray, a_starts: np.ndarray, b_tokens: np.ndarray, b_starts: np.ndarray,
               pair_a: np.ndarray, pair_b: np.ndarray, words: int, vocab_size: int) -> np.ndarray:
    # match masks, one row per distinct (a sentence, token); the last row matches nothing
    a_ids = np.flatnonzero(np.bincount(pair_a))
    a_len = a_starts[a_ids + 1] - a_starts[a_ids]
    a_pos = np.arange(int(a_len.sum())) - np.repeat(_offsets(a_len)[:-1], a_len)
    a_of_token = np.repeat(a_ids, a_len)
    keys = a_of_token * vocab_size + a_tokens[a_starts[a_of_token] + a_pos]
    mask_keys, mask_row = _dense_ids(keys)
    masks = np.zeros((len(mask_keys) + 1, words), dtype=np.uint64)
    np.bitwise_or.at(masks, (mask_row, a_pos // 64), np.left_shift(np.uint64(1), (a_pos % 64).astype(np.uint64)))
    # b sentences, longest first
    b_len = b_starts[pair_b + 1] - b_starts[pair_b]
    by_len = np.argsort(-b_len)
    b_len, pair_a, pair_b = b_len[by_len], pair_a[by_len], pair_b[by_len]
    b_of_token = np.repeat(np.arange(len(pair_b)), b_len)
    local_starts = _offsets(b_len)
    b_pos = np.arange(int(b_len.sum())) - local_starts[b_of_token]
    token_keys = pair_a[b_of_token] * vocab_size + b_tokens[b_starts[pair_b][b_of_token] + b_pos]
    token_row = _lookup(mask_keys, np.arange(len(mask_keys)), token_keys, len(mask_keys))
    v = np.full((len(pair_b), words), np.iinfo(np.uint64).max, dtype=np.uint64)
    running = np.searchsorted(-b_len, -np.arange(int(b_len.max(initial=0))), side="left")  # pairs with len > t
    for t, n in enumerate(running):
        m = masks[token_row[local_starts[:n] + t]]
        vt = v[:n]
        u = vt & m
        v[:n] = _add(vt, u) | (vt & ~m)
    lcs = np.empty(len(pair_b), dtype=np.int64)
    lcs[by_len] = words * 64 - _popcount(v)
    return lcs


def _popcount(v: np.ndarray) -> np.ndarray:
    """Set bits per row of a (rows, words) uint64 array."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(v).sum(axis=1, dtype=np.int64)
    return np.unpackbits(v.view(np.uint8), axis=1).sum(axis=1, dtype=np.int64)


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, keys: np.ndarray, missing: float | int) -> np.ndarray:
    """``values[j]`` where ``sorted_keys[j] == key``, for each of ``keys``; ``missing`` where absent."""
    if not len(sorted_keys):
        return np.full(len(keys), missing, dtype=values.dtype)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == keys, values[pos], missing)


def _add(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(rows, words) little-endian multi-word unsigned addition, the final carry dropped."""
    if x.shape[1] == 1:
        return x + y
    out = np.empty_like(x)
    carry = np.zeros(len(x), dtype=np.uint64)
    for w in range(x.shape[1]):
        s = x[:, w] + y[:, w]
        s_carry = s + carry
        out[:, w] = s_carry
        carry = ((s < x[:, w]) | (s_carry < s)).astype(np.uint64)
    return out


def _cider_d(c: _Corpus, ng: _NgramCounts, sigma: float) -> np.ndarray:
    """Per-image CIDEr-D."""
    n_images, n_sents = c.n_images, len(ng.ref_sent) + len(ng.hyp_sent)
    idf = np.log(float(n_images)) - np.log(np.maximum(1.0, ng.df))
    weight = idf[ng.gram]
    vec = ng.count * weight  # the tf-idf value of each entry
    slot = ng.sent * MAX_N + ng.order  # (sentence, order)
    norm = np.sqrt(np.bincount(slot, weights=vec ** 2, minlength=n_sents * MAX_N)).reshape(-1, MAX_N)
    # clipped dot product with the candidate: sum over the n-grams of min(candidate, reference) * reference
    # (the rows of the candidates themselves get junk, unused)
    shared = np.minimum(ng.hyp_count * weight, vec) * vec
    dot = np.bincount(slot, weights=shared, minlength=n_sents * MAX_N).reshape(-1, MAX_N)[ng.ref_sent]
    hyp_norm, ref_norm = norm[ng.hyp_sent][c.ref_image], norm[ng.ref_sent]
    sim = np.divide(dot, hyp_norm * ref_norm, out=dot, where=(hyp_norm != 0) & (ref_norm != 0))
    delta = (c.hyp_len[c.ref_image] - c.ref_len).astype(np.float64)
    sim *= np.exp(-(delta ** 2) / (2 * sigma ** 2))[:, None]
    per_image = np.add.reduceat(sim, c.image_refs[:-1], axis=0)
    return per_image.mean(axis=1) / np.diff(c.image_refs) * 10.0
