"""torch Datasets over an LMDB store (:mod:`mmcn.data.lmdb_store`), one per task.

Items are plain dicts of tensors and strings; tokenization and padding belong to the
models' collators. Each dataset holds an :class:`LmdbStore` (opened lazily per process),
so it works with any number of DataLoader workers.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mmcn.data.lmdb_store import LmdbStore

FIELDS = ("features", "regions")  # what the models read: no image bytes


def _store(store: LmdbStore | Path | str) -> LmdbStore:
    return store if isinstance(store, LmdbStore) else LmdbStore(Path(store))


def _image_item(store: LmdbStore, index: int) -> dict:
    rec = store.get(index, FIELDS)
    if rec.features is None:
        raise ValueError(f"{store.path} holds no region features; build it with --features")
    return {"image_id": rec.image_id, "features": torch.tensor(rec.features), "tags": rec.tag_text}


class CaptionDataset(Dataset):
    """Captioning: one item per (caption, image) pair for training, or with ``per_image``
    one item per image with all its reference captions (for generation and scoring).

    Item: ``image_id``, ``features`` (n, 2054) float32, ``tags`` (Chinese tag text), and
    ``text_id`` + ``caption``, or ``captions`` (list) when ``per_image``.
    """

    def __init__(self, store: LmdbStore | Path | str, per_image: bool = False):
        self.store = _store(store)
        self.per_image = per_image
        self._pairs = self.store.pair_positions
        self._refs: dict[int, list[int]] = defaultdict(list)  # image position -> its texts' positions
        for text_pos, image_pos in self._pairs.tolist():
            self._refs[image_pos].append(text_pos)

    def __len__(self) -> int:
        return len(self.store) if self.per_image else len(self.store.pairs)

    def __getitem__(self, i: int) -> dict:
        if self.per_image:
            item = _image_item(self.store, i)
            item["captions"] = [self.store.text_str(t) for t in self._refs.get(i, [])]
            return item
        text_pos, image_pos = self._pairs[i].tolist()
        item = _image_item(self.store, image_pos)
        item.update(text_id=int(self.store.text_ids[text_pos]), caption=self.store.text_str(text_pos))
        return item


class RetrievalDataset(Dataset):
    """Image-text retrieval: one item per (text, image) pair (a positive); the whole-split
    views for ranking are :meth:`image` (by position) and :meth:`text` (by position).

    Item: ``text_id``, ``text``, ``image_id``, ``features`` (n, 2054), ``tags``.
    """

    def __init__(self, store: LmdbStore | Path | str):
        self.store = _store(store)
        self._pairs = self.store.pair_positions

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, i: int) -> dict:
        text_pos, image_pos = self._pairs[i].tolist()
        item = _image_item(self.store, image_pos)
        item.update(text_id=int(self.store.text_ids[text_pos]), text=self.store.text_str(text_pos))
        return item

    @property
    def num_texts(self) -> int:
        return self.store.num_texts

    @property
    def num_images(self) -> int:
        return len(self.store)

    def image(self, index: int) -> dict:
        return _image_item(self.store, index)

    def text(self, index: int) -> dict:
        t = self.store.text_at(index)
        return {"text_id": t.text_id, "text": t.text, "image_ids": t.image_ids}


class PretrainDataset(Dataset):
    """Oscar+ pretraining: one item per (caption, image) pair (Oscar's corpus rows), with the
    image's tag text (Oscar's text b). The collator (:class:`mmcn.models.inputs.PretrainCollator`)
    pollutes pairs with other pairs' texts through :meth:`pair_caption`, :meth:`pair_tags` and
    :meth:`pair_image_id` (every image's tag text is read once, here).

    Item: ``image_id``, ``features`` (n, 2054), ``tags``, ``text_id``, ``caption``.
    """

    def __init__(self, store: LmdbStore | Path | str):
        self.store = _store(store)
        self._pairs = self.store.pair_positions
        self._tags = [self.store.get(i, ("regions",)).tag_text for i in range(len(self.store))]
        self._image_ids = [int(i) for i in self.store.image_ids]

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, i: int) -> dict:
        text_pos, image_pos = self._pairs[i].tolist()
        item = _image_item(self.store, image_pos)
        item.update(text_id=int(self.store.text_ids[text_pos]), caption=self.store.text_str(text_pos))
        return item

    def pair_caption(self, i: int) -> str:
        return self.store.text_str(int(self._pairs[i][0]))

    def pair_tags(self, i: int) -> str:
        return self._tags[int(self._pairs[i][1])]

    def pair_image_id(self, i: int) -> int:
        return self._image_ids[int(self._pairs[i][1])]


class ClipDataset(Dataset):
    """Contrastive pairs on pixels (Chinese-CLIP): one item per (text, image) pair with the
    image's original bytes; :meth:`image` and :meth:`text` (by position) are the whole-split
    views for ranking, as :class:`RetrievalDataset`'s.

    Item: ``text_id``, ``text``, ``image_id``, ``image`` (bytes as stored).
    """

    def __init__(self, store: LmdbStore | Path | str):
        self.store = _store(store)
        self._pairs = self.store.pair_positions

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, i: int) -> dict:
        text_pos, image_pos = self._pairs[i].tolist()
        return {**self.image(image_pos), "text_id": int(self.store.text_ids[text_pos]),
                "text": self.store.text_str(text_pos)}

    @property
    def num_texts(self) -> int:
        return self.store.num_texts

    @property
    def num_images(self) -> int:
        return len(self.store)

    def image(self, index: int) -> dict:
        rec = self.store.get(index, ("image",))
        return {"image_id": rec.image_id, "image": rec.image}

    def text(self, index: int) -> dict:
        t = self.store.text_at(index)
        return {"text_id": t.text_id, "text": t.text, "image_ids": t.image_ids}
