"""Inference on raw image files with trained models, in one process, from local folders only.

The chain is the pipeline's own, function for function: image bytes (re-encoded as the
ingest stage does when ``max_side`` is set) -> :func:`mmcn.vision.extract.decode` ->
detector (:func:`mmcn.vision.extract.detect_regions`) -> 2054-dim region features ->
Chinese tags (:class:`mmcn.text.translate.Translator`) -> caption model or retrieval
model. An image run through it gets the caption ``evaluate@caption`` gives the same
image stored in the LMDB, as long as the settings match the pipeline's params.

* :class:`Captioner`: ``Captioner.from_dir("models/caption")(["a.jpg"]) -> ["一个红色的圆形"]``;
  :meth:`Captioner.caption` returns per-image results and reports bad files instead of raising.
* :class:`Searcher`: rank images (raw files or an LMDB split) for a Chinese query.
* :class:`CaptionGenerator`, :class:`RetrievalEncoder`: a saved model + its tokenizer +
  collator on items of :mod:`mmcn.data.datasets` (also used by the Ray evaluation actors).
"""
from __future__ import annotations

import glob
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch

from mmcn.data.features import RegionFeatures
from mmcn.data.image import ImageError, normalize
from mmcn.data.raw import IMAGE_EXTENSIONS
from mmcn.data.tags import ImageTags, tag_text
from mmcn.models.factory import load_model
from mmcn.models.inputs import CaptionCollator, RetrievalCollator
from mmcn.text.tokenizer import detokenize, load_tokenizer
from mmcn.text.translate import LabelTable, TranslateConfig, Translator
from mmcn.vision.extract import ExtractConfig, decode, detect_regions

log = logging.getLogger(__name__)

ImageInput = Union[str, Path, bytes]


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the first GPU when there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _load(model_dir: Path | str, task: str):
    found, model = load_model(model_dir)
    if found != task:
        raise ValueError(f"{model_dir} holds a {found} model, not a {task} model")
    return model, load_tokenizer(model_dir)


# --------------------------------------------------------------------------- models on items

@dataclass(frozen=True)
class Decoding:
    num_beams: int = 3           # 1: greedy
    max_length: int = 30
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @classmethod
    def of(cls, settings) -> "Decoding":
        """The decoding fields of any object that has them (e.g. an ``EvalConfig``)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


class CaptionGenerator:
    """A saved caption model: items (``features``, ``tags``) -> (captions, scores)."""

    def __init__(self, model_dir: Path | str, decoding: Decoding = Decoding(), device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model, self.tok = _load(model_dir, "caption")
        self.model.to(self.device).eval()
        self.collate = CaptionCollator(self.tok, self.model.config, train=False)
        self.decoding = decoding

    @torch.no_grad()
    def __call__(self, items: list[dict]) -> tuple[list[str], list[float]]:
        b, d, tok = self.collate(items), self.decoding, self.tok
        with _autocast(self.device):
            ids, scores = self.model.generate(
                *(b[k].to(self.device) for k in ("tag_ids", "tag_mask", "img_feats", "img_mask")),
                cls_id=tok.cls_token_id, sep_id=tok.sep_token_id, mask_id=tok.mask_token_id, pad_id=tok.pad_token_id,
                num_beams=d.num_beams, max_length=d.max_length, length_penalty=d.length_penalty,
                no_repeat_ngram_size=d.no_repeat_ngram_size)
        return [detokenize(tok.decode(x)) for x in ids], [float(s) for s in scores]


class RetrievalEncoder:
    """A saved retrieval model: unit-length embeddings of texts and of images (items with
    ``features`` and ``tags``), and the cross-encoder's match scores of (text, image) pairs."""

    def __init__(self, model_dir: Path | str, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model, self.tok = _load(model_dir, "retrieval")
        self.model.to(self.device).eval()
        self.collate = RetrievalCollator(self.tok, self.model.config)

    def _inputs(self, items: list[dict], keys: tuple[str, ...]) -> list[torch.Tensor]:
        b = self.collate(items)
        return [b[k].to(self.device) for k in keys]

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> np.ndarray:
        with _autocast(self.device):
            out = self.model.encode_text(*self._inputs([{"text": t, "text_id": 0} for t in texts],
                                                       ("text_ids", "text_mask")))
        return out.float().cpu().numpy()

    @torch.no_grad()
    def images(self, items: list[dict]) -> np.ndarray:
        with _autocast(self.device):
            out = self.model.encode_image(*self._inputs(items, ("image_tag_ids", "image_tag_mask", "img_feats",
                                                                "img_mask")))
        return out.float().cpu().numpy()

    @torch.no_grad()
    def match(self, items: list[dict]) -> np.ndarray:
        """log P(match) of each item holding a ``text`` and an image (``features``, ``tags``)."""
        with _autocast(self.device):
            out = self.model.match_score(*self._inputs(items, ("text_ids", "text_mask", "tag_ids", "tag_mask",
                                                               "img_feats", "img_mask")))
        return out.float().cpu().numpy()


# --------------------------------------------------------------------------- raw images -> items

@dataclass(frozen=True)
class ChainConfig:
    """How raw images become model inputs; match these to the pipeline's ``ingest.max_side``,
    ``features.*`` and ``translate.*`` params to get the pipeline's own results."""

    extract: ExtractConfig = ExtractConfig()
    translate: TranslateConfig = TranslateConfig()
    overrides: str = ""              # en->zh overrides file (translate.overrides)
    max_side: int | None = None      # ingest.max_side: re-encode larger images as the ingest stage does


@dataclass
class Regions:
    """One image through the detector and the label table."""

    source: str
    features: RegionFeatures
    tags: ImageTags

    def item(self) -> dict:
        return {"image_id": self.features.image_id, "features": torch.from_numpy(self.features.features),
                "tags": tag_text(self.tags.tags)}


@dataclass
class Skipped:
    source: str
    reason: str


def expand_images(specs: Iterable[str | Path]) -> tuple[list[Path], list[Skipped]]:
    """Files, directories (searched recursively for image extensions) and glob patterns ->
    image paths in a stable order; specs that match nothing are returned as skipped."""
    paths, missing = [], []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
            paths += found
            if not found:
                missing.append(Skipped(str(spec), "no image files (by extension) under this directory"))
        elif p.is_file():
            paths.append(p)
        elif glob.has_magic(str(spec)):
            found = sorted(Path(q) for q in glob.glob(str(spec), recursive=True) if Path(q).is_file())
            paths += found
            if not found:
                missing.append(Skipped(str(spec), "the pattern matches no file"))
        else:
            missing.append(Skipped(str(spec), "no such file or directory"))
    return list(dict.fromkeys(paths)), missing


class RegionChain:
    """Raw images -> :class:`Regions` with the pipeline's detector and label table."""

    def __init__(self, detector_dir: Path | str, cfg: ChainConfig = ChainConfig(), device: str | torch.device = "cpu"):
        from mmcn.vision.detector import load_detector

        self.cfg, self.device = cfg, torch.device(device)
        self.detector = load_detector(detector_dir).to(self.device).eval()
        self.translator = Translator(LabelTable.load(Path(cfg.overrides) if cfg.overrides else None), cfg.translate)

    def _tensor(self, image: ImageInput):
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        if self.cfg.max_side:
            try:
                data = normalize(data, [], max_side=self.cfg.max_side, max_pixels=self.cfg.extract.max_pixels)[0]
            except ImageError as e:
                raise ValueError(str(e)) from None
        return decode(data, self.cfg.extract)

    def __call__(self, images: Sequence[ImageInput]) -> list[Regions | Skipped]:
        """One result per input, in input order; unreadable images come back as :class:`Skipped`."""
        names = [f"<bytes #{k}>" if isinstance(im, bytes) else str(im) for k, im in enumerate(images)]
        out: list[Regions | Skipped | None] = [None] * len(images)
        decoded = []
        for k, image in enumerate(images):
            try:
                decoded.append((k, self._tensor(image)))
            except (OSError, ValueError) as e:
                out[k] = Skipped(names[k], str(e))
        known_unknown = {label for c in self.translator.unknown.values() for label in c}
        with torch.no_grad():
            for k, rec in detect_regions(self.detector, decoded, self.cfg.extract, self.device):
                out[k] = Regions(names[k], rec, self.translator.image(k, rec.classes, rec.attributes))
        unknown = {label for c in self.translator.unknown.values() for label in c} - known_unknown
        if unknown:
            log.warning("labels without a Chinese translation (policy %s): %s", self.cfg.translate.unknown,
                        ", ".join(sorted(unknown)))
        return out


# --------------------------------------------------------------------------- the user-facing API

@dataclass
class Caption:
    source: str
    caption: str = ""
    score: float = float("nan")       # log-probability per token (length penalty applied)
    tags: list[str] = field(default_factory=list)
    error: str = ""                   # why the image was skipped ("" when captioned)


class Captioner:
    """Raw images -> Chinese captions with a trained caption model and the pipeline's detector.

    >>> captioner = Captioner.from_dir("models/caption", detector_dir="models/detector")
    >>> captioner(["photo.jpg"])
    ['画面中间有一个红色的圆形']
    """

    def __init__(self, chain: RegionChain, generator: CaptionGenerator, batch_size: int = 16):
        self.chain, self.generator, self.batch_size = chain, generator, batch_size

    @classmethod
    def from_dir(cls, model_dir: Path | str = "models/caption", detector_dir: Path | str = "models/detector",
                 chain: ChainConfig = ChainConfig(), decoding: Decoding = Decoding(), device: str = "auto",
                 batch_size: int = 16) -> "Captioner":
        dev = pick_device(device)
        return cls(RegionChain(detector_dir, chain, dev), CaptionGenerator(model_dir, decoding, dev), batch_size)

    def caption(self, images: Sequence[ImageInput]) -> list[Caption]:
        """One :class:`Caption` per input, in order; bad images have ``error`` set."""
        results: list[Caption] = []
        for first in range(0, len(images), self.batch_size):
            regions = self.chain(images[first:first + self.batch_size])
            good = [r for r in regions if isinstance(r, Regions)]
            captions, scores = self.generator([r.item() for r in good]) if good else ([], [])
            done = {id(r): (c, s) for r, c, s in zip(good, captions, scores)}
            for r in regions:
                if isinstance(r, Skipped):
                    results.append(Caption(r.source, error=r.reason))
                else:
                    c, s = done[id(r)]
                    results.append(Caption(r.source, c, s, [t for t in r.tags.tags if t]))
        return results

    def __call__(self, images: Sequence[ImageInput]) -> list[str]:
        """Captions of ``images``; a bad image raises ValueError naming it (see :meth:`caption`)."""
        results = self.caption(images)
        bad = [f"{r.source}: {r.error}" for r in results if r.error]
        if bad:
            raise ValueError("cannot caption " + "; ".join(bad))
        return [r.caption for r in results]


@dataclass
class Hit:
    rank: int
    name: str          # file path, or the image id of an LMDB split
    score: float       # cosine similarity of the query and the image


class Searcher:
    """Rank images for a Chinese query with a trained retrieval model (dual encoder).

    >>> searcher = Searcher.from_dir("models/retrieval")
    >>> searcher.index_lmdb("data/lmdb/test")  # or .index_images(["a.jpg", ...]) (runs the detector)
    >>> searcher.search("一个红色的圆形", k=5)
    """

    def __init__(self, encoder: RetrievalEncoder, detector_dir: Path | str | None = None,
                 chain: ChainConfig = ChainConfig(), batch_size: int = 64):
        self.encoder, self.detector_dir, self.chain_cfg, self.batch_size = encoder, detector_dir, chain, batch_size
        self._chain: RegionChain | None = None
        self.names: list[str] = []
        self.embeddings = np.zeros((0, encoder.model.config.embed_dim), np.float32)

    @classmethod
    def from_dir(cls, model_dir: Path | str = "models/retrieval", detector_dir: Path | str | None = "models/detector",
                 chain: ChainConfig = ChainConfig(), device: str = "auto", batch_size: int = 64) -> "Searcher":
        return cls(RetrievalEncoder(model_dir, pick_device(device)), detector_dir, chain, batch_size)

    def _add(self, names: list[str], items: list[dict]) -> None:
        if items:
            self.names += names
            self.embeddings = np.concatenate([self.embeddings, self.encoder.images(items)])

    def index_images(self, images: Sequence[ImageInput]) -> list[Skipped]:
        """Run the detector chain over raw images and add them; returns the skipped ones."""
        if self._chain is None:
            if self.detector_dir is None:
                raise ValueError("indexing raw images needs the detector folder (detector_dir)")
            self._chain = RegionChain(self.detector_dir, self.chain_cfg, self.encoder.device)
        skipped = []
        for first in range(0, len(images), self.batch_size):
            regions = self._chain(images[first:first + self.batch_size])
            good = [r for r in regions if isinstance(r, Regions)]
            skipped += [r for r in regions if isinstance(r, Skipped)]
            self._add([r.source for r in good], [r.item() for r in good])
        return skipped

    def index_lmdb(self, path: Path | str) -> int:
        """Add every image of an LMDB split (stored features and tags); returns how many."""
        from mmcn.data.datasets import RetrievalDataset

        data = RetrievalDataset(path)
        for first in range(0, len(data.store), self.batch_size):
            items = [data.image(i) for i in range(first, min(first + self.batch_size, len(data.store)))]
            self._add([str(it["image_id"]) for it in items], items)
        return len(data.store)

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` best images for ``query``, best first (ties: the earlier indexed first)."""
        if not self.names:
            raise ValueError("no images indexed: call index_images or index_lmdb first")
        scores = self.embeddings @ self.encoder.texts([query])[0]
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(r + 1, self.names[i], float(scores[i])) for r, i in enumerate(order)]
