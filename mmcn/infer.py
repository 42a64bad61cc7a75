"""Inference on raw image files with trained models, in one process, from local folders only.

The chain is the pipeline's own, function for function: image bytes (re-encoded as the
ingest stage does when ``max_side`` is set) -> :func:`mmcn.vision.extract.decode` ->
detector (:func:`mmcn.vision.extract.detect_regions`) -> 2054-dim region features ->
Chinese tags (:class:`mmcn.text.translate.Translator`) -> caption model or retrieval
model. An image run through it gets the caption ``evaluate@caption`` gives the same
image stored in the LMDB, as long as the settings match the pipeline's params.

* :class:`Captioner`: ``Captioner.from_dir("models/caption")(["a.jpg"]) -> ["一个红色的圆形"]``;
  :meth:`Captioner.caption` returns per-image results and reports bad files instead of raising.
* :class:`Searcher`: rank images (raw files or an LMDB split) for a Chinese query; the
  index of raw files can be cached on disk (:class:`IndexCache`), so a second query over the
  same images only encodes the text.
The models themselves run through :mod:`mmcn.models.regions.inference` (also used by the
evaluation stage and the training loop's validation).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch

from mmcn.data.features import RegionFeatures
from mmcn.data.image import FEATURES_MAX_PIXELS, normalize
from mmcn.data.raw import IMAGE_EXTENSIONS
from mmcn.data.tags import ImageTags, tag_text
from mmcn.models.regions.inference import CaptionGenerator, Decoding, RetrievalEncoder, embed_images
from mmcn.models.runtime import pick_device
from mmcn.text.translate import Entry, LabelTable, TranslateConfig, Translator
from mmcn.vision.extract import ExtractConfig, decode, detect_regions

log = logging.getLogger(__name__)

ImageInput = Union[str, Path, bytes]


# --------------------------------------------------------------------------- raw images -> items

@dataclass(frozen=True)
class ChainConfig:
    """How raw images become model inputs: the pipeline's ``ingest.max_side``, ``features.*``
    and ``translate.*`` settings. A model trained by mmcn records them (:meth:`of_model`),
    and :meth:`Captioner.from_dir` / :meth:`Searcher.from_dir` use that record by default."""

    extract: ExtractConfig = ExtractConfig()
    translate: TranslateConfig = TranslateConfig()
    overrides: str = ""              # en->zh overrides file (translate.overrides)
    max_side: int | None = None      # ingest.max_side: re-encode larger images as the ingest stage does
    override_rows: tuple[Entry, ...] = ()   # en->zh override rows (as recorded in a model folder)

    def __post_init__(self) -> None:
        if self.max_side is not None and not self.max_side >= 0:
            raise ValueError(f"max_side: must be null or >= 0 (ingest.max_side), got {self.max_side!r}")

    @classmethod
    def from_record(cls, chain: dict) -> "ChainConfig":
        """The chain a dataset was made with (:mod:`mmcn.data.chain`: ingest, features, translate sections)."""
        def known(config_class, section: dict) -> dict:
            names = {f.name for f in fields(config_class)}
            return {k: v for k, v in section.items() if k in names}

        trans = dict(chain.get("translate") or {})
        rows = tuple(Entry(**row) for row in trans.pop("overrides", []))
        return cls(ExtractConfig(**known(ExtractConfig, chain.get("features") or {})),
                   TranslateConfig(**known(TranslateConfig, trans)), "",
                   (chain.get("ingest") or {}).get("max_side"), rows)

    @classmethod
    def of_model(cls, model_dir: Path | str) -> "ChainConfig":
        """The chain recorded in a model folder's ``mmcn.json`` (the settings of the data it was
        trained and evaluated on); the library defaults, with a warning, when it records none."""
        meta = Path(model_dir) / "mmcn.json"
        chain = json.loads(meta.read_text(encoding="utf-8")).get("chain") if meta.is_file() else None
        if not chain:
            log.warning("%s records no chain settings (a model from elsewhere or an older mmcn): the library's "
                        "defaults apply; pass chain=ChainConfig(...) (CLI: --params) to match its data", model_dir)
            return cls()
        return cls.from_record(chain)


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
        table = LabelTable.load(Path(cfg.overrides) if cfg.overrides else None, cfg.override_rows)
        self.translator = Translator(table, cfg.translate)

    def _tensor(self, image: ImageInput):
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        if self.cfg.max_side:  # ImageError (a ValueError) says what is wrong, as in ingest and features
            data = normalize(data, [], max_side=self.cfg.max_side, max_pixels=self.cfg.extract.max_pixels,
                             setting=FEATURES_MAX_PIXELS)[0]
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


@dataclass
class Pixels:
    """One image as a Chinese-CLIP model reads it: its bytes (no detector)."""

    source: str
    data: bytes

    def item(self) -> dict:
        return {"image_id": 0, "image": self.data}


class PixelChain:
    """Raw images -> :class:`Pixels` for a Chinese-CLIP model; an image that does not decode
    (:func:`mmcn.data.image.decode_rgb`) comes back as :class:`Skipped` saying why."""

    def __call__(self, images: Sequence[ImageInput]) -> list[Pixels | Skipped]:
        from mmcn.data.image import decode_rgb

        out: list[Pixels | Skipped] = []
        for k, image in enumerate(images):
            name = f"<bytes #{k}>" if isinstance(image, bytes) else str(image)
            try:
                data = image if isinstance(image, bytes) else Path(image).read_bytes()
                decode_rgb(data)
            except (OSError, ValueError) as e:
                out.append(Skipped(name, str(e)))
                continue
            out.append(Pixels(name, data))
        return out


# --------------------------------------------------------------------------- the user-facing API

@dataclass
class Caption:
    source: str
    caption: str = ""
    score: float = float("nan")       # log-probability per token (length penalty applied)
    tags: list[str] = field(default_factory=list)
    error: str = ""                   # why the image was skipped ("" when captioned)


class _CaptionerBase:
    """What every captioner shares: calling it gives the captions, or an error naming each bad image."""

    def __call__(self, images: Sequence[ImageInput]) -> list[str]:
        """Captions of ``images``; a bad image raises ValueError naming it (see :meth:`caption`)."""
        results = self.caption(images)
        bad = [f"{r.source}: {r.error}" for r in results if r.error]
        if bad:
            raise ValueError("cannot caption " + "; ".join(bad))
        return [r.caption for r in results]


class Captioner(_CaptionerBase):
    """Raw images -> Chinese captions with a trained caption model and the pipeline's detector.

    >>> captioner = Captioner.from_dir("models/caption", detector_dir="models/detector")
    >>> captioner(["photo.jpg"])
    ['画面中间有一个红色的圆形']
    """

    def __init__(self, chain: RegionChain, generator: CaptionGenerator, batch_size: int = 16):
        self.chain, self.generator, self.batch_size = chain, generator, batch_size

    @classmethod
    def from_dir(cls, model_dir: Path | str = "models/caption", detector_dir: Path | str = "models/detector",
                 chain: ChainConfig | None = None, decoding: Decoding = Decoding(), device: str = "auto",
                 batch_size: int = 16) -> "Captioner":
        """``chain`` None: the chain recorded in the model folder (:meth:`ChainConfig.of_model`)."""
        dev = pick_device(device)
        chain = chain if chain is not None else ChainConfig.of_model(model_dir)
        return cls(RegionChain(detector_dir, chain, dev), CaptionGenerator.from_dir(model_dir, decoding, dev),
                   batch_size)

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



class ClipCapCaptioner(_CaptionerBase):
    """Raw images -> Chinese captions with a ClipCap model (:mod:`mmcn.models.pixels.clipcap`): its own
    CLIP reads the pixels, so no detector, tags or region features are involved.

    >>> ClipCapCaptioner.from_dir("models/clipcap")(["photo.jpg"])
    ['画面中间有一个红色的圆形']
    """

    def __init__(self, generator, batch_size: int = 16):
        self.generator, self.batch_size = generator, batch_size

    @classmethod
    def from_dir(cls, model_dir: Path | str = "models/clipcap", decoding=None, device: str = "auto",
                 batch_size: int = 16) -> "ClipCapCaptioner":
        """``decoding``: a :class:`mmcn.models.pixels.clipcap.ClipCapDecoding` (None: its defaults)."""
        from mmcn.models.pixels.clipcap import ClipCapDecoding, ClipCapGenerator

        return cls(ClipCapGenerator.from_dir(model_dir, decoding or ClipCapDecoding(), pick_device(device)),
                   batch_size)

    def caption(self, images: Sequence[ImageInput]) -> list[Caption]:
        """One :class:`Caption` per input, in order; unreadable images have ``error`` set."""
        from mmcn.data.image import decode_rgb

        results: list[Caption] = []
        for first in range(0, len(images), self.batch_size):
            batch, names, good = images[first:first + self.batch_size], [], []
            out: list[Caption | None] = []
            for k, image in enumerate(batch):
                name = f"<bytes #{first + k}>" if isinstance(image, bytes) else str(image)
                try:
                    data = image if isinstance(image, bytes) else Path(image).read_bytes()
                    decode_rgb(data)  # ImageError (a ValueError) says what is wrong with the file
                except (OSError, ValueError) as e:
                    out.append(Caption(name, error=str(e)))
                    continue
                out.append(None)
                names.append(name)
                good.append(data)
            captions, scores = self.generator(good) if good else ([], [])
            done = iter(zip(names, captions, scores))
            results += [r if r is not None else Caption(*next(done)) for r in out]
        return results


@dataclass
class Hit:
    rank: int
    name: str          # file path, or the image id of an LMDB split
    score: float       # cosine similarity of the query and the image; log P(match) for a matcher-only model


class Searcher:
    """Rank images for a Chinese query with a trained retrieval model: by the dual encoder's
    cosines, or, for a model without one (an Oscar retrieval checkpoint), by its matcher's
    log P(match) of the query with every indexed image (the images are kept, not embedded).

    >>> searcher = Searcher.from_dir("models/retrieval")
    >>> searcher.index_lmdb("data/lmdb/test")  # or .index_images(["a.jpg", ...]) (runs the detector)
    >>> searcher.search("一个红色的圆形", k=5)
    """

    def __init__(self, encoder: RetrievalEncoder, detector_dir: Path | str | None = None,
                 chain: ChainConfig | None = None, batch_size: int = 64, model_dir: Path | str | None = None):
        chain = chain if chain is not None else ChainConfig()
        self.encoder, self.detector_dir, self.chain_cfg, self.batch_size = encoder, detector_dir, chain, batch_size
        self.model_dir = model_dir  # the retrieval model's folder: part of the image cache's key
        self._chain: RegionChain | None = None
        self.names: list[str] = []
        self.embeddings = np.zeros((0, encoder.dim), np.float32)
        self.items: list[dict] = []    # the indexed images themselves, for a model without a dual encoder

    @classmethod
    def from_dir(cls, model_dir: Path | str = "models/retrieval", detector_dir: Path | str | None = "models/detector",
                 chain: ChainConfig | None = None, device: str = "auto", batch_size: int = 64) -> "Searcher":
        """``chain`` None: the chain recorded in the model folder (:meth:`ChainConfig.of_model`).
        A Chinese-CLIP folder (task clip, :mod:`mmcn.models.pixels.clip`) reads the pixels: no detector."""
        from mmcn.models.factory import saved_task

        if saved_task(model_dir) == "clip":
            from mmcn.models.pixels.clip import ClipEncoder

            return cls(ClipEncoder.from_dir(model_dir, pick_device(device)), None, ChainConfig(), batch_size, model_dir)
        if chain is None and detector_dir is not None:
            chain = ChainConfig.of_model(model_dir)
        return cls(RetrievalEncoder.from_dir(model_dir, pick_device(device)), detector_dir, chain, batch_size,
                   model_dir)

    @property
    def pixels(self) -> bool:
        """A Chinese-CLIP model: images are read as pixels, without the detector."""
        from mmcn.models.pixels.clip import ClipEncoder

        return isinstance(self.encoder, ClipEncoder)

    def _add(self, names: list[str], items: list[dict]) -> None:
        if items:
            self.names += names
            if self.encoder.dual_encoder:
                self.embeddings = np.concatenate([self.embeddings, self.encoder.images(items)])
            else:
                self.items += items

    def identity(self) -> str:
        """What an image's index entry depends on besides the image: the retrieval model's and
        the detector's files (name, size, modification time), the chain settings (with the
        overrides file's), the device type (bf16 on a GPU), the code that computes an entry
        (this module's and the model family's files, :func:`mmcn.provenance.code_files`: an
        upgrade of mmcn indexes again) and :data:`IndexCache.VERSION`."""
        from mmcn import provenance
        from mmcn.models.factory import family_code

        if self.model_dir is None or (self.detector_dir is None and not self.pixels):
            raise ValueError("caching the image index needs the model and detector folders (Searcher.from_dir)")

        def files(folder) -> list:
            folder = Path(folder)
            paths = sorted(q for q in folder.rglob("*") if q.is_file()) if folder.is_dir() else [folder]
            return [(str(q.relative_to(folder)) if q != folder else q.name, q.stat().st_size, q.stat().st_mtime_ns)
                    for q in paths if q.exists()]

        key = {"version": IndexCache.VERSION, "model": files(self.model_dir),
               "detector": files(self.detector_dir) if self.detector_dir is not None else [],
               "chain": dataclasses.asdict(self.chain_cfg),
               "overrides": files(self.chain_cfg.overrides) if self.chain_cfg.overrides else [],
               "device": self.encoder.device.type, "dual_encoder": self.encoder.dual_encoder,
               "code": provenance.digests(provenance.code_files(__name__) +
                                          family_code("clip" if self.pixels else "retrieval"))}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def index_images(self, images: Sequence[ImageInput], cache_dir: Path | str | None = None) -> list[Skipped]:
        """Run the detector chain over raw images and add them (in input order); returns the
        skipped ones. With ``cache_dir`` (:class:`IndexCache`), an image whose bytes (SHA-256)
        were indexed before under this searcher's :meth:`identity` is taken from the cache
        (its embedding; for a matcher-only model its region features and tags), so the
        detector runs only on new or changed images (and is not even loaded when none is);
        their entries are added to the cache."""
        cache = IndexCache(cache_dir, self.identity()) if cache_dir is not None else None
        known = cache.load() if cache is not None else {}
        digests = [_digest(image) for image in images]
        todo = [k for k, d in enumerate(digests) if d is None or d not in known]
        entries = {k: known[d] for k, d in enumerate(digests) if d is not None and d in known}
        if cache is not None:
            log.info("image index: %d of %d images from the cache %s, %d through the detector", len(entries),
                     len(images), cache.path, len(todo))
        if todo and self._chain is None and self.pixels:
            self._chain = PixelChain()
        if todo and self._chain is None:
            if self.detector_dir is None:
                raise ValueError("indexing raw images needs the detector folder (detector_dir)")
            self._chain = RegionChain(self.detector_dir, self.chain_cfg, self.encoder.device)
        skipped, new = [], {}
        for first in range(0, len(todo), self.batch_size):
            chunk = todo[first:first + self.batch_size]
            regions = self._chain([images[k] for k in chunk])
            skipped += [r for r in regions if isinstance(r, Skipped)]
            good = [(k, r.item()) for k, r in zip(chunk, regions) if not isinstance(r, Skipped)]
            if good and self.encoder.dual_encoder:
                good = list(zip([k for k, _ in good], self.encoder.images([item for _, item in good])))
            for k, entry in good:
                entries[k] = entry
                if digests[k] is not None:
                    new[digests[k]] = entry
        if cache is not None and new:
            cache.save({**known, **new})
        order = sorted(entries)
        names = [f"<bytes #{k}>" if isinstance(images[k], bytes) else str(images[k]) for k in order]
        if self.encoder.dual_encoder:
            self.names += names
            self.embeddings = np.concatenate([self.embeddings, np.asarray([entries[k] for k in order],
                                                                          np.float32).reshape(-1, self.encoder.dim)])
        else:
            self._add(names, [entries[k] for k in order])
        return skipped

    def index_lmdb(self, path: Path | str) -> int:
        """Add every image of an LMDB split (stored features and tags); returns how many."""
        from mmcn.models.pixels.datasets import ClipDataset
        from mmcn.models.regions.datasets import RetrievalDataset

        data = ClipDataset(path) if self.pixels else RetrievalDataset(path)
        self.names += [str(i) for i in data.store.image_ids]
        if self.encoder.dual_encoder:
            self.embeddings = np.concatenate([self.embeddings, embed_images(self.encoder, data, self.batch_size)])
        else:
            self.items += [data.image(i) for i in range(data.num_images)]
        return data.num_images

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` best images for ``query``, best first (ties: the earlier indexed first).
        Characters of the query outside the model's vocabulary ([UNK] tokens) are named in a
        warning; a query with no known token at all is a ValueError (its ranking would be
        that of an empty query)."""
        from mmcn.models.tokenizer import oov

        if not self.names:
            raise ValueError("no images indexed: call index_images or index_lmdb first")
        unknown = oov(self.encoder.tok, [query])
        if unknown.unknown == unknown.tokens:
            raise ValueError(f"query {query!r}: " + (
                f"none of its characters is in the model's vocabulary ({unknown.top()}): every token is [UNK], so "
                "any ranking would be noise; ask with words the training captions use" if unknown.tokens
                else "nothing to search for"))
        if unknown.unknown:
            log.warning("query %r: %d of its %d tokens are not in the model's vocabulary and read as [UNK]: %s",
                        query, unknown.unknown, unknown.tokens, unknown.top())
        if self.encoder.dual_encoder:
            scores = self.embeddings @ self.encoder.texts([query])[0]
        else:  # the matcher on (query, image) for every indexed image, batch_size pairs at a time
            text, n = {"text": query, "text_id": 0}, self.batch_size
            scores = np.concatenate([self.encoder.match([{**text, **item} for item in self.items[first:first + n]])
                                     for first in range(0, len(self.items), n)])
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(r + 1, self.names[i], float(scores[i])) for r, i in enumerate(order)]



# --------------------------------------------------------------------------- the image index cache

def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mmcn/search`` (``~/.cache/mmcn/search``): where `mmcn search --images` keeps
    its image index, outside the image folder (which may be read-only or under version control)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmcn" / "search"


def _digest(image: ImageInput) -> str | None:
    """SHA-256 of an image's bytes (None when the file cannot be read: the chain reports why)."""
    try:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
    except OSError:
        return None
    return hashlib.sha256(data).hexdigest()


class IndexCache:
    """Index entries of raw images, by the SHA-256 of their bytes, in one file per searcher
    identity (:meth:`Searcher.identity`: model, detector, chain settings):
    ``{folder}/{identity}.npz``. An entry is an image's embedding (dual encoder) or, for a
    matcher-only model, the item the matcher reads (region features, tag text, image id). No
    pickle: plain arrays, read with ``allow_pickle=False``; written to a temporary file and
    renamed, so a reader never sees half a file. A file that cannot be read is rebuilt."""

    VERSION = 1

    def __init__(self, folder: Path | str, identity: str):
        self.path = Path(folder) / f"{identity}.npz"

    def load(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as z:
                keys = [str(k) for k in z["sha256"]]
                if "embedding" in z:
                    return dict(zip(keys, z["embedding"]))
                feats, offsets, tags, ids = z["features"], z["offsets"], z["tags"], z["image_id"]
                return {key: {"image_id": int(ids[k]), "tags": str(tags[k]),
                              "features": torch.from_numpy(feats[offsets[k]:offsets[k + 1]].copy())}
                        for k, key in enumerate(keys)}
        except (OSError, ValueError, KeyError) as e:
            log.warning("image index cache %s is unreadable (%s): indexing again", self.path, e)
            return {}

    def save(self, entries: dict) -> None:
        keys = list(entries)
        arrays: dict[str, np.ndarray] = {"sha256": np.asarray(keys, dtype="U64")}
        values = [entries[k] for k in keys]
        if values and isinstance(values[0], dict):
            feats = [np.asarray(v["features"], np.float32) for v in values]
            arrays.update(features=np.concatenate(feats) if feats else np.zeros((0, 0), np.float32),
                          offsets=np.cumsum([0] + [len(f) for f in feats]), tags=np.asarray([v["tags"] for v in values]),
                          image_id=np.asarray([v["image_id"] for v in values], np.int64))
        else:
            arrays["embedding"] = np.asarray(values, np.float32)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, self.path)
