"""Evaluation of trained models on an LMDB split, model work spread over a Ray Data actor
pool (one GPU per actor when asked for, CPU otherwise):

* captions: generate one caption per image (greedy or beam search), score BLEU-1..4,
  ROUGE-L and CIDEr-D against the references (pycocoevalcap's numbers, Chinese char or
  jieba tokens), next to a baseline: the most frequent training caption for every image;
* retrieval: dual-encoder scores of every text against every image, both directions,
  optionally re-ranked by the cross-encoder on each query's top k, or, for a model without
  a dual encoder (Oscar's retrieval checkpoints), the cross-encoder's score of every
  (text, image) pair; Chinese-CLIP's recall, next to the expected recall of a random ranking.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mmcn.data.eval_files import (feature_paths, write_caption_predictions, write_caption_scores, write_features,
                                   write_retrieval_predictions)
from mmcn.data.lmdb_store import LmdbStore
from mmcn.eval.caption_metrics import METRICS, score_captions
from mmcn.eval.retrieval_metrics import KS, gallery_notes, gold_ranks, recalls_from_ranks, topk
from mmcn.logs import Progress
from mmcn.text.segment import tokenize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 32
    workers: int = 1              # Ray Data model actors
    use_gpu: bool = False         # one GPU per actor
    # captioning
    num_beams: int = 3
    max_length: int = 30
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    decoding: str = "mmcn"        # mmcn | oscar (Oscar's beam search and length rules: regions.inference.Decoding)
    tokenize: str = "char"        # char | jieba
    # retrieval
    rerank_k: int = 10            # cross-encoder re-ranking of each query's top k (0: off)

    def __post_init__(self) -> None:
        """Ranges and choices; messages start with the field (``mmcn.settings`` names the param)."""
        for name, choices in (("decoding", ("mmcn", "oscar")), ("tokenize", ("char", "jieba"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("batch_size", "workers", "num_beams", "max_length"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        for name in ("no_repeat_ngram_size", "rerank_k"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0 (0: off), got {getattr(self, name)!r}")
        if not abs(self.length_penalty) < float("inf"):
            raise ValueError(f"length_penalty: must be a finite number, got {self.length_penalty!r}")


class ModelActor:
    """A Ray Data actor holding one model and the split's data, as the model's family gives
    them (its ``eval_worker``, :mod:`mmcn.models.factory`); ``mode`` picks the job: ``caption``
    (a generator), ``embed`` (a dual encoder), ``match`` (a cross-encoder)."""

    def __init__(self, model_dir: str, store_path: str, cfg: dict, mode: str):
        from transformers.utils import logging as hf_logging

        from mmcn.models.factory import family
        from mmcn.models.runtime import pick_device

        hf_logging.disable_progress_bar()  # this actor's process: a "Loading weights" bar per load says nothing
        task = model_task(model_dir)
        self.cfg, self.mode = eval_config(task)(**cfg), mode
        device = pick_device("auto" if self.cfg.use_gpu else "cpu")
        self.data, self.worker = family(task).eval_worker(mode, model_dir, store_path, self.cfg, device)

    def __call__(self, batch: dict) -> dict:
        return getattr(self, self.mode)(batch)

    def caption(self, batch: dict) -> dict:
        captions, scores = self.worker([self.data[int(i)] for i in batch["index"]])
        return {"index": batch["index"], "caption": np.array(captions, dtype=object),
                "score": np.array(scores, dtype=np.float32)}

    def embed(self, batch: dict) -> dict:
        """Dual-encoder embeddings of texts (``index`` < 0: text ``-index - 1``) and images."""
        index = np.asarray(batch["index"])
        out = np.zeros((len(index), self.worker.dim), np.float32)
        texts, images = np.flatnonzero(index < 0), np.flatnonzero(index >= 0)
        if len(texts):
            out[texts] = self.worker.texts([self.data.text(int(-index[k] - 1))["text"] for k in texts])
        if len(images):
            out[images] = self.worker.images([self.data.image(int(index[k])) for k in images])
        return {"index": index, "embedding": list(out)}

    def match(self, batch: dict) -> dict:
        items = [{**self.data.text(int(t)), **self.data.image(int(i))} for t, i in zip(batch["text"], batch["image"])]
        return {"text": batch["text"], "image": batch["image"], "score": self.worker.match(items)}


def model_task(model_dir: Path | str) -> str:
    """The task of a model folder (:func:`mmcn.models.factory.saved_task`; an Oscar folder, which
    has no mmcn model_type, counts as the region family's ``caption``/``retrieval``: ``caption``)."""
    from mmcn.models.factory import saved_task

    return saved_task(model_dir) or "caption"


def is_clip(model_dir: Path | str) -> bool:
    """A Chinese-CLIP folder (task clip), by its config's model_type."""
    return model_task(model_dir) == "clip"


def eval_config(task: str) -> type:
    """The evaluation settings class of ``task``: its family's own (``EVAL_CONFIGS``: clipcap's
    decoding) or :class:`EvalConfig`."""
    from mmcn.models.factory import family

    return family(task).EVAL_CONFIGS.get(task, EvalConfig)


def _pool(model_dir: Path, store_path: Path, cfg: EvalConfig, mode: str, ds):
    """The Ray dataset ``ds`` mapped through a pool of ``cfg.workers`` :class:`ModelActor`
    (``cfg.batch_size`` rows per call)."""
    import ray

    return ds.map_batches(
        ModelActor, batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        num_gpus=1 if cfg.use_gpu else 0, num_cpus=1,
        fn_constructor_kwargs={"model_dir": str(model_dir), "store_path": str(store_path), "cfg": asdict(cfg),
                               "mode": mode})


def _run(model_dir: Path, store_path: Path, cfg: EvalConfig, mode: str, rows: list[dict]) -> list[dict]:
    """``rows`` through a pool of ``cfg.workers`` :class:`ModelActor`; results in input order."""
    import ray

    key = "index" if "index" in rows[0] else None
    out = []
    with Progress(len(rows), f"{mode} {store_path.name}", "item", log, warmup=True) as bar:  # rate: from the 1st
        for row in _pool(model_dir, store_path, cfg, mode, ray.data.from_items(rows)).iter_rows():
            out.append(row)
            bar.update()
    if key:
        out.sort(key=lambda r: r[key])
    return out


def most_frequent_caption(store: LmdbStore) -> str:
    """The training caption paired with the most images (ties: the first in store order)."""
    counts = Counter(store.pair_positions[:, 0].tolist())  # text position -> its images
    return store.text_str(counts.most_common(1)[0][0])


def caption_warnings(captions: dict[int, str], task: str = "caption") -> list[str]:
    """What a caption model's output says about the model itself: more than half of the
    captions empty, or one caption for more than half of the images (it ignores them).
    ``task``: caption (reads region features) | clipcap (reads CLIP image embeddings)."""
    inputs = "CLIP image embeddings (models/clip: train@clip's valid recall)" if task == "clipcap" else \
        "region features"
    n = len(captions)
    empty = sum(1 for c in captions.values() if not c.strip())
    out = []
    if empty * 2 > n:
        out.append(f"{empty} of {n} generated captions are empty: the model has learnt (almost) nothing to say; look "
                   f"at its training loss (metrics/train_{task}.json), train longer or on more captions")
    same = Counter(c for c in captions.values() if c.strip()).most_common(1)
    if same and same[0][1] * 2 > n:
        out.append(f"one caption, {same[0][0]!r}, was generated for {same[0][1]} of {n} images: the model ignores the "
                   "images (it learnt the most likely caption only); train longer or on more captions, and check "
                   f"that the {inputs} differ between images")
    return out


def evaluate_clipcap(model_dir: Path, lmdb_dir: Path, out_dir: Path, cfg=None, split: str = "test") -> dict:
    """A ClipCap model's captions of ``split`` (its CLIP on the stored image bytes), scored and
    written as :func:`evaluate_captions` does for the Oscar-style model (same metric keys);
    ``cfg``: a :class:`mmcn.models.pixels.clipcap.ClipCapEvalConfig` (None: its defaults)."""
    return evaluate_captions(model_dir, lmdb_dir, out_dir, cfg or eval_config("clipcap")(), split)


def evaluate_captions(model_dir: Path, lmdb_dir: Path, out_dir: Path,
                      cfg=EvalConfig(), split: str = "test") -> dict:
    """Caption every image of ``split``, score against its references; writes
    ``predictions.jsonl`` and ``per_image.jsonl`` into ``out_dir``; returns the metrics, with
    ``warnings`` (:func:`caption_warnings`) and the references' ``oov_*`` rate under the
    model's tokenizer (:func:`mmcn.models.tokenizer.oov`)."""
    from mmcn.models.tokenizer import load_tokenizer, oov

    start = time.perf_counter()
    model_dir, store_path, out_dir = Path(model_dir).resolve(), Path(lmdb_dir).resolve() / split, Path(out_dir)
    store = LmdbStore(store_path)
    rows = _run(model_dir, store_path, cfg, "caption", [{"index": i} for i in range(len(store))])
    captions = {int(store.image_ids[r["index"]]): str(r["caption"]) for r in rows}
    refs: dict[int, list[str]] = {int(i): [] for i in store.image_ids}
    for text_pos, image_pos in store.pair_positions.tolist():
        refs[int(store.image_ids[image_pos])].append(store.text_str(text_pos))
    scored = [i for i in refs if refs[i]]
    if not scored:
        raise ValueError(f"{store_path}: no image has a reference caption; nothing to score")
    tok_refs = {i: [tokenize(c, cfg.tokenize) for c in refs[i]] for i in scored}
    scores = score_captions(tok_refs, {i: tokenize(captions[i], cfg.tokenize) for i in scored})
    baseline_caption = most_frequent_caption(LmdbStore(Path(lmdb_dir).resolve() / "train"))
    baseline = score_captions(tok_refs, {i: tokenize(baseline_caption, cfg.tokenize) for i in scored})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_caption_predictions(out_dir / "predictions.jsonl", captions)
    per_image = {r["image_id"]: r for r in scores.rows()}
    write_caption_scores(out_dir / "per_image.jsonl", (
        {"image_id": i, "caption": captions[i], "references": refs[i],
         **{k: round(float(v), 6) for k, v in per_image.get(i, {}).items() if k != "image_id"}} for i in refs))
    warnings = caption_warnings(captions, model_task(model_dir))
    unknown = oov(load_tokenizer(model_dir), [c for i in scored for c in refs[i]])
    metrics = {**{k: round(scores.corpus[k], 6) for k in METRICS},
               "baseline_most_frequent_caption": {**{k: round(baseline.corpus[k], 6) for k in METRICS},
                                                  "caption": baseline_caption},
               "n_images": len(scored), "n_without_references": len(refs) - len(scored), "split": split,
               "tokenize": cfg.tokenize, "num_beams": cfg.num_beams, "decoding": cfg.decoding,
               **unknown.metrics(), "warnings": warnings, "seconds": round(time.perf_counter() - start, 1)}
    log.info("captions of %d %s images: CIDEr %.3f BLEU-4 %.3f (baseline CIDEr %.3f) in %.0fs", len(scored), split,
             metrics["CIDEr"], metrics["Bleu_4"], metrics["baseline_most_frequent_caption"]["CIDEr"],
             metrics["seconds"])
    (log.warning if unknown.unknown else log.info)("%s", unknown.describe(f"{split} references under the model's "
                                                                         "tokenizer"))
    for warning in warnings:
        log.warning("%s", warning)
    return metrics


def chance_recall(n_items: int, gold_counts: list[int], ks=KS) -> dict[str, float]:
    """Expected recall (percent) of a random ranking: P(hit@k) = 1 - C(N-g, k) / C(N, k)."""
    out = {}
    for k in ks:
        p = [1.0 - (math.comb(n_items - g, k) / math.comb(n_items, k) if n_items - g >= k else 0.0)
             for g in gold_counts]
        out[f"r{k}"] = 100.0 * sum(p) / len(p)
    out["mean_recall"] = sum(out[f"r{k}"] for k in ks) / len(ks)
    return out


def evaluate_retrieval(model_dir: Path, lmdb_dir: Path, out_dir: Path, cfg: EvalConfig = EvalConfig(),
                       split: str = "test") -> dict:
    """Rank every image for every text (t2i) and every text for every image (i2t); writes
    Chinese-CLIP prediction files (top 10) into ``out_dir``; returns the metrics.

    A model with a dual encoder ranks by its embeddings' cosines (its matcher re-ranks each
    query's top ``cfg.rerank_k``); one without (an Oscar retrieval checkpoint) ranks by its
    matcher's log P(match) of every (text, image) pair, and ``rerank_k`` does not apply.
    The metrics' ``ranker`` says which: dual_encoder | dual_encoder+rerank | cross_encoder;
    ``gallery_images`` / ``gallery_texts`` and ``notes`` the gallery's size and the R@k it
    makes trivial; ``oov_*`` the queries' share of [UNK] tokens under the model's tokenizer."""
    from mmcn.models.tokenizer import load_tokenizer, oov

    start = time.perf_counter()
    model_dir, store_path, out_dir = Path(model_dir).resolve(), Path(lmdb_dir).resolve() / split, Path(out_dir)
    config = json.loads((model_dir / "config.json").read_text())
    dual = config.get("dual_encoder", True)
    if is_clip(model_dir) and cfg.rerank_k:
        raise ValueError(f"{model_dir} is a Chinese-CLIP model: it has no cross-encoder to re-rank with; set rerank_k 0")
    if dual and cfg.rerank_k and not config.get("match_weight", 1.0):
        raise ValueError(f"{model_dir} was trained without its cross-encoder matcher (match_weight 0), so it cannot "
                         "re-rank: set rerank_k to 0, or train with match_weight > 0")
    store = LmdbStore(store_path)
    n_texts, n_images = store.num_texts, len(store)
    text_gold, image_gold = store.gold_positions()
    queries = [i for i in range(n_images) if image_gold[i]]
    results, extra = {}, {}
    if dual:
        rows = _run(model_dir, store_path, cfg, "embed", [{"index": -t - 1} for t in range(n_texts)] +
                    [{"index": i} for i in range(n_images)])  # sorted by index: texts (reversed) then images
        text_emb = np.stack([r["embedding"] for r in rows[:n_texts]])[::-1]
        image_emb = np.stack([r["embedding"] for r in rows[n_texts:]])
        scores = text_emb @ image_emb.T                      # (texts, images) cosine similarities
        out_dir.mkdir(parents=True, exist_ok=True)
        image_file, text_file = feature_paths(out_dir, split)  # Chinese-CLIP's extract_features.py output
        write_features(image_file, "image_id", store.image_ids, image_emb)
        write_features(text_file, "text_id", store.text_ids, text_emb)
        results["dual"] = _recalls(scores, scores.T, text_gold, image_gold, queries)
        t2i_scores, i2t_scores = scores, scores.T
        if cfg.rerank_k:
            t2i_scores, i2t_scores = _rerank(model_dir, store_path, cfg, scores)
            results["rerank"] = _recalls(t2i_scores, i2t_scores, text_gold, image_gold, queries)
        ranker = "dual_encoder+rerank" if cfg.rerank_k else "dual_encoder"
        final = results["rerank" if cfg.rerank_k else "dual"]
    else:
        if cfg.rerank_k:
            log.info("%s has no dual encoder: its matcher scores every pair, so rerank_k %d is ignored", model_dir,
                     cfg.rerank_k)
        t2i_scores, seconds = _match_all(model_dir, store_path, cfg, n_texts, n_images)
        i2t_scores = t2i_scores.T
        ranker, final = "cross_encoder", _recalls(t2i_scores, i2t_scores, text_gold, image_gold, queries)
        extra = {"pairs_scored": n_texts * n_images, "pairs_per_second": round(n_texts * n_images / seconds, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    top_t2i, top_i2t = topk(t2i_scores, min(10, n_images)), topk(i2t_scores, min(10, n_texts))
    write_retrieval_predictions(out_dir / "t2i_predictions.jsonl", "t2i", {
        int(store.text_ids[t]): [int(store.image_ids[i]) for i in top_t2i[t]] for t in range(n_texts)})
    write_retrieval_predictions(out_dir / "i2t_predictions.jsonl", "i2t", {
        int(store.image_ids[i]): [int(store.text_ids[t]) for t in top_i2t[i]] for i in queries})
    chance_t2i = chance_recall(n_images, [len(g) for g in text_gold if g])
    chance_i2t = chance_recall(n_texts, [len(image_gold[i]) for i in queries])
    unknown = oov(load_tokenizer(model_dir), [store.text_str(t) for t in range(n_texts)])
    notes = ([f"t2i: {n}" for n in gallery_notes(n_images, "images")] +
             [f"i2t: {n}" for n in gallery_notes(n_texts, "texts")])
    metrics = {**final, "ranker": ranker, **({"dual_encoder": results["dual"]} if dual else {}),
               **({"reranked": results["rerank"]} if "rerank" in results else {}),
               "baseline_chance": {"t2i": chance_t2i, "i2t": chance_i2t,
                                   "mean_recall": (chance_t2i["mean_recall"] + chance_i2t["mean_recall"]) / 2},
               "n_texts": n_texts, "n_images": n_images, "gallery_images": n_images, "gallery_texts": n_texts,
               "notes": notes, **unknown.metrics(), "rerank_k": cfg.rerank_k if dual else 0, **extra,
               "split": split, "seconds": round(time.perf_counter() - start, 1)}
    log.info("retrieval on %s (%d texts x %d images) ranked by the %s: mean recall %.2f%s (chance %.2f) in %.0fs",
             split, n_texts, n_images, ranker.replace("_", " "), final["mean_recall"],
             f" (dual encoder alone {results['dual']['mean_recall']:.2f})" if "rerank" in results else "",
             metrics["baseline_chance"]["mean_recall"], metrics["seconds"])
    (log.warning if unknown.unknown else log.info)("%s", unknown.describe(f"{split} queries under the model's "
                                                                         "tokenizer"))
    for note in notes:
        log.warning("%s", note)
    return metrics


def evaluate_clip(model_dir: Path, lmdb_dir: Path, out_dir: Path, cfg: EvalConfig = EvalConfig(),
                  split: str = "test") -> dict:
    """A Chinese-CLIP model's retrieval metrics (:func:`evaluate_retrieval`: recall both ways,
    prediction and feature files in ``out_dir``) and, when it was fine-tuned from a pretrained
    folder (``model.init`` in its mmcn.json, as train@clip records it), that folder's own
    zero-shot metrics under ``zero_shot`` (its files in ``out_dir/zero_shot``). No re-ranking."""
    from dataclasses import replace

    cfg = replace(cfg, rerank_k=0)
    metrics = evaluate_retrieval(model_dir, lmdb_dir, out_dir, cfg, split)
    meta = Path(model_dir) / "mmcn.json"
    init = json.loads(meta.read_text(encoding="utf-8")).get("model", {}).get("init") if meta.is_file() else ""
    if init:
        zero = _zero_shot(init, meta, lmdb_dir, Path(out_dir) / "zero_shot", cfg, split)
        metrics["zero_shot"] = {k: zero[k] for k in ("t2i", "i2t", "mean_recall")}
        log.info("Chinese-CLIP zero-shot (%s): mean recall %.2f; fine-tuned: %.2f", init, zero["mean_recall"],
                 metrics["mean_recall"])
    return metrics


def _zero_shot(init: str, meta: Path, lmdb_dir: Path, out_dir: Path, cfg: EvalConfig, split: str) -> dict:
    """:func:`evaluate_retrieval` of the folder a Chinese-CLIP model started from: a Hugging Face
    folder as it is, a folder holding Chinese-CLIP's own ``.pt`` (+ vocab.txt) converted into a
    temporary one first (:func:`mmcn.models.pixels.clip.convert_cn_clip`)."""
    import tempfile

    from mmcn.models.factory import family

    if (Path(init) / "config.json").is_file():
        return evaluate_retrieval(init, lmdb_dir, out_dir, cfg, split)
    pixels = family("clip")
    checkpoint = pixels.find_checkpoint(init) if Path(init).is_dir() else None
    if checkpoint is None:
        raise FileNotFoundError(f"{meta}: the model was fine-tuned from {init}, which is gone; restore it for "
                                "the zero-shot evaluation, or retrain (clip.model.init)")
    with tempfile.TemporaryDirectory(prefix="mmcn-zero-shot-") as tmp:
        pixels.convert_cn_clip(checkpoint, tmp)
        return evaluate_retrieval(tmp, lmdb_dir, out_dir, cfg, split)


def _pair_positions(batch: dict, n_texts: int) -> dict:
    """Pair numbers -> positions, image-major (pair p: image p // n_texts, text p % n_texts),
    so that a batch holds few images."""
    image, text = np.divmod(np.asarray(batch["id"]), n_texts)
    return {"text": text, "image": image}


def _match_all(model_dir: Path, store_path: Path, cfg: EvalConfig, n_texts: int,
               n_images: int) -> tuple[np.ndarray, float]:
    """The cross-encoder's log P(match) of every (text, image) pair of the split on the actor
    pool, ``cfg.batch_size`` pairs per call: a (texts, images) matrix, and the seconds it took.
    Pairs are made from their numbers inside Ray Data (no list of them on the driver); the
    progress (counts, rate, ETA) goes to a bar on a terminal and to the log (:class:`mmcn.logs.Progress`)."""
    import ray

    n = n_texts * n_images
    if not n:
        raise ValueError(f"{store_path}: {n_texts} texts and {n_images} images, no pair to score")
    scores = np.full((n_texts, n_images), np.nan, np.float32)
    blocks = min(math.ceil(n / (8 * cfg.batch_size)), 1000)  # results stream back every ~8 calls' pairs
    pairs = ray.data.range(n, override_num_blocks=blocks).map_batches(_pair_positions, fn_kwargs={"n_texts": n_texts},
                                                                      batch_format="numpy")
    log.info("cross-encoder: scoring %d texts x %d images = %d pairs, %d per call, on %d actor(s)", n_texts, n_images,
             n, cfg.batch_size, cfg.workers)
    start, done = time.perf_counter(), 0
    with Progress(n, "cross-encoder", "pair", log, warmup=True) as bar:  # the rate leaves the actors' start-up out
        for batch in _pool(model_dir, store_path, cfg, "match", pairs).iter_batches(batch_size=None,
                                                                                     batch_format="numpy"):
            scores[batch["text"], batch["image"]] = batch["score"]
            bar.update(len(batch["score"]))
            done += len(batch["score"])
    seconds = time.perf_counter() - start
    missing = int(np.isnan(scores).sum())
    if done != n or missing:
        raise RuntimeError(f"{store_path}: the cross-encoder returned {done} scores for {n} pairs ({missing} pairs "
                           "without a score); rerun the evaluation")
    return scores, seconds


def _recalls(t2i_scores: np.ndarray, i2t_scores: np.ndarray, text_gold, image_gold, queries) -> dict:
    t2i = recalls_from_ranks(gold_ranks(t2i_scores, text_gold))
    i2t = recalls_from_ranks(gold_ranks(i2t_scores, image_gold)[queries])
    return {"t2i": _round(t2i), "i2t": _round(i2t), "mean_recall": round((t2i["mean_recall"] + i2t["mean_recall"]) / 2, 4)}


def _round(d: dict) -> dict:
    return {k: round(v, 4) for k, v in d.items()}


def _rerank(model_dir: Path, store_path: Path, cfg: EvalConfig, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(texts x images, images x texts) scores where each query's top k are ordered by the
    cross-encoder and placed above everything else; the rest keep the dual encoder's order."""
    k_i, k_t = min(cfg.rerank_k, scores.shape[1]), min(cfg.rerank_k, scores.shape[0])
    t2i, i2t = topk(scores, k_i), topk(scores.T, k_t)
    pairs = {(t, int(i)) for t in range(scores.shape[0]) for i in t2i[t]}
    pairs |= {(int(t), i) for i in range(scores.shape[1]) for t in i2t[i]}
    rows = [{"text": t, "image": i} for t, i in sorted(pairs)]
    match = {(int(r["text"]), int(r["image"])): float(r["score"]) for r in _run(model_dir, store_path, cfg, "match",
                                                                                  rows)}
    return (_place_by_rank(scores, t2i, lambda q, c: match[(q, c)]),
            _place_by_rank(scores.T, i2t, lambda q, c: match[(c, q)]))


def _place_by_rank(scores: np.ndarray, candidates: np.ndarray, match) -> np.ndarray:
    """``scores`` with each query's candidates moved above every other item (cosines are <= 1,
    the candidates get 2, 3, ...) in the order of their match score (ties: the dual
    encoder's order); only ranks matter downstream, so the match values' scale cannot leak."""
    out = scores.copy()
    for q, cands in enumerate(candidates):
        cands = [int(c) for c in cands]
        ranked = sorted(range(len(cands)), key=lambda r: -match(q, cands[r]))  # stable: dual order on ties
        for place, r in enumerate(ranked):
            out[q, cands[r]] = 2.0 + len(cands) - place
    return out
