"""Chinese-CLIP dataset files: ``{split}_imgs.tsv`` (+ ``.lineidx``) and ``{split}_texts.jsonl``.

``{split}_imgs.tsv``: ``<int image_id>\\t<base64 of the image file bytes>`` per line.
``{split}_texts.jsonl``: ``{"text_id": int, "text": str, "image_ids": [int, ...]}`` per line.
``*.lineidx``: the byte offset of every TSV line, one decimal number per line (Oscar's
``TSVFile`` convention), for O(1) random access.
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
    return tsv.with_name(tsv.name + ".lineidx")


def splits_in(root: Path) -> list[str]:
    """Splits that have an ``{split}_imgs.tsv`` in ``root`` (known splits first, then others)."""
    return ordered(p.name[: -len("_imgs.tsv")] for p in root.glob("*_imgs.tsv"))


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
        lineidx_path(self.path).write_text("".join(f"{o}\n" for o in self._offsets))

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
    lineidx_path(tsv).write_text("".join(f"{o}\n" for o in offsets))
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
        idx = lineidx_path(self.path)
        if not idx.is_file():
            raise FileNotFoundError(f"{idx} is missing: run `mmcn ingest` on this folder to index it")
        self._offsets = np.loadtxt(idx, dtype=np.int64, ndmin=1) if idx.stat().st_size else np.zeros(0, np.int64)
        self._f = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> tuple[int, bytes]:
        if self._f is None:
            self._f = open(self.path, "rb")
        self._f.seek(int(self._offsets[i]))
        key, _, payload = self._f.readline().rstrip(b"\r\n").partition(b"\t")
        return int(key), pybase64.b64decode(payload)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_f": None}


def decode_b64(payload: bytes) -> bytes:
    """Strict base64 decode; raises ValueError with a short reason."""
    try:
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"invalid base64: {e}") from None


def write_texts(path: Path, texts: list[Text]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps(t.to_json(), ensure_ascii=False) + "\n")


def read_texts(path: Path) -> list[Text]:
    """Read a texts file written by mmcn (already validated); raises on malformed lines."""
    return list(read_jsonl(path, lambda obj: Text(int(obj["text_id"]), str(obj["text"]),
                                                  [int(i) for i in obj.get("image_ids", [])]),
                           "not a Chinese-CLIP text record", "run `mmcn ingest` on the dataset to validate it"))
