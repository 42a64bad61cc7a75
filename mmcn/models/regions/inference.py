"""The models' inference API, on items (dicts with ``features``, ``tags``, ``text``): caption
generation with its decoding settings, dual-encoder embeddings and cross-encoder match
scores. The evaluation stage, the training loop's validation and :mod:`mmcn.infer` all
call these, so a model gives one answer whichever of them runs it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from mmcn.models.factory import load_model
from mmcn.models.regions.inputs import CaptionCollator, RetrievalCollator
from mmcn.models.runtime import autocast
from mmcn.models.tokenizer import detokenize, load_tokenizer

log = logging.getLogger(__name__)


DECODING_MODES = ("mmcn", "oscar")
_SETTING_NAMES = {"mode": "decoding"}  # a Decoding field -> its name in caption.eval / EvalConfig, where they differ


@dataclass(frozen=True)
class Decoding:
    """How captions are decoded (the ``caption.eval`` params).

    ``mode`` (``caption.eval.decoding``): ``"mmcn"``, this project's search
    (:meth:`~mmcn.models.regions.caption.CaptionModel.generate`: [PAD]/[CLS]/[MASK] banned, optional
    n-gram block, finished beams keep their slot; ``max_length`` = caption tokens, the [SEP]
    not counted), or ``"oscar"``, microsoft/Oscar's search rule for rule
    (:meth:`~mmcn.models.regions.caption.CaptionModel.generate_oscar`): ``max_length`` is then Oscar's
    ``max_gen_length``, which counts [CLS] and the closing [SEP] (at most ``max_length - 2``
    caption tokens; Oscar's default and its README's setting: 20), ``no_repeat_ngram_size``
    is not used (Oscar has no such rule) and greedy ignores ``length_penalty`` as Oscar does.
    """

    num_beams: int = 3           # 1: greedy
    max_length: int = 30
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    mode: str = "mmcn"           # mmcn | oscar

    def __post_init__(self):
        if self.mode not in DECODING_MODES:
            raise ValueError(f"decoding {self.mode!r}: expected one of {', '.join(DECODING_MODES)} "
                             "(caption.eval.decoding in params.yaml, --decoding of `mmcn caption`)")

    @classmethod
    def of(cls, settings) -> "Decoding":
        """The decoding fields of any object that has them (e.g. an ``EvalConfig``; ``mode`` is
        its ``decoding``)."""
        return cls(**{f.name: getattr(settings, _SETTING_NAMES.get(f.name, f.name)) for f in fields(cls)})

    @classmethod
    def of_params(cls, section: dict) -> "Decoding":
        """From a ``caption.eval`` params section; keys it lacks keep the defaults."""
        return cls(**{f.name: section[key] for f in fields(cls)
                      if (key := _SETTING_NAMES.get(f.name, f.name)) in section})


def load_task_model(model_dir: Path | str, task: str):
    """``(model, tokenizer)`` of a saved model folder, which must hold a ``task`` model."""
    found, model = load_model(model_dir)
    if found != task:
        raise ValueError(f"{model_dir} holds a {found} model, not a {task} model")
    return model, load_tokenizer(model_dir)


class CaptionGenerator:
    """A caption model + its tokenizer: items (``features``, ``tags``) -> (captions, scores)."""

    def __init__(self, model, tokenizer, decoding: Decoding = Decoding(), device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model, self.tok, self.decoding = model.to(self.device).eval(), tokenizer, decoding
        self.collate = CaptionCollator(tokenizer, model.config, train=False)
        if decoding.mode == "oscar" and decoding.no_repeat_ngram_size:
            log.warning("decoding oscar: no_repeat_ngram_size %d is not used (Oscar blocks no n-grams)",
                        decoding.no_repeat_ngram_size)

    @classmethod
    def from_dir(cls, model_dir: Path | str, decoding: Decoding = Decoding(),
                 device: str | torch.device = "cpu") -> "CaptionGenerator":
        return cls(*load_task_model(model_dir, "caption"), decoding, device)

    @torch.no_grad()
    def __call__(self, items: list[dict]) -> tuple[list[str], list[float]]:
        b, d, tok = self.collate(items), self.decoding, self.tok
        inputs = [b[k].to(self.device) for k in ("tag_ids", "tag_mask", "img_feats", "img_mask")]
        special = {"cls_id": tok.cls_token_id, "sep_id": tok.sep_token_id, "mask_id": tok.mask_token_id,
                   "pad_id": tok.pad_token_id}
        with autocast(self.device):
            if d.mode == "oscar":
                ids, scores = self.model.generate_oscar(*inputs, **special, num_beams=d.num_beams,
                                                        max_gen_length=d.max_length, length_penalty=d.length_penalty)
            else:
                ids, scores = self.model.generate(*inputs, **special, num_beams=d.num_beams, max_length=d.max_length,
                                                  length_penalty=d.length_penalty,
                                                  no_repeat_ngram_size=d.no_repeat_ngram_size)
        # Oscar's text drops the special tokens its search may emit (tokenizer.decode(skip_special_tokens=True))
        skip = d.mode == "oscar"
        return [detokenize(tok.decode(x, skip_special_tokens=skip)) for x in ids], [float(s) for s in scores]


class RetrievalEncoder:
    """A retrieval model + its tokenizer: unit-length embeddings of texts and of images
    (items with ``features`` and ``tags``), and the cross-encoder's match scores of
    (text, image) pairs. A model without a dual encoder (:attr:`dual_encoder` False, as
    Oscar's retrieval checkpoints) has only the match scores."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model, self.tok = model.to(self.device).eval(), tokenizer
        self.collate = RetrievalCollator(tokenizer, model.config)

    @classmethod
    def from_dir(cls, model_dir: Path | str, device: str | torch.device = "cpu") -> "RetrievalEncoder":
        return cls(*load_task_model(model_dir, "retrieval"), device)

    @property
    def dual_encoder(self) -> bool:
        """Whether the model embeds texts and images (False: an Oscar-style matcher only,
        which ranks by scoring every pair with :meth:`match`)."""
        return getattr(self.model.config, "dual_encoder", True)

    @property
    def dim(self) -> int:
        """The embedding size; 0 for a matcher-only model (it has no embeddings)."""
        return self.model.config.embed_dim if self.dual_encoder else 0

    def _inputs(self, items: list[dict], keys: tuple[str, ...]) -> list[torch.Tensor]:
        b = self.collate(items)
        return [b[k].to(self.device) for k in keys]

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> np.ndarray:
        with autocast(self.device):
            out = self.model.encode_text(*self._inputs([{"text": t, "text_id": 0} for t in texts],
                                                       ("text_ids", "text_mask")))
        return out.float().cpu().numpy()

    @torch.no_grad()
    def images(self, items: list[dict]) -> np.ndarray:
        with autocast(self.device):
            out = self.model.encode_image(*self._inputs(items, ("image_tag_ids", "image_tag_mask", "img_feats",
                                                                "img_mask")))
        return out.float().cpu().numpy()

    @torch.no_grad()
    def match(self, items: list[dict]) -> np.ndarray:
        """log P(match) of each item holding a ``text`` and an image (``features``, ``tags``)."""
        with autocast(self.device):
            out = self.model.match_score(*self._inputs(items, ("text_ids", "text_mask", "tag_ids", "tag_mask",
                                                               "img_feats", "img_mask")))
        return out.float().cpu().numpy()


class PairedItems(Protocol):
    """Texts and images by position (e.g. :class:`mmcn.data.datasets.RetrievalDataset`)."""

    num_texts: int
    num_images: int

    def text(self, index: int) -> dict: ...

    def image(self, index: int) -> dict: ...


def _batched(n: int, get, encode, batch_size: int, dim: int) -> np.ndarray:
    out = [encode([get(i) for i in range(first, min(first + batch_size, n))]) for first in range(0, n, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def embed_texts(encoder: RetrievalEncoder, data: PairedItems, batch_size: int = 64) -> np.ndarray:
    """Embeddings of every text of ``data``, by position."""
    return _batched(data.num_texts, data.text, lambda items: encoder.texts([it["text"] for it in items]),
                    batch_size, encoder.dim)


def embed_images(encoder: RetrievalEncoder, data: PairedItems, batch_size: int = 64) -> np.ndarray:
    """Embeddings of every image of ``data``, by position."""
    return _batched(data.num_images, data.image, encoder.images, batch_size, encoder.dim)
