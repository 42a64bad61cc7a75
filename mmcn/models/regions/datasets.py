"""torch Datasets of the region-feature models, one per task (:class:`mmcn.data.datasets.PairDataset`
over an LMDB store): an image is its region features and tag text, no image bytes."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from mmcn.data.datasets import PairDataset, open_store
from mmcn.data.lmdb_store import LmdbStore

FIELDS = ("features", "regions")  # what the models read: no image bytes


def image_item(store: LmdbStore, index: int) -> dict:
    """``image_id``, ``features`` (n, 2054) float32 and ``tags`` (Chinese tag text) of one image."""
    rec = store.get(index, FIELDS)
    if rec.features is None:
        raise ValueError(f"{store.path} holds no region features; build it with --features")
    return {"image_id": rec.image_id, "features": torch.tensor(rec.features), "tags": rec.tag_text}


class RetrievalDataset(PairDataset):
    """Image-text retrieval: one item per (text, image) pair (a positive); the whole-split
    views for ranking are :meth:`image` (by position) and :meth:`text` (by position).

    Item: ``text_id``, ``text``, ``image_id``, ``features`` (n, 2054), ``tags``.
    """

    def image(self, index: int) -> dict:
        return image_item(self.store, index)


class CaptionDataset(RetrievalDataset):
    """Captioning: one item per (caption, image) pair for training, or with ``per_image``
    one item per image with all its reference captions (for generation and scoring).

    Item: ``image_id``, ``features`` (n, 2054) float32, ``tags`` (Chinese tag text), and
    ``text_id`` + ``caption``, or ``captions`` (list) when ``per_image``.
    """

    text_key = "caption"

    def __init__(self, store: LmdbStore | Path | str, per_image: bool = False):
        super().__init__(store)
        self.per_image = per_image
        self._refs: dict[int, list[int]] = defaultdict(list)  # image position -> its texts' positions
        for text_pos, image_pos in self._pairs.tolist():
            self._refs[image_pos].append(text_pos)

    def __len__(self) -> int:
        return len(self.store) if self.per_image else len(self._pairs)

    def __getitem__(self, i: int) -> dict:
        if self.per_image:
            return {**self.image(i), "captions": [self.store.text_str(t) for t in self._refs.get(i, [])]}
        return super().__getitem__(i)


class PretrainDataset(CaptionDataset):
    """Oscar+ pretraining: one item per (caption, image) pair (Oscar's corpus rows), with the
    image's tag text (Oscar's text b). The collator (:class:`mmcn.models.regions.inputs.PretrainCollator`)
    pollutes pairs with other pairs' texts through :meth:`pair_caption`, :meth:`pair_tags` and
    :meth:`pair_image_id` (every image's tag text is read once, here).

    Item: ``image_id``, ``features`` (n, 2054), ``tags``, ``text_id``, ``caption``.
    """

    def __init__(self, store: LmdbStore | Path | str):
        super().__init__(open_store(store))
        self._tags = [self.store.get(i, ("regions",)).tag_text for i in range(len(self.store))]
        self._image_ids = [int(i) for i in self.store.image_ids]

    def pair_caption(self, i: int) -> str:
        return self.store.text_str(int(self._pairs[i][0]))

    def pair_tags(self, i: int) -> str:
        return self._tags[int(self._pairs[i][1])]

    def pair_image_id(self, i: int) -> int:
        return self._image_ids[int(self._pairs[i][1])]
