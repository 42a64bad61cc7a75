"""The models' inference API, on items (dicts with ``features``, ``tags``, ``text``): caption
generation with its decoding settings, dual-encoder embeddings and cross-encoder match
scores. The evaluation stage, the training loop's validation and :mod:`mmcn.infer` all
call these, so a model gives one answer whichever of them runs it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from mmcn.models.factory import load_model
from mmcn.models.inputs import CaptionCollator, RetrievalCollator
from mmcn.models.runtime import autocast
from mmcn.models.tokenizer import detokenize, load_tokenizer


@dataclass(frozen=True)
class Decoding:
    """How captions are decoded (the ``caption.eval`` params)."""

    num_beams: int = 3           # 1: greedy
    max_length: int = 30
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @classmethod
    def of(cls, settings) -> "Decoding":
        """The decoding fields of any object that has them (e.g. an ``EvalConfig``)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


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

    @classmethod
    def from_dir(cls, model_dir: Path | str, decoding: Decoding = Decoding(),
                 device: str | torch.device = "cpu") -> "CaptionGenerator":
        return cls(*load_task_model(model_dir, "caption"), decoding, device)

    @torch.no_grad()
    def __call__(self, items: list[dict]) -> tuple[list[str], list[float]]:
        b, d, tok = self.collate(items), self.decoding, self.tok
        with autocast(self.device):
            ids, scores = self.model.generate(
                *(b[k].to(self.device) for k in ("tag_ids", "tag_mask", "img_feats", "img_mask")),
                cls_id=tok.cls_token_id, sep_id=tok.sep_token_id, mask_id=tok.mask_token_id, pad_id=tok.pad_token_id,
                num_beams=d.num_beams, max_length=d.max_length, length_penalty=d.length_penalty,
                no_repeat_ngram_size=d.no_repeat_ngram_size)
        return [detokenize(tok.decode(x)) for x in ids], [float(s) for s in scores]


class RetrievalEncoder:
    """A retrieval model + its tokenizer: unit-length embeddings of texts and of images
    (items with ``features`` and ``tags``), and the cross-encoder's match scores of
    (text, image) pairs."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model, self.tok = model.to(self.device).eval(), tokenizer
        self.collate = RetrievalCollator(tokenizer, model.config)

    @classmethod
    def from_dir(cls, model_dir: Path | str, device: str | torch.device = "cpu") -> "RetrievalEncoder":
        return cls(*load_task_model(model_dir, "retrieval"), device)

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

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
