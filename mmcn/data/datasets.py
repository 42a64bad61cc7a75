"""What every task's torch Dataset shares: (text, image) pairs over an LMDB store
(:mod:`mmcn.data.lmdb_store`), with the whole-split views for ranking. The datasets
themselves live with their model family (:mod:`mmcn.models.regions.datasets`: region
features; :mod:`mmcn.models.pixels.datasets`: image bytes), which says what an image item
holds.

Items are plain dicts of tensors and strings; tokenization and padding belong to the
models' collators. Each dataset holds an :class:`LmdbStore` (opened lazily per process),
so it works with any number of DataLoader workers.
"""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from mmcn.data.lmdb_store import LmdbStore


def open_store(store: LmdbStore | Path | str) -> LmdbStore:
    return store if isinstance(store, LmdbStore) else LmdbStore(Path(store))


class PairDataset(Dataset):
    """One item per (text, image) pair of the store (a positive): the image's item
    (:meth:`image`, by position) with ``text_id`` and the text under ``text_key``. :meth:`text`
    (by position) and :meth:`image` are the whole-split views for ranking."""

    text_key = "text"

    def __init__(self, store: LmdbStore | Path | str):
        self.store = open_store(store)
        self._pairs = self.store.pair_positions

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, i: int) -> dict:
        text_pos, image_pos = self._pairs[i].tolist()
        return {**self.image(image_pos), "text_id": int(self.store.text_ids[text_pos]),
                self.text_key: self.store.text_str(text_pos)}

    @property
    def num_texts(self) -> int:
        return self.store.num_texts

    @property
    def num_images(self) -> int:
        return len(self.store)

    def image(self, index: int) -> dict:
        raise NotImplementedError

    def text(self, index: int) -> dict:
        t = self.store.text_at(index)
        return {"text_id": t.text_id, "text": t.text, "image_ids": t.image_ids}
