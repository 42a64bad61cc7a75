"""Building the LMDB store (format: :mod:`mmcn.data.lmdb_store`, which also reads it) from
a Chinese-CLIP folder, the region-feature shards and the Chinese tags.

A build writes into ``{out}.tmp-{pid}`` and puts it in place of ``out`` only when every
split is complete, in one atomic step where the filesystem can swap two names
(``renameat2(RENAME_EXCHANGE)``, Linux), else by renaming the old store aside
(``{out}.old-{pid}``) and the new one in; the old one is deleted last. So a killed build
leaves no half-written store under the final name, and the next build removes what a dead
build left (its pid is gone) and puts an old store left aside back. One build at a time
per output: ``{out}.lock`` (``flock``, holding the builder's pid, deleted when done); a
second build to the same output fails at once naming that pid (:class:`LmdbBusyError`).
Builds are byte-reproducible: the same inputs and settings give the same bytes in every
file (pages zero-filled, no lock file, no timings in the report: those go to the log). The
map starts at ``map_size_mb`` and doubles on ``MapFullError``. Before writing, the
inputs are checked: duplicate image or text ids are an error; images without features
or tags, and pairs whose image is not stored, are left out and reported (an error with
``strict``). Shards are written in parallel, one thread each (``workers`` at once): LMDB
and base64 decoding release the GIL, so a sharded build uses every core, where one
environment has one writer.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import lmdb
import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from mmcn.data import features as region_features
from mmcn.data import tsv
from mmcn.data.chain import read_chain
from mmcn.data.lmdb_store import (DBS, DIGEST_BYTES, META_DIGEST, SCHEMA_VERSION, TEXT_BLOCK, position_key,
                                  record_seed, seal, split_dirs)
from mmcn.data.outputs import pid_alive
from mmcn.data.tags import ImageTags, read_tags, tags_path
from mmcn.logs import Progress
from mmcn.provenance import checksum

log = logging.getLogger(__name__)

REPORT = "lmdb_report.json"
M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD = -1, 128 * 1024  # glibc's mallopt parameter and its default


class LmdbBuildError(ValueError):
    """The inputs cannot make a consistent store (message names the file and records)."""


class LmdbBusyError(LmdbBuildError):
    """Another process is building the same output (message names its pid and the lock)."""


class LmdbWriteError(LmdbBuildError):
    """The output cannot be written: disk full, over quota, read-only (message says where)."""


INT64 = (-(1 << 63), (1 << 63) - 1)


@dataclass(frozen=True)
class LmdbConfig:
    shards: int = 1             # LMDB environments per split (images cut into contiguous ranges)
    strict: bool = False        # any left-out image or pair fails the build
    map_size_mb: int = 64       # initial map size; doubles whenever it fills up
    commit_bytes_mb: int = 4    # one write transaction per this much data (small ones reuse their memory)
    workers: int = 0            # shards written at once, one thread each (0: one per core)

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        if self.map_size_mb < 1 or self.commit_bytes_mb < 1:
            raise ValueError("map_size_mb and commit_bytes_mb must be >= 1")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: one per core), got {self.workers}")


# --------------------------------------------------------------------------- writing

class _EnvWriter:
    """Appends records to one env in batches; grows the map on MapFullError."""

    def __init__(self, path: Path, map_size: int, commit_bytes: int):
        path.mkdir(parents=True)
        # meminit: unused bytes of written pages zero-filled, not left as whatever the heap held
        # (builds byte-reproducible); lock=False: no lock.mdb (one writer thread, no readers)
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=len(DBS) + 1, sync=False, metasync=False,
                             readahead=False, meminit=True, lock=False)
        self.dbs = {name: self.env.open_db(name.encode()) for name in DBS}
        self.batch: dict[str, list[tuple[bytes, bytes]]] = {name: [] for name in DBS}
        self.pending = 0
        self.commit_bytes = commit_bytes
        self.grown = 0

    def put(self, db: str, position: int, value: bytes) -> None:
        self.batch[db].append((position_key(position), seal(value, record_seed(db, position))))
        self.pending += len(value)
        if self.pending >= self.commit_bytes:
            self.flush()

    def flush(self, main: dict[bytes, bytes] | None = None) -> None:
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for name, items in self.batch.items():
                        if items:
                            with txn.cursor(self.dbs[name]) as cur:
                                added, _ = cur.putmulti(items, append=True)
                            if added != len(items):
                                raise LmdbBuildError(f"{self.env.path()}: {name}: keys out of order")
                    for key, value in (main or {}).items():
                        txn.put(key, value)
                break
            except lmdb.MapFullError:
                size = self.env.info()["map_size"] * 2
                self.env.set_mapsize(size)
                self.grown += 1
                log.debug("%s: map full, grown to %d MiB", self.env.path(), size >> 20)
        self.batch = {name: [] for name in DBS}
        self.pending = 0

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()


@dataclass
class _Texts:
    """A texts file as arrays: ids, texts, and each text's image ids (CSR: ``starts``)."""

    ids: np.ndarray          # (n,) int64
    text_offsets: np.ndarray # (n + 1,) int64 offsets into text_data
    text_data: bytes         # every text's UTF-8, concatenated
    starts: np.ndarray       # (n + 1,) int64 offsets into image_ids
    image_ids: np.ndarray    # flat int64

    def select(self, keep: np.ndarray, image_keep: np.ndarray) -> "_Texts":
        """The texts where ``keep``, with only their image ids where ``image_keep``."""
        owner = np.repeat(np.arange(len(self.ids)), np.diff(self.starts))
        image_keep = image_keep & keep[owner]
        counts = np.bincount(owner[image_keep], minlength=len(self.ids))[keep]
        if keep.all():
            offsets, data = self.text_offsets, self.text_data
        else:
            spans = [(int(self.text_offsets[k]), int(self.text_offsets[k + 1])) for k in np.flatnonzero(keep)]
            data = b"".join(self.text_data[a:b] for a, b in spans)
            offsets = np.concatenate([[0], np.cumsum([b - a for a, b in spans])]).astype(np.int64)
        return _Texts(self.ids[keep], offsets, data, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                      self.image_ids[image_keep])


def _int64s(array: pa.Array) -> np.ndarray:
    """An int64 Arrow array without nulls as numpy, straight from its buffer (Arrow's own
    ``to_numpy`` imports pandas, which costs more than the whole build of a small split)."""
    return np.frombuffer(array.buffers()[1], dtype="<i8")[array.offset:array.offset + len(array)]


def _int32s(array: pa.Array) -> np.ndarray:
    return np.frombuffer(array.buffers()[1], dtype="<i4")[array.offset:array.offset + len(array)]


def _read_texts(path: Path) -> _Texts:
    """Parse a Chinese-CLIP texts file with Arrow's JSON reader; a malformed file is re-read
    line by line so that the error names the line."""
    if not path.is_file() or path.stat().st_size == 0:
        return _Texts(np.zeros(0, np.int64), np.zeros(1, np.int64), b"", np.zeros(1, np.int64), np.zeros(0, np.int64))
    try:
        table = pa_json.read_json(path)
        column = {name: table.column(name).combine_chunks() for name in ("text_id", "text", "image_ids")}
        if (column["text_id"].type != pa.int64() or column["text"].type != pa.string()
                or column["image_ids"].type != pa.list_(pa.int64()) or column["text_id"].null_count):
            raise TypeError("unexpected column types")
        ids = _int64s(column["text_id"])
        text, lists = column["text"], column["image_ids"]
        if lists.null_count or text.null_count:
            raise ValueError("null values")
        _, offsets_buffer, data_buffer = text.buffers()  # UTF-8 straight from Arrow's buffers
        offsets = np.frombuffer(offsets_buffer, "<i4")[text.offset:text.offset + len(text) + 1].astype(np.int64)
        data = data_buffer.to_pybytes()[offsets[0]:offsets[-1]] if data_buffer is not None else b""
        offsets -= offsets[0]
        starts = _int32s(lists.offsets).astype(np.int64)
        flat = _int64s(lists.values)[starts[0]:starts[-1]]
        starts = starts - starts[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, TypeError, ValueError):
        records = tsv.read_texts(path)  # raises naming the bad line
        try:
            ids = np.asarray([t.text_id for t in records], np.int64)
            flat = np.asarray([i for t in records for i in t.image_ids], np.int64)
        except OverflowError:
            raise _out_of_int64(path, _text_record_ids) from None
        encoded = [t.text.encode("utf-8") for t in records]
        data, offsets = b"".join(encoded), np.cumsum([0] + [len(e) for e in encoded]).astype(np.int64)
        starts = np.cumsum([0] + [len(t.image_ids) for t in records]).astype(np.int64)
    return _Texts(ids, offsets, data, starts, flat)


def _text_record_ids(line: bytes) -> Iterator[tuple[str, object]]:
    obj = json.loads(line)
    yield "text_id", obj.get("text_id")
    for i in obj.get("image_ids") or []:
        yield "image id", i


def _tsv_line_ids(line: bytes) -> Iterator[tuple[str, object]]:
    yield "image id", int(line.split(b"\t", 1)[0])


def _out_of_int64(path: Path, ids_of) -> LmdbBuildError:
    """The error for the first id of ``path`` (a file of lines; ``ids_of(line)`` gives a
    line's ``(name, id)`` pairs) that does not fit the store's int64 ids, naming its line."""
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            for name, value in ids_of(line):
                if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
                    return LmdbBuildError(f"{path}:{line_no}: {name} {value} does not fit in a signed 64-bit integer "
                                          f"({INT64[0]}..{INT64[1]}), which the store's ids are; renumber such ids "
                                          "and re-ingest the dataset (`mmcn ingest`)")
    return LmdbBuildError(f"{path}: an id does not fit in a signed 64-bit integer; re-ingest the dataset (`mmcn ingest`)")


@dataclass
class _Split:
    """One split's inputs after the referential checks."""

    lines: tsv.MappedTsv                   # the image TSV
    keep_lines: np.ndarray                 # (TSV lines,) bool: the images stored, in TSV order
    image_ids: np.ndarray                  # stored image ids in store (= TSV) order
    texts: _Texts                          # kept texts, image ids restricted to stored images
    feature_rows: np.ndarray | None        # each stored image's row in the split's feature shards
    skipped: list[dict] = field(default_factory=list)


def _unique_ids(lines: tsv.MappedTsv) -> np.ndarray:
    ids = lines.ids
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) < len(ids):
        dup = int(uniq[np.argmax(counts > 1)])
        where = np.flatnonzero(ids == dup) + 1
        raise LmdbBuildError(f"{lines.path}:{where[1]}: image id {dup} already on line {where[0]}; image ids must "
                             "be unique (re-ingest the dataset)")
    return ids


def _check_split(split: str, tsv_dir: Path, features_dir: Path | None, tags: dict[int, ImageTags] | None,
                 feature_ids: list[int] | None, texts: Future) -> _Split:
    """The referential checks of one split; ``texts`` is its texts file being read (a future)."""
    imgs = tsv.imgs_path(tsv_dir, split)
    try:
        lines = tsv.MappedTsv(imgs)
    except OverflowError:
        raise _out_of_int64(imgs, _tsv_line_ids) from None
    except ValueError as e:
        raise LmdbBuildError(f"{e}; re-ingest the dataset (`mmcn ingest`)") from None
    ids = _unique_ids(lines)
    keep = np.ones(len(ids), bool)
    skipped = []
    if feature_ids is not None:
        feature_ids = np.asarray(feature_ids, np.int64)
        unknown = feature_ids[~np.isin(feature_ids, ids)]
        if len(unknown):
            raise LmdbBuildError(f"{features_dir}/{split}: features for image {int(unknown[0])} (and "
                                 f"{len(unknown) - 1} more), which is not in {imgs}; rerun the features stage")
        has = np.isin(ids, feature_ids)
        skipped += [{"split": split, "image_id": int(ids[k]), "reason": "no_features",
                     "detail": f"{imgs}:{k + 1} has no row in {features_dir}/{split} (see its features_report.json)"}
                    for k in np.flatnonzero(~has)]
        keep &= has
    if tags is not None:
        has = np.fromiter((int(i) in tags for i in ids), bool, len(ids))
        skipped += [{"split": split, "image_id": int(ids[k]), "reason": "no_tags",
                     "detail": "no line in the tags file"} for k in np.flatnonzero(keep & ~has)]
        keep &= has
    stored = ids[keep]
    feature_rows = None
    if feature_ids is not None:
        order = np.argsort(feature_ids, kind="stable")
        feature_rows = order[np.searchsorted(feature_ids, stored, sorter=order)]

    texts_file = tsv.texts_path(tsv_dir, split)
    t = texts.result()
    uniq, counts = np.unique(t.ids, return_counts=True)
    if (counts > 1).any():
        raise LmdbBuildError(f"{texts_file}: text id {int(uniq[np.argmax(counts > 1)])} appears twice; "
                             "text ids must be unique")
    ok = np.isin(t.image_ids, stored)
    owner = np.repeat(np.arange(len(t.ids)), np.diff(t.starts))
    for k in np.flatnonzero(~ok):
        text_id, image_id = int(t.ids[owner[k]]), int(t.image_ids[k])
        skipped.append({"split": split, "text_id": text_id, "image_id": image_id,
                        "reason": "pair_image_left_out" if image_id in ids else "pair_without_image",
                        "detail": f"{texts_file}: text {text_id} names image {image_id}"})
    kept_per_text = np.bincount(owner[ok], minlength=len(t.ids))
    keep_text = (kept_per_text > 0) | (np.diff(t.starts) == 0)
    for k in np.flatnonzero(~keep_text):
        skipped.append({"split": split, "text_id": int(t.ids[k]), "reason": "text_without_image",
                        "detail": f"{texts_file}: none of its images is stored"})
    return _Split(lines, keep, stored, t.select(keep_text, ok), feature_rows, skipped)


def build_lmdb(tsv_dir: Path, out_dir: Path, features_dir: Path | None = None, tags_dir: Path | None = None,
               cfg: LmdbConfig = LmdbConfig(), splits: Sequence[str] | None = None) -> dict:
    """Build ``out_dir/{split}/`` for every split of ``tsv_dir`` (see the module docstring).

    Without ``features_dir`` the store holds images and texts only; without ``tags_dir``,
    no Chinese tags. Returns the report (also written to ``out_dir/lmdb_report.json``).
    Raises :class:`LmdbBusyError` at once when another process is building ``out_dir``,
    :class:`LmdbWriteError` when the disk is full or not writable, :class:`LmdbBuildError`
    for inconsistent inputs; ``out_dir`` is then as it was.
    """
    start = time.perf_counter()
    tsv_dir, out_dir = Path(tsv_dir), Path(out_dir)
    splits = list(splits or tsv.splits_in(tsv_dir))
    if not splits:
        raise FileNotFoundError(f"{tsv_dir}: no *_imgs.tsv files; run the ingest stage first")
    _check_replaceable(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(e, out_dir) or e
    with _output_lock(out_dir):
        _clear_leftovers(out_dir)
        report = _build(tsv_dir, out_dir, features_dir, tags_dir, cfg, splits)
    log.info("lmdb: %s in %.1fs, %d records left out (see %s)",
             {s: (c["images"], c["texts"], c["pairs"]) for s, c in report["splits"].items()},
             time.perf_counter() - start, len(report["skipped"]), out_dir / REPORT)
    return report


def _build(tsv_dir: Path, out_dir: Path, features_dir: Path | None, tags_dir: Path | None, cfg: LmdbConfig,
           splits: list[str]) -> dict:
    """The checks, then the store written under a temporary name and put in place."""
    checked, tags, digests = {}, {}, {}
    # the settings the inputs were made with, from the last stage that recorded them (tags
    # carry the features' and ingest's too): training keeps them beside the model
    chain = read_chain(tags_dir) or read_chain(features_dir) or read_chain(tsv_dir)
    with ThreadPoolExecutor(2, thread_name_prefix="lmdb-read") as background:
        # the texts files parse and the sources hash on the second core while this thread checks
        texts = {split: background.submit(_read_texts, tsv.texts_path(tsv_dir, split)) for split in splits}
        for split in splits:
            digests[split] = {name: background.submit(checksum, path)
                              for name, path in _sources(split, tsv_dir, features_dir, tags_dir).items()}
        for split in splits:  # every check before anything is written
            tags[split] = None
            if tags_dir is not None:
                path = tags_path(tags_dir, split)
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing: run the translate stage first")
                tags[split] = {t.image_id: t for t in read_tags(path)}
            feature_ids = None
            if features_dir is not None:
                feature_ids = np.fromiter((r["image_id"] for r in region_features.iter_columns(features_dir, split, ("image_id",))),
                                          np.int64)
            checked[split] = _check_split(split, tsv_dir, features_dir, tags[split], feature_ids, texts[split])
            lines = checked[split].lines  # hashed through the map the check has just paged in
            digests[split][lines.path.name] = background.submit(checksum, lines.view)
        skipped = [s for c in checked.values() for s in c.skipped]
        if skipped and cfg.strict:
            listing = "\n".join(f"  {s}" for s in skipped[:50])
            raise LmdbBuildError(f"lmdb.strict: {len(skipped)} records would be left out:\n{listing}")

        tmp = _temp_name(out_dir, os.getpid())
        report = {"splits": {}, "skipped": skipped}  # nothing time-dependent: the report is a DVC output
        try:
            tmp.mkdir()
            with _reusing_freed_memory():
                for split in splits:
                    report["splits"][split] = _write_split(split, checked[split], features_dir, tags[split],
                                                           digests[split], tmp / split, cfg, chain)
            _write_durably(tmp / REPORT, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
            _replace(tmp, out_dir)
        except BaseException as e:
            error = _write_error(e, tmp) if isinstance(e, (OSError, lmdb.Error)) else None
            shutil.rmtree(tmp, ignore_errors=True)
            if error is not None:
                raise error from None
            raise
    return report


# --------------------------------------------------------------------------- the output

def _temp_name(out_dir: Path, pid: int) -> Path:
    return out_dir.with_name(f"{out_dir.name}.tmp-{pid}")


def _aside_name(out_dir: Path, pid: int) -> Path:
    return out_dir.with_name(f"{out_dir.name}.old-{pid}")


def _lock_name(out_dir: Path) -> Path:
    return out_dir.with_name(f"{out_dir.name}.lock")


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace an ``out_dir`` that is not a store (a mistyped ``--out`` would
    otherwise delete whatever folder it names)."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if out_dir.is_dir() and not out_dir.is_symlink():
        if (out_dir / REPORT).is_file() or not any(out_dir.iterdir()):
            return
        with contextlib.suppress(FileNotFoundError):
            if split_dirs(out_dir):
                return
    raise LmdbBuildError(f"{out_dir} exists and is not an LMDB store (no {REPORT}, no split folders with data.mdb); "
                         "a build replaces its output as a whole, so it will not replace that: choose another output "
                         "folder, or remove it yourself")


@contextlib.contextmanager
def _output_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``{out}.lock`` (``flock``, released by the kernel if this process dies) for the
    build; a second builder of the same output fails at once naming the holder's pid."""
    lock = _lock_name(out_dir)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _write_error(e, lock) or e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LmdbBusyError(f"{out_dir} is being built by another process (pid {holder}, lock {lock}): wait for it "
                                "to finish, or stop it, then build again") from None
        try:  # the previous holder may have deleted the file between our open and lock: lock the new one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _clear_leftovers(out_dir: Path) -> None:
    """Under the lock: delete the temporary folders of builds whose process is gone, and put
    back a store that a build killed between its two renames had set aside."""
    for kind in ("old", "tmp"):
        for path in sorted(out_dir.parent.glob(f"{out_dir.name}.{kind}-*")):
            pid = path.name.rpartition("-")[2]
            if not pid.isdigit():
                continue
            if int(pid) != os.getpid() and pid_alive(int(pid)):
                log.warning("leaving %s: process %s, which wrote it, is still running (not as a builder of %s: "
                            "it would hold %s); delete it once that process is done", path, pid, out_dir,
                            _lock_name(out_dir))
                continue
            if kind == "old" and not out_dir.exists():
                log.warning("restoring %s from %s, set aside by a build that was killed before it finished", out_dir,
                            path)
                path.rename(out_dir)
                continue
            log.info("removing %s, left by an interrupted build (process %s is gone)", path, pid)
            shutil.rmtree(path, ignore_errors=True)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one atomic step (Linux ``renameat2``); False where
    the system or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _replace(new: Path, out_dir: Path) -> None:
    """Put the complete store ``new`` in place of ``out_dir``: a reader sees the old store or
    the new one, never a mix. Swapped atomically where possible (``new`` then holds the old
    store), else the old one is renamed aside and the new one in; the old one goes last."""
    _fsync_dir(new)
    if not out_dir.exists():
        new.rename(out_dir)
        old = None
    elif _exchange(new, out_dir):
        old = new
    else:
        old = _aside_name(out_dir, os.getpid())
        out_dir.rename(old)
        new.rename(out_dir)
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_DISK_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only",
                errno.EFBIG: "file too large", errno.EIO: "input/output error", errno.EACCES: "permission denied",
                errno.EPERM: "not permitted"}
_READS_TOO = (errno.EIO, errno.EACCES, errno.EPERM)  # these also come from reading an input
_LMDB_DISK_MESSAGES = ("Input/output error", "No space left", "Disk quota", "Read-only file system", "File too large",
                       "Permission denied")


def _write_error(e: BaseException, where: Path) -> LmdbWriteError | None:
    """A one-line error for a write the disk refused (full, over quota, read-only) under
    ``where``, saying what to do; None for any other error. LMDB reports a short write
    (a full disk) as ``Input/output error``."""
    if isinstance(e, lmdb.DiskError) or (isinstance(e, lmdb.Error) and any(m in str(e) for m in _LMDB_DISK_MESSAGES)):
        cause = f"LMDB: {e}"
    elif isinstance(e, OSError) and e.errno in _DISK_ERRNOS and not (
            e.errno in _READS_TOO and e.filename and not Path(os.fsdecode(e.filename)).is_relative_to(where.parent)):
        cause = f"{_DISK_ERRNOS[e.errno]}: {e}"
    else:
        return None
    volume = next((p for p in where.parents if p.exists()), Path("."))
    try:
        usage = shutil.disk_usage(volume)
        space = f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.1f} GiB"
    except OSError:
        space = "free space unknown"
    return LmdbWriteError(f"cannot write the LMDB store at {where} ({cause}): the disk or volume holding {volume} is "
                          f"full or not writable ({space}); free space there (or make it writable), or build the "
                          "store on another volume (`mmcn build-lmdb --out DIR`), then build again")


def _text_blocks(texts: _Texts) -> Iterator[bytes]:
    """Texts in blocks of TEXT_BLOCK: u32 LE offsets (count + 1, absolute in the block), then UTF-8."""
    offsets = texts.text_offsets
    for first in range(0, len(texts.ids), TEXT_BLOCK):
        span = offsets[first:first + TEXT_BLOCK + 1]
        header = 4 * len(span)
        yield (span - span[0] + header).astype("<u4").tobytes() + texts.text_data[span[0]:span[-1]]


def _sources(split: str, tsv_dir: Path, features_dir: Path | None, tags_dir: Path | None) -> dict[str, Path]:
    """The files a split's store is built from, by the name its metadata gives them, but for
    the image TSV (the build hashes that through the map it reads)."""
    texts = tsv.texts_path(tsv_dir, split)
    files = {texts.name: texts} if texts.is_file() else {}
    if features_dir is not None:
        files.update({f"features/{split}/{p.name}": p for p in region_features.shard_paths(features_dir, split)})
    if tags_dir is not None:
        files[f"tags/{split}.jsonl"] = tags_path(tags_dir, split)
    return files


def _workers(cfg: LmdbConfig) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cfg.shards, cfg.workers or cores))


def _write_split(split: str, data: _Split, features_dir: Path | None, tags: dict[int, ImageTags] | None,
                 digests: dict[str, Future], out: Path, cfg: LmdbConfig, chain: dict) -> dict:
    """Write one split: its shards in parallel threads (LMDB and base64 decoding release the
    GIL), each shard by one writer that decodes, appends and commits in turn."""
    n, texts = len(data.image_ids), data.texts
    per_shard = max(1, -(-n // cfg.shards))
    lines = np.flatnonzero(data.keep_lines)
    bar = Progress(n, f"lmdb {split}", "img", log)
    if cfg.shards > 1:
        out.mkdir()

    def write_shard(shard: int) -> dict:
        first, end = min(n, shard * per_shard), min(n, (shard + 1) * per_shard)
        w = _EnvWriter(out if cfg.shards == 1 else out / f"shard-{shard:05d}", cfg.map_size_mb << 20,
                       cfg.commit_bytes_mb << 20)
        if shard == 0:
            for k, block in enumerate(_text_blocks(texts)):
                w.put("texts", k, block)
        features = None
        if features_dir is not None and end > first:  # this shard's rows onwards (they follow TSV order)
            features = _by_id(region_features.iter_split(features_dir, split, start=int(data.feature_rows[first:end].min())))
        boxes = 0
        for local, line in enumerate(lines[first:end].tolist()):
            try:
                w.put("images", local, tsv.decode_b64(data.lines.payload(line)))
            except ValueError as e:
                raise LmdbBuildError(f"{data.lines.path}:{line + 1}: image {data.lines.ids[line]}: {e}; "
                                     "re-ingest the dataset (`mmcn ingest`)") from None
            if features is not None:
                image_id = int(data.image_ids[first + local])
                r = features(image_id)
                w.put("features", local, np.ascontiguousarray(r.features, dtype="<f4").tobytes())
                w.put("regions", local, _pack_regions(r, tags.get(image_id) if tags is not None else None))
                boxes += r.num_boxes
            if local % 256 == 255:
                bar.update(256)
        bar.update((end - first) % 256)
        first_shard = shard == 0
        pairs = np.stack([np.repeat(texts.ids, np.diff(texts.starts)), texts.image_ids], axis=1)
        meta = {"schema_version": SCHEMA_VERSION, "split": split, "shard": shard, "shards": cfg.shards,
                "counts": {"images": end - first, "texts": len(texts.ids) if first_shard else 0,
                           "pairs": len(pairs) if first_shard else 0},
                "feature_dim": region_features.FEATURE_DIM if features_dir is not None else 0, "has_tags": tags is not None,
                "sources": {name: d.result() for name, d in digests.items()}, "chain": chain}
        meta_bytes = json.dumps(meta, sort_keys=True).encode()
        arrays = {
            b"image_ids": data.image_ids[first:end],
            b"text_ids": texts.ids if first_shard else np.zeros(0, np.int64),
            b"text_pairs": texts.starts if first_shard else np.zeros(1, np.int64),
            b"pairs": pairs if first_shard else np.zeros((0, 2), np.int64),
        }
        w.flush({b"meta": meta_bytes, META_DIGEST: seal(meta_bytes, record_seed(b"meta"))[-DIGEST_BYTES:],
                 **{name: seal(a.astype("<i8").tobytes(), record_seed(name)) for name, a in arrays.items()}})
        w.close()
        return {"boxes": boxes, "map_grown": w.grown}

    try:
        with ThreadPoolExecutor(_workers(cfg), thread_name_prefix="lmdb-write") as pool:
            shards = list(pool.map(write_shard, range(cfg.shards)))  # more shards than images: empty ones
    finally:
        bar.close()
    data.lines.close()
    return {"images": n, "texts": len(texts.ids), "pairs": len(texts.image_ids),
            "boxes": sum(r["boxes"] for r in shards), "map_grown": sum(r["map_grown"] for r in shards)}


@contextlib.contextmanager
def _reusing_freed_memory() -> Iterator[None]:
    """Keep freed heap memory in the process while a build runs (glibc's ``mallopt``).

    Every commit frees the pages of its batch, and by default glibc hands the top of the heap
    back to the kernel, so the next batch faults it in again: with it kept, appends into
    LMDB's pages are 5x faster and decoded images reuse warm memory (bench/lmdb_bench.py).
    Elsewhere (no glibc) this does nothing.
    """
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not mallopt(M_TRIM_THRESHOLD, 1 << 30):
        yield
        return
    try:
        yield
    finally:
        mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def _by_id(records: Iterator[region_features.RegionFeatures]):
    """Look-up by id over a stream in (nearly) the same order: holds only what it skipped."""
    waiting: dict[int, region_features.RegionFeatures] = {}

    def get(image_id: int) -> region_features.RegionFeatures:
        if image_id in waiting:
            return waiting.pop(image_id)
        for r in records:
            if r.image_id == image_id:
                return r
            waiting[r.image_id] = r
        raise LmdbBuildError(f"no features for image {image_id}; rerun the features stage")

    return get


def _pack_regions(r: region_features.RegionFeatures, tags: ImageTags | None) -> bytes:
    if tags is not None and len(tags.tags) != r.num_boxes:
        raise LmdbBuildError(f"image {r.image_id}: {len(tags.tags)} tags for {r.num_boxes} boxes; the tags are "
                             "stale, rerun the translate stage")
    return msgpack.packb({
        "width": r.width, "height": r.height, "num_boxes": r.num_boxes,
        "boxes": np.ascontiguousarray(r.boxes, dtype="<f4").tobytes(), "classes": list(r.classes),
        "conf": np.ascontiguousarray(r.class_conf, dtype="<f4").tobytes(),
        "attributes": [list(a) for a in r.attributes],
        "objects_zh": tags.objects if tags else [], "attributes_zh": tags.attributes if tags else [],
        "tags": tags.tags if tags else [],
    })
