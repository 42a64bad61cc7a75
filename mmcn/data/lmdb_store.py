"""The LMDB store's format and its reader (:class:`LmdbStore`); the builder is
:mod:`mmcn.data.lmdb_build`. One LMDB environment per split (optionally sharded) holds
everything training reads, without pickle.

Built from a Chinese-CLIP folder (``{split}_imgs.tsv`` + ``{split}_texts.jsonl``), the
region-feature shards and the Chinese tags (:mod:`mmcn.data.tags`). Layout of
``{root}/{split}/`` (one env) or ``{root}/{split}/shard-{k:05d}/`` (``shards`` > 1; images
cut into contiguous ranges, texts and pairs in shard 0). Inside an env, named databases
whose keys are the big-endian uint32 position (so writes append in key order):

=============  ==========================================================================
``images``     the original image file bytes (not base64)
``regions``    msgpack map: ``width``, ``height``, ``num_boxes``, ``boxes`` (float32 LE n×4
               bytes, pixels), ``classes``, ``conf`` (float32 bytes), ``attributes``,
               ``objects_zh``, ``attributes_zh``, ``tags`` (per box, box order)
``features``   float32 LE n × ``feature_dim`` bytes (2054: 2048 pooled + 6 box values)
``texts``      the texts in blocks of 256 (key: block number): u32 LE offsets, then UTF-8
=============  ==========================================================================

and in the main database: ``meta`` (JSON: schema version, split, shard, counts, feature
dim, XXH3-128 and size of every source file), ``image_ids`` / ``text_ids`` (int64 LE arrays in
position order), ``pairs`` (int64 LE ``(text_id, image_id)`` rows, grouped by text) and
``text_pairs`` (int64 LE: text k's pairs are rows ``text_pairs[k]:text_pairs[k+1]``).
Images are stored in the order of ``{split}_imgs.tsv``, texts in that of the texts file.
"""
from __future__ import annotations

import bisect
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import lmdb
import msgpack
import numpy as np

from mmcn.data import tsv
from mmcn.data.tags import tag_text

SCHEMA_VERSION = 1
DBS = ("images", "regions", "features", "texts")
TEXT_BLOCK = 256  # texts per record of the texts database


def position_key(position: int) -> bytes:
    """The key of a record: its position, big-endian uint32 (so appends go in key order)."""
    return position.to_bytes(4, "big")


@dataclass
class ImageRecord:
    """One stored image; fields not asked for stay ``None``. ``features`` is a read-only
    view of the memory-mapped store (``.copy()`` it to write into it)."""

    image_id: int
    image: bytes | None = None
    features: np.ndarray | None = None          # (n, feature_dim) float32
    width: int = 0
    height: int = 0
    boxes: np.ndarray | None = None             # (n, 4) float32, pixels
    classes: list[str] | None = None
    conf: np.ndarray | None = None
    attributes: list[list[str]] | None = None
    objects_zh: list[str] | None = None
    attributes_zh: list[list[str]] | None = None
    tags: list[str] | None = None

    @property
    def tag_text(self) -> str:
        return tag_text(self.tags or [])


def _shard_dirs(path: Path) -> list[Path]:
    if (path / "data.mdb").is_file():
        return [path]
    shards = sorted(p for p in path.glob("shard-*") if (p / "data.mdb").is_file())
    if not shards:
        raise FileNotFoundError(f"{path}: no LMDB store here; run the lmdb stage (or `mmcn build-lmdb`)")
    return shards


_OPEN: dict[tuple, tuple] = {}  # this process's read-only envs (py-lmdb allows one handle per env and process)
_OPEN_PID: list[int] = [0]


def _open_readonly(path: Path) -> tuple:
    """``(env, databases, txn)`` of a store shard, shared by every reader in this process.

    The store never changes once built, so one read transaction stays open for the life
    of the process and hands out zero-copy buffers. Keyed by the data file's inode, so a
    store rebuilt under the same path opens afresh; a forked DataLoader worker opens its own.
    """
    if _OPEN_PID[0] != os.getpid():
        _OPEN.clear()
        _OPEN_PID[0] = os.getpid()
    st = os.stat(path / "data.mdb")
    key = (str(path), st.st_dev, st.st_ino)
    if key not in _OPEN:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, max_dbs=len(DBS) + 1)
        dbs = {name: env.open_db(name.encode(), create=False) for name in DBS}
        _OPEN[key] = (env, dbs, env.begin(buffers=True))
    return _OPEN[key]


class LmdbStore:
    """Read access to one split's store: ``len`` (images), ``[i]`` by position, :meth:`by_id`,
    :meth:`text` / :meth:`text_at`, ``pairs`` (text_id, image_id) and ``pair_positions``
    (text position, image position). Environments open lazily in each process
    (``readonly=True, lock=False``) and are shared by the stores of that process, so a
    store can be handed to DataLoader workers (forked or spawned).
    """

    FIELDS = ("image", "features", "regions")

    def __init__(self, path: Path):
        self.path = Path(path)
        self._dirs = _shard_dirs(self.path)
        self._pid: int | None = None
        self._handles: list | None = None
        self.metas, ids = [], []
        for k in range(len(self._dirs)):
            _, _, txn = self._env(k)
            meta = json.loads(bytes(txn.get(b"meta")))
            if meta["schema_version"] != SCHEMA_VERSION:
                raise ValueError(f"{self._dirs[k]}: schema version {meta['schema_version']}, this mmcn reads "
                                 f"{SCHEMA_VERSION}; rebuild it with `mmcn build-lmdb`")
            self.metas.append(meta)
            ids.append(np.frombuffer(txn.get(b"image_ids"), dtype="<i8"))
            if k == 0:
                self.text_ids = np.frombuffer(txn.get(b"text_ids"), dtype="<i8")
                self._text_pairs = np.frombuffer(txn.get(b"text_pairs"), dtype="<i8")
                self.pairs = np.frombuffer(txn.get(b"pairs"), dtype="<i8").reshape(-1, 2)
        self.meta = self.metas[0]
        self.image_ids = np.concatenate(ids)
        self._starts = [int(v) for v in np.cumsum([0] + [len(a) for a in ids])]
        self.feature_dim = int(self.meta["feature_dim"])
        self._positions: dict[int, int] | None = None
        self._text_positions: dict[int, int] | None = None

    def _env(self, shard: int) -> tuple:
        if self._pid != os.getpid():  # first use in this process
            self._handles, self._pid = [None] * len(self._dirs), os.getpid()
        handle = self._handles[shard]
        if handle is None:
            handle = self._handles[shard] = _open_readonly(self._dirs[shard])
        return handle

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_positions": None, "_text_positions": None, "_handles": None, "_pid": None}

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_texts(self) -> int:
        return len(self.text_ids)

    @property
    def pair_positions(self) -> np.ndarray:
        """``pairs`` as (text position, image position) rows, for positional reads."""
        text_pos = np.repeat(np.arange(self.num_texts), np.diff(self._text_pairs))
        order = np.argsort(self.image_ids, kind="stable")
        image_pos = order[np.searchsorted(self.image_ids, self.pairs[:, 1], sorter=order)]
        return np.stack([text_pos, image_pos], axis=1)

    def gold_positions(self) -> tuple[list[list[int]], list[list[int]]]:
        """``(text_gold, image_gold)``: each text's image positions and each image's text
        positions (the gold lists of text->image and image->text recall)."""
        text_gold: list[list[int]] = [[] for _ in range(self.num_texts)]
        image_gold: list[list[int]] = [[] for _ in range(len(self))]
        for t, i in self.pair_positions.tolist():
            text_gold[t].append(i)
            image_gold[i].append(t)
        return text_gold, image_gold

    def index_of(self, image_id: int) -> int:
        if self._positions is None:
            self._positions = {int(i): k for k, i in enumerate(self.image_ids)}
        try:
            return self._positions[int(image_id)]
        except KeyError:
            raise KeyError(f"image {image_id} is not in {self.path}") from None

    def by_id(self, image_id: int, fields: Sequence[str] = FIELDS) -> ImageRecord:
        return self.get(self.index_of(image_id), fields)

    def __getitem__(self, index: int) -> ImageRecord:
        return self.get(index)

    def get(self, index: int, fields: Sequence[str] = FIELDS) -> ImageRecord:
        """Image ``index`` (store order) with the chosen ``fields``: image, features, regions."""
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range 0..{len(self) - 1} in {self.path}")
        shard = bisect.bisect_right(self._starts, index) - 1
        _, dbs, txn = self._env(shard)
        key = position_key(index - self._starts[shard])
        rec = ImageRecord(int(self.image_ids[index]))
        if "image" in fields:
            rec.image = bytes(txn.get(key, db=dbs["images"]))
        if "features" in fields and self.feature_dim:
            rec.features = np.frombuffer(txn.get(key, db=dbs["features"]), dtype="<f4").reshape(-1, self.feature_dim)
        if "regions" in fields and self.feature_dim:
            r = msgpack.unpackb(txn.get(key, db=dbs["regions"]))
            rec.width, rec.height = r["width"], r["height"]
            rec.boxes = np.frombuffer(r["boxes"], dtype="<f4").reshape(-1, 4)
            rec.conf = np.frombuffer(r["conf"], dtype="<f4")
            rec.classes, rec.attributes = r["classes"], r["attributes"]
            rec.objects_zh, rec.attributes_zh, rec.tags = r["objects_zh"], r["attributes_zh"], r["tags"]
        return rec

    def text(self, text_id: int) -> tsv.Text:
        if self._text_positions is None:
            self._text_positions = {int(i): k for k, i in enumerate(self.text_ids)}
        if int(text_id) not in self._text_positions:
            raise KeyError(f"text {text_id} is not in {self.path}")
        return self.text_at(self._text_positions[int(text_id)])

    def text_str(self, index: int) -> str:
        """The text at position ``index`` (just the string: the fast path for training)."""
        _, dbs, txn = self._env(0)
        block = txn.get(position_key(index // TEXT_BLOCK), db=dbs["texts"])
        start, end = struct.unpack_from("<2I", block, 4 * (index % TEXT_BLOCK))
        return str(block[start:end], "utf-8")

    def text_at(self, index: int) -> tsv.Text:
        if not 0 <= index < self.num_texts:
            raise IndexError(f"text index {index} out of range 0..{self.num_texts - 1} in {self.path}")
        images = self.pairs[self._text_pairs[index]:self._text_pairs[index + 1], 1]
        return tsv.Text(int(self.text_ids[index]), self.text_str(index), [int(i) for i in images])

    def texts(self) -> Iterator[tsv.Text]:
        for i in range(self.num_texts):
            yield self.text_at(i)
