"""torch Datasets of the pixel models (:class:`mmcn.data.datasets.PairDataset` over an LMDB
store): an image is its original file bytes as stored, decoded by the model's processor."""
from __future__ import annotations

from pathlib import Path

from mmcn.data.datasets import PairDataset, open_store
from mmcn.data.lmdb_store import LmdbStore


class ClipDataset(PairDataset):
    """Contrastive pairs on pixels (Chinese-CLIP): one item per (text, image) pair with the
    image's original bytes; :meth:`image` and :meth:`text` (by position) are the whole-split
    views for ranking.

    Item: ``text_id``, ``text``, ``image_id``, ``image`` (bytes as stored).
    """

    def image(self, index: int) -> dict:
        rec = self.store.get(index, ("image",))
        return {"image_id": rec.image_id, "image": rec.image}


class StoredImages:
    """Each image's stored bytes by position (what a ClipCap generator captions)."""

    def __init__(self, store: LmdbStore | Path | str):
        self.store = open_store(store)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> bytes:
        return self.store.get(index, ("image",)).image
