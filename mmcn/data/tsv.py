"""Chinese-CLIP dataset files: ``{split}_imgs.tsv`` (+ ``{split}_imgs.lineidx``) and ``{split}_texts.jsonl``.

``{split}_imgs.tsv``: ``<int image_id>\\t<base64 of the image file bytes>`` per line. mmcn writes
the standard base64 alphabet; it reads the standard and the url-safe one (``-_``, what
Chinese-CLIP's own reader, ``base64.urlsafe_b64decode``, expects).
``{split}_texts.jsonl``: ``{"text_id": int, "text": str, "image_ids": [int, ...]}`` per line.
``X.lineidx`` next to ``X.tsv``: the byte offset of every TSV line, one decimal number per
line, for O(1) random access. The name is Oscar's ``TSVFile`` convention
(``os.path.splitext(tsv)[0] + ".lineidx"``); readers also accept mmcn's former name,
``X.tsv.lineidx``. Chinese-CLIP's scripts read no index at all.
"""
from __future__ import annotations

import binascii
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pybase64

from mmcn.data.jsonl import read_jsonl
from mmcn.data.splits import ordered


def imgs_path(root: Path, split: str) -> Path:
    return root / f"{split}_imgs.tsv"


def texts_path(root: Path, split: str) -> Path:
    return root / f"{split}_texts.jsonl"


def lineidx_path(tsv: Path) -> Path:
    """Where the index of ``tsv`` is written: ``X.tsv`` -> ``X.lineidx`` (as Oscar's ``TSVFile`` looks)."""
    return Path(os.path.splitext(tsv)[0] + ".lineidx")


def legacy_lineidx_path(tsv: Path) -> Path:
    """mmcn's former index name, ``X.tsv.lineidx``: still read, never written."""
    return Path(f"{tsv}.lineidx")


def find_lineidx(tsv: Path) -> Path | None:
    """The index of ``tsv`` to read: Oscar's name first, then the former one; None if neither."""
    for idx in (lineidx_path(tsv), legacy_lineidx_path(tsv)):
        if idx.is_file():
            return idx
    return None


def _write_lineidx(tsv: Path, offsets: list[int]) -> None:
    lineidx_path(tsv).write_text("".join(f"{o}\n" for o in offsets))
    legacy = legacy_lineidx_path(tsv)
    if legacy != lineidx_path(tsv):
        legacy.unlink(missing_ok=True)  # a stale index of a former version of this file


def splits_in(root: Path) -> list[str]:
    """Splits that have an ``{split}_imgs.tsv`` in ``root`` (known splits first, then others)."""
    return ordered(p.name[: -len("_imgs.tsv")] for p in root.glob("*_imgs.tsv"))


def check_complete(root: Path) -> list[str]:
    """The splits of an ingested folder (:func:`splits_in`); a split that left other files
    (texts, index, manifest) but lost its ``{split}_imgs.tsv`` is an error, not a split to
    leave out silently. Raises FileNotFoundError naming the folder and what to do."""
    root = Path(root)
    splits = splits_in(root)
    if not splits:
        raise FileNotFoundError(f"{root}: no {{split}}_imgs.tsv: run the ingest stage (or mmcn ingest) first")
    others = {p.name.split("_", 1)[0] for p in root.glob("*_*") if p.name.split("_", 1)[0] not in splits
              and p.name.split("_", 1)[1] in ("texts.jsonl", "imgs.lineidx", "imgs.tsv.lineidx", "manifest.jsonl")}
    if others:
        lost = ", ".join(f"{s}_imgs.tsv" for s in sorted(others))
        raise FileNotFoundError(f"{root}: {lost} missing while the split's other files are there: the folder is "
                                f"incomplete; run the ingest stage again (dvc repro -f ingest, or mmcn ingest)")
    return splits


def is_chinese_clip_layout(root: Path) -> bool:
    return root.is_dir() and any(root.glob("*_imgs.tsv"))


@dataclass
class Text:
    text_id: int
    text: str
    image_ids: list[int]

    def to_json(self) -> dict:
        return {"text_id": self.text_id, "text": self.text, "image_ids": self.image_ids}


class TsvWriter:
    """Writes ``id\tpayload`` lines and, on close, the ``.lineidx`` of their offsets.

    A payload is given either as bytes or as a byte range of another file, which is copied
    inside the kernel (``os.copy_file_range``) without passing through Python.
    """

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb", buffering=0)
        self._offsets: list[int] = []
        self._pos = 0
        self._sources: dict[str, int] = {}

    def write(self, key: int | str, payload: bytes) -> None:
        self._offsets.append(self._pos)
        self._pos += self._f.write(str(key).encode() + b"\t" + payload + b"\n")

    def write_range(self, key: int | str, source: str, offset: int, length: int) -> None:
        """Write a line whose payload is ``length`` bytes of file ``source`` from ``offset``."""
        self._offsets.append(self._pos)
        self._pos += self._f.write(str(key).encode() + b"\t")
        fd = self._sources.get(source)
        if fd is None:
            fd = self._sources[source] = os.open(source, os.O_RDONLY)
        done = 0
        while done < length:
            n = _copy_range(fd, self._f.fileno(), offset + done, length - done)
            if n <= 0:
                raise OSError(f"{source}: unexpected end of file at byte {offset + done}")
            done += n
        self._pos += length + self._f.write(b"\n")

    def __len__(self) -> int:
        return len(self._offsets)

    def close(self) -> None:
        self._f.close()
        for fd in self._sources.values():
            os.close(fd)
        _write_lineidx(self.path, self._offsets)

    def __enter__(self) -> "TsvWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> int:
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(src_fd, dst_fd, count, offset)
        except OSError:
            pass  # e.g. across file systems on old kernels: fall back to read + write
    return os.write(dst_fd, os.pread(src_fd, min(count, 1 << 24), offset))


def iter_tsv(path: Path) -> Iterator[tuple[int, bytes, int, int]]:
    """Yield ``(line_no, key, payload_offset, payload_length)`` for each line of a TSV.

    A line without a tab has ``payload_length == 0``. The payload itself is not returned:
    read it with :func:`read_range` where needed.
    """
    pos = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            body = line.rstrip(b"\r\n")
            key, tab, payload = body.partition(b"\t")
            yield line_no, key, pos + len(key) + len(tab), len(payload)
            pos += len(line)


def read_range(path: str | Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def build_lineidx(tsv: Path) -> int:
    """Write ``tsv``'s ``.lineidx`` from the file itself; returns the number of lines."""
    offsets = []
    pos = 0
    with open(tsv, "rb") as f:
        for line in f:
            offsets.append(pos)
            pos += len(line)
    _write_lineidx(tsv, offsets)
    return len(offsets)


class MappedTsv:
    """A whole image TSV memory-mapped, with every line's id and payload span found in one
    vectorised pass (no per-line reads or copies): for fast sequential conversion.

    ``ids[i]`` is line i's key; :meth:`payload` is its base64 text as a zero-copy view
    (``view``: the whole file).
    A line that is not ``<int id>\t<payload>`` raises ValueError naming the line.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "rb")
        size = os.fstat(self._f.fileno()).st_size
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.view = memoryview(self._mm) if size else memoryview(b"")
        ids, tabs, ends = [], [], []
        pos = 0
        while pos < size:  # memchr-speed scans of the map
            end = self._mm.find(b"\n", pos)
            end = size if end < 0 else end
            stop = end - 1 if end > pos and self._mm[end - 1] == 13 else end  # "\r\n"
            tab = self._mm.find(b"\t", pos, stop)
            try:
                ids.append(int(self.view[pos:tab]) if tab > pos else int("no key"))
            except ValueError:
                raise ValueError(f"{self.path}:{len(ids) + 1}: not an 'image_id<TAB>base64' line") from None
            tabs.append(tab)
            ends.append(stop)
            pos = end + 1
        ids, tabs, ends = np.asarray(ids, np.int64), tabs, ends
        self.ids, self._tabs, self._ends = ids, tabs, ends

    def __len__(self) -> int:
        return len(self.ids)

    def payload(self, i: int) -> memoryview:
        return self.view[self._tabs[i] + 1:self._ends[i]]

    def close(self) -> None:
        self.view.release()
        if self._mm is not None:
            self._mm.close()
        self._f.close()

    def __enter__(self) -> "MappedTsv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TsvReader:
    """Random access to an image TSV through its ``.lineidx``: ``len``, ``[i] -> (id, bytes)``.

    The file handle opens lazily, so a reader can be handed to DataLoader workers.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        idx = find_lineidx(self.path)
        if idx is None:
            raise FileNotFoundError(f"{lineidx_path(self.path)} is missing: run `mmcn ingest` on this folder "
                                    "to index it")
        self._offsets = np.loadtxt(idx, dtype=np.int64, ndmin=1) if idx.stat().st_size else np.zeros(0, np.int64)
        self._f = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> tuple[int, bytes]:
        if self._f is None:
            self._f = open(self.path, "rb")
        self._f.seek(int(self._offsets[i]))
        key, _, payload = self._f.readline().rstrip(b"\r\n").partition(b"\t")
        try:
            return int(key), decode_b64(payload)
        except ValueError as e:
            raise ValueError(f"{self.path}: line {i + 1} (image {key.decode(errors='replace')}): {e}; "
                             "run `mmcn ingest` on this folder to validate it") from None

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_f": None}


_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def is_urlsafe_b64(payload: bytes) -> bool:
    """True if ``payload`` uses the url-safe alphabet's ``-`` or ``_`` (so it is not standard base64)."""
    return b"-" in payload or b"_" in payload


def decode_b64(payload: bytes | memoryview) -> bytes:
    """Strict base64 decode of the standard or the url-safe alphabet (Chinese-CLIP writes
    either); raises ValueError with a short reason."""
    try:
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        error = e
    try:  # the fast path failed: url-safe (or mixed, as base64.urlsafe_b64decode accepts)?
        return pybase64.b64decode(bytes(payload).translate(_URLSAFE_TO_STANDARD), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"invalid base64: {error}") from None


def write_texts(path: Path, texts: list[Text]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps(t.to_json(), ensure_ascii=False) + "\n")


def read_texts(path: Path) -> list[Text]:
    """Read a texts file written by mmcn (already validated); raises on malformed lines."""
    return list(read_jsonl(path, lambda obj: Text(int(obj["text_id"]), str(obj["text"]),
                                                  [int(i) for i in obj.get("image_ids", [])]),
                           "not a Chinese-CLIP text record", "run `mmcn ingest` on the dataset to validate it"))
