"""Frozen-CLIP image embeddings of the LMDB splits, computed once per training run (ClipCap
trains its mapper on them, as ClipCap's parse_coco.py precomputes them: CLIP never trains),
and the (embedding, caption) pairs the ``clipcap`` task trains on.

A cache file (safetensors: ``embeddings`` float32 (N, dim), ``image_ids`` int64 (N,), in
store order) lives in the run's folder (:func:`mmcn.train.loop.train`), whose name hashes the
CLIP folder's content and the data: a resumed run reuses it, any change makes a new run.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmcn.data.lmdb_store import LmdbStore

log = logging.getLogger(__name__)


def _split_exists(store_path: Path) -> bool:
    return (store_path / "data.mdb").exists() or any(store_path.glob("shard-*"))


def cache_embeddings(clip_dir: Path | str, store_path: Path, out_file: Path, batch_size: int = 64,
                     device: str = "cpu") -> Path:
    """``out_file`` holding the CLIP image embedding of every image of ``store_path`` (kept when
    it is there and matches the store's images)."""
    from safetensors.torch import load_file, save_file

    from mmcn.models.pixels.clip import image_embeddings, load_clip

    store = LmdbStore(store_path)
    if out_file.is_file():
        found = load_file(str(out_file))
        if np.array_equal(found["image_ids"].numpy(), store.image_ids):
            return out_file
        log.warning("%s: does not match the images of %s; computing it again", out_file, store_path)
    model, _, processor = load_clip(clip_dir, device)
    start, parts = time.perf_counter(), []
    for first in range(0, len(store), batch_size):
        images = [store.get(i, ("image",)).image for i in range(first, min(first + batch_size, len(store)))]
        try:
            parts.append(image_embeddings(model, processor, images, batch_size=batch_size))
        except ValueError as e:  # names the image by its position in the batch: say which of the store
            raise ValueError(f"{store_path}: images {first}..{first + len(images) - 1}: {e}") from None
    embeddings = torch.cat(parts) if parts else torch.zeros(0, model.config.projection_dim)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f"{out_file.name}.{os.getpid()}.tmp")
    save_file({"embeddings": embeddings.contiguous(), "image_ids": torch.from_numpy(store.image_ids.copy())}, str(tmp))
    tmp.replace(out_file)
    log.info("CLIP image embeddings of %d %s images (%s) in %.1fs", len(store), store_path.name, clip_dir,
             time.perf_counter() - start)
    return out_file


def cache_splits(clip_dir: Path | str, lmdb_dir: Path, out_dir: Path, splits=("train", "valid")) -> dict[str, str]:
    """``{split: cache file}`` for the ``splits`` that ``lmdb_dir`` has (:func:`cache_embeddings`)."""
    return {split: str(cache_embeddings(clip_dir, Path(lmdb_dir) / split, Path(out_dir) / f"{split}.safetensors"))
            for split in splits if _split_exists(Path(lmdb_dir) / split)}


class EmbeddedCaptions(Dataset):
    """One item per (caption, image) pair of the store: ``embedding`` (the image's cached CLIP
    embedding), ``caption``, ``image_id``, ``text_id``."""

    def __init__(self, store: LmdbStore | Path | str, embeddings_file: Path | str):
        from safetensors.torch import load_file

        self.store = store if isinstance(store, LmdbStore) else LmdbStore(Path(store))
        found = load_file(str(embeddings_file))
        if not np.array_equal(found["image_ids"].numpy(), self.store.image_ids):
            raise ValueError(f"{embeddings_file}: its image ids are not those of {self.store.path}; delete it to "
                             "compute the embeddings again")
        self.embeddings = found["embeddings"]
        self._pairs = self.store.pair_positions

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, i: int) -> dict:
        text_pos, image_pos = self._pairs[i].tolist()
        return {"embedding": self.embeddings[image_pos], "caption": self.store.text_str(text_pos),
                "image_id": int(self.store.image_ids[image_pos]), "text_id": int(self.store.text_ids[text_pos])}
