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

Checksums (schema 2): every value but ``meta`` ends in the 8-byte XXH3-64 (LE) of the bytes
before it, seeded with its place (:func:`record_seed`: database and position, or the main
record's name), so a changed byte and a record moved to another key are both caught;
``meta`` stays plain JSON (any mmcn can read its schema version) and its digest is the
main record ``meta.xxh3``. :class:`LmdbStore` checks every record it reads and raises
:class:`LmdbCorruptError` naming the store, split and key (``verify=False`` skips the
checks: they cost about 3.5 us per whole training sample, ~15% of bench/lmdb_bench.py's
random-read rate, 45k against 54k samples/s, far above what training consumes);
:func:`verify_store` (``mmcn verify-lmdb``) checks every record and LMDB's page structure.
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
import xxhash

from mmcn.data import tsv
from mmcn.data.tags import tag_text

SCHEMA_VERSION = 2  # 2: an XXH3-64 after every value (1: none)
DBS = ("images", "regions", "features", "texts")
MAIN = ("image_ids", "text_ids", "text_pairs", "pairs")  # main-database records besides meta
META_DIGEST = b"meta.xxh3"
DIGEST_BYTES = 8
TEXT_BLOCK = 256  # texts per record of the texts database
REBUILD = "rebuild it: `dvc repro -f lmdb` (or `mmcn build-lmdb`)"
_DIGEST = struct.Struct("<Q")


class LmdbStoreError(ValueError):
    """A store this mmcn cannot read (missing, another schema version); says what to rerun."""


class LmdbCorruptError(LmdbStoreError):
    """A record whose bytes are not those written (its checksum differs), or that is missing."""


def position_key(position: int) -> bytes:
    """The key of a record: its position, big-endian uint32 (so appends go in key order)."""
    return position.to_bytes(4, "big")


def record_seed(db: str | bytes, position: int = 0) -> int:
    """The XXH3 seed of a record: its database and position (named databases) or its name
    (main database), so that the digest binds the value to its key."""
    if isinstance(db, bytes):
        return xxhash.xxh3_64_intdigest(db)
    return (DBS.index(db) + 1) << 32 | position


def seal(value: bytes | memoryview, seed: int) -> bytes:
    """``value`` followed by its checksum: the bytes stored."""
    return bytes(value) + _DIGEST.pack(xxhash.xxh3_64_intdigest(value, seed))


def _unseal(stored, seed: int, verify: bool = True):
    """The value of stored bytes (a view when ``stored`` is one), or None when its checksum
    does not match (or it is too short to hold one)."""
    end = len(stored) - DIGEST_BYTES
    if end < 0:
        return None
    value = stored[:end]
    if verify and xxhash.xxh3_64_intdigest(value, seed) != _DIGEST.unpack_from(stored, end)[0]:
        return None
    return value


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


def read_meta(txn, where: Path) -> dict:
    """A shard's checked metadata: raises :class:`LmdbStoreError` for another schema version
    (saying what to rerun) and :class:`LmdbCorruptError` for a damaged one."""
    raw, digest = txn.get(b"meta"), txn.get(META_DIGEST)
    if raw is None:
        raise LmdbCorruptError(f"{where}: no meta record, so not an mmcn LMDB store (or a damaged one); {REBUILD}")
    intact = digest is not None and len(digest) == DIGEST_BYTES and \
        _DIGEST.unpack(bytes(digest))[0] == xxhash.xxh3_64_intdigest(raw, record_seed(b"meta"))
    corrupt = LmdbCorruptError(f"{where}: record meta is corrupt (checksum mismatch); {REBUILD}")
    if digest is not None and not intact:
        raise corrupt
    try:
        meta = json.loads(bytes(raw))
        version = meta["schema_version"]
    except (ValueError, KeyError, TypeError):
        raise corrupt from None
    if version != SCHEMA_VERSION:  # schema 1 had no digest
        built = "an older mmcn" if isinstance(version, int) and version < SCHEMA_VERSION else "another mmcn"
        raise LmdbStoreError(f"{where}: schema version {version} (built by {built}), this mmcn reads {SCHEMA_VERSION} "
                             f"(a checksum after every record); {REBUILD}")
    if not intact:
        raise corrupt
    return meta


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

    def __init__(self, path: Path, verify: bool = True):
        """``verify``: check the checksum of every record read (the metadata and id arrays
        are always checked, once, here)."""
        self.path = Path(path)
        self.verify = verify
        self._dirs = _shard_dirs(self.path)
        self._pid: int | None = None
        self._handles: list | None = None
        self.metas, ids = [], []
        for k in range(len(self._dirs)):
            _, _, txn = self._env(k)
            meta = read_meta(txn, self._dirs[k])
            self.metas.append(meta)
            ids.append(np.frombuffer(self._main(txn, k, b"image_ids"), dtype="<i8"))
            if k == 0:
                self.text_ids = np.frombuffer(self._main(txn, k, b"text_ids"), dtype="<i8")
                self._text_pairs = np.frombuffer(self._main(txn, k, b"text_pairs"), dtype="<i8")
                self.pairs = np.frombuffer(self._main(txn, k, b"pairs"), dtype="<i8").reshape(-1, 2)
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

    def _main(self, txn, shard: int, name: bytes):
        value = txn.get(name)
        value = None if value is None else _unseal(value, record_seed(name))
        if value is None:
            raise self._corrupt(shard, name.decode())
        return value

    def _record(self, txn, dbs: dict, shard: int, db: str, position: int, item: str, item_id: int):
        """Record ``position`` of ``db`` in ``shard`` without its checksum (checked unless
        ``verify`` is off): a view of the map. ``item``, ``item_id``: what it holds, for errors."""
        stored = txn.get(position_key(position), db=dbs[db])
        value = None if stored is None else _unseal(stored, record_seed(db, position), self.verify)
        if value is None:
            raise self._corrupt(shard, f"{db}[{position}] ({item} {item_id})", missing=stored is None)
        return value

    def _corrupt(self, shard: int, key: str, missing: bool = False) -> LmdbCorruptError:
        where = self._dirs[shard]
        split = self.metas[0]["split"] if getattr(self, "metas", None) else self.path.name
        problem = "is missing" if missing else "is corrupt (checksum mismatch)"
        return LmdbCorruptError(f"{where}: split {split}: record {key} {problem}; the store is damaged, {REBUILD}")

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
        local = index - self._starts[shard]
        rec = ImageRecord(int(self.image_ids[index]))
        if "image" in fields:
            rec.image = bytes(self._record(txn, dbs, shard, "images", local, "image", rec.image_id))
        if "features" in fields and self.feature_dim:
            rec.features = np.frombuffer(self._record(txn, dbs, shard, "features", local, "image", rec.image_id),
                                         dtype="<f4").reshape(-1, self.feature_dim)
        if "regions" in fields and self.feature_dim:
            r = msgpack.unpackb(self._record(txn, dbs, shard, "regions", local, "image", rec.image_id))
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
        block = self._record(txn, dbs, 0, "texts", index // TEXT_BLOCK, "text block of text", self.text_ids[index])
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


# --------------------------------------------------------------------------- verifying

@dataclass
class StoreProblem:
    """One bad record (or page) found by :func:`verify_store`."""

    where: Path      # the environment (a split folder or one of its shards)
    split: str
    key: str         # "images[3] (image 1035)", "meta", "pages"
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: split {self.split}: {self.key}: {self.problem}"


def split_dirs(path: Path) -> list[Path]:
    """The split stores under ``path``: ``path`` itself when it is one (``data.mdb`` or
    ``shard-*``), else its subfolders that are; raises FileNotFoundError when none."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    if (path / "data.mdb").is_file() or any(path.glob("shard-*/data.mdb")):
        return [path]
    splits = sorted(p for p in path.iterdir() if p.is_dir() and ((p / "data.mdb").is_file() or any(p.glob("shard-*/data.mdb"))))
    if not splits:
        raise FileNotFoundError(f"{path}: no LMDB store here (neither a split folder with data.mdb or shard-*/ nor a "
                                "folder of them); run the lmdb stage (or `mmcn build-lmdb`)")
    return splits


def verify_store(path: Path, structure: bool = True) -> tuple[dict, list[StoreProblem]]:
    """Check every record of every split under ``path`` (see :func:`split_dirs`) against its
    checksum, that every position the metadata counts is there (and nothing else), and, with
    ``structure``, LMDB's own page structure first (``lmdb.verify``: a shard whose pages are
    damaged is not opened, as the engine may crash on it).

    Returns ``({split: {"shards", "records"}}, problems)``; raises FileNotFoundError when
    there is no store.
    """
    summary, problems = {}, []
    for split_dir in split_dirs(path):
        counted = summary.setdefault(split_dir.name, {"shards": 0, "records": 0})
        for shard_dir in _shard_dirs(split_dir):
            counted["shards"] += 1
            counted["records"] += _verify_shard(shard_dir, split_dir.name, structure, problems)
    return summary, problems


def _verify_shard(where: Path, split: str, structure: bool, problems: list[StoreProblem]) -> int:
    """Records checked in one environment; appends what is wrong to ``problems``."""
    def bad(key: str, problem: str) -> None:
        problems.append(StoreProblem(where, split, key, problem))

    if structure:
        from lmdb import verify as lmdb_verify  # only here: readers do not need it

        try:
            pages = lmdb_verify.verify(str(where))
        except (lmdb_verify.VerifyError, OSError) as e:
            pages = [str(e)]
        if pages:
            for p in pages:
                bad("pages", f"LMDB structure: {p}")
            return 0
    try:
        env, dbs, _ = _open_readonly(where)
    except lmdb.Error as e:  # a database missing, say
        bad("pages", f"LMDB cannot open it: {e}")
        return 0
    with env.begin(buffers=True) as txn:  # a fresh snapshot, not the one readers of this process share
        return _verify_records(where, split, txn, dbs, bad)


def _verify_records(where: Path, split: str, txn, dbs: dict, bad) -> int:
    try:
        meta = read_meta(txn, where)
    except LmdbStoreError as e:
        bad("meta", str(e).removeprefix(f"{where}: "))
        return 0
    checked, arrays = 1, {}
    for name in MAIN:
        stored = txn.get(name.encode())
        value = None if stored is None else _unseal(stored, record_seed(name.encode()))
        checked += 1
        if value is None:
            bad(name, "missing" if stored is None else "checksum mismatch")
        else:
            arrays[name] = np.frombuffer(value, dtype="<i8")
    counts = meta.get("counts", {})
    image_ids = arrays.get("image_ids")
    text_ids = arrays.get("text_ids")
    expected = {"images": counts.get("images", 0), "texts": -(-counts.get("texts", 0) // TEXT_BLOCK)}
    if meta.get("feature_dim"):
        expected["features"] = expected["regions"] = expected["images"]

    def label(db: str, position: int) -> str:
        ids, item, k = (text_ids, "text", position * TEXT_BLOCK) if db == "texts" else (image_ids, "image", position)
        return f"{db}[{position}]" + (f" ({item} {int(ids[k])})" if ids is not None and k < len(ids) else "")

    for db in DBS:
        n, seen = expected.get(db, 0), 0
        try:
            with txn.cursor(db=dbs[db]) as cursor:
                for key, stored in cursor:
                    checked += 1
                    position = int.from_bytes(key, "big") if len(key) == 4 else -1
                    if not 0 <= position < n:
                        bad(f"{db}[key {bytes(key).hex()}]", f"a record the metadata does not count ({n} records)")
                        continue
                    seen += 1
                    if _unseal(stored, record_seed(db, position)) is None:
                        bad(label(db, position), "checksum mismatch")
        except lmdb.Error as e:
            bad(db, f"LMDB cannot read it: {e}")
            continue
        if seen < n:
            with txn.cursor(db=dbs[db]) as cursor:
                present = {int.from_bytes(k, "big") for k in cursor.iternext(keys=True, values=False) if len(k) == 4}
            for position in (p for p in range(n) if p not in present):
                bad(label(db, position), "missing")
    return checked
