"""Region-feature shards (Parquet): writer, readers, random access by image id.

Layout: ``{root}/{split}/part-{k:05d}.parquet``, rows in the image order of the split's
``{split}_imgs.tsv``, ``shard_size`` images per shard, so file names and row order are
deterministic. One row per image:

==============  ===============================  ==========================================
column          type                             meaning
==============  ===============================  ==========================================
image_id        int64                            Chinese-CLIP image id
width, height   int32                            image size in pixels
num_boxes       int32                            n (boxes sorted by confidence)
boxes           list<float32>                    n*4: x1, y1, x2, y2 in pixels
classes         list<string>                     n English class names
class_conf      list<float32>                    n class confidences
attributes      list<list<string>>               per box, English attribute names
attr_conf       list<list<float32>>              per box, their scores
features        binary                           float32 little-endian n x 2054
==============  ===============================  ==========================================

2054 = 2048 pooled RoI feature + ``[x1/W, y1/H, x2/W, y2/H, w/W, h/H]`` (see
:func:`region_features`). A shard is written under a temporary name and renamed when
complete, so an interrupted run leaves only whole shards behind (:func:`remove_stale_temps`
clears what a killed writer left). The producer's per-shard statistics (images, boxes,
skipped inputs) can travel inside the shard, in the Parquet key-value metadata
(:data:`STATS_KEY`, read back with the row count by :func:`read_footer`), so a report can be
rebuilt from the shards alone. Oscar's files are written from them by
:mod:`mmcn.data.oscar_export`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmcn.data.outputs import pid_alive
from mmcn.data.splits import ordered

POOLED_DIM = 2048
FEATURE_DIM = POOLED_DIM + 6
SHARD_PATTERN = "part-{:05d}.parquet"
STATS_KEY = b"mmcn.stats"      # Parquet key-value metadata: the producer's JSON stats of the shard
_TEMP = re.compile(r"\.part-\d+\.parquet\.tmp-(\d+)")  # ShardWriter's temporary names (pid last)
ROW_GROUP_ROWS = 64            # rows per Parquet row group (at most 64 x 0.8 MB of features held by a writer)

SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("num_boxes", pa.int32()),
    ("boxes", pa.list_(pa.float32())),
    ("classes", pa.list_(pa.string())),
    ("class_conf", pa.list_(pa.float32())),
    ("attributes", pa.list_(pa.list_(pa.string()))),
    ("attr_conf", pa.list_(pa.list_(pa.float32()))),
    ("features", pa.binary()),
])


@dataclass
class RegionFeatures:
    """The detector's output for one image, in the stored form."""

    image_id: int
    width: int
    height: int
    boxes: np.ndarray                       # (n, 4) float32, pixels
    classes: list[str]
    class_conf: np.ndarray                  # (n,) float32
    features: np.ndarray                    # (n, 2054) float32
    attributes: list[list[str]] = field(default_factory=list)
    attr_conf: list[list[float]] = field(default_factory=list)

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    def validate(self) -> None:
        n = self.num_boxes
        if self.boxes.shape != (n, 4) or self.features.shape != (n, FEATURE_DIM):
            raise ValueError(f"image {self.image_id}: boxes {self.boxes.shape} / features {self.features.shape} "
                             f"do not match (n, 4) / (n, {FEATURE_DIM})")
        if len(self.classes) != n or self.class_conf.shape != (n,):
            raise ValueError(f"image {self.image_id}: {len(self.classes)} classes, {self.class_conf.shape} confidences "
                             f"for {n} boxes")
        if self.attributes and len(self.attributes) != n:
            raise ValueError(f"image {self.image_id}: {len(self.attributes)} attribute lists for {n} boxes")


def region_features(pooled: np.ndarray, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """2054-dim features: ``pooled`` (n, 2048) followed by the 6 normalised box values."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    w, h = float(width), float(height)
    geometry = np.stack([boxes[:, 0] / w, boxes[:, 1] / h, boxes[:, 2] / w, boxes[:, 3] / h,
                         (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h], axis=1)
    return np.concatenate([np.asarray(pooled, dtype=np.float32), geometry.astype(np.float32)], axis=1)


def shard_path(root: Path, split: str, index: int) -> Path:
    return Path(root) / split / SHARD_PATTERN.format(index)


def shard_paths(root: Path, split: str) -> list[Path]:
    return sorted((Path(root) / split).glob("part-*.parquet"))


def splits_in(root: Path) -> list[str]:
    return ordered(p.name for p in Path(root).iterdir() if p.is_dir() and any(p.glob("part-*.parquet")))


def _table(records: list[RegionFeatures]) -> pa.Table:
    for r in records:
        r.validate()
    columns = {
        "image_id": [r.image_id for r in records],
        "width": [r.width for r in records],
        "height": [r.height for r in records],
        "num_boxes": [r.num_boxes for r in records],
        "boxes": [np.asarray(r.boxes, np.float32).ravel() for r in records],
        "classes": [list(r.classes) for r in records],
        "class_conf": [np.asarray(r.class_conf, np.float32) for r in records],
        "attributes": [[list(a) for a in r.attributes] or [[] for _ in range(r.num_boxes)] for r in records],
        "attr_conf": [[[float(s) for s in a] for a in r.attr_conf] or [[] for _ in range(r.num_boxes)]
                      for r in records],
        "features": [np.ascontiguousarray(r.features, dtype="<f4").tobytes() for r in records],
    }
    return pa.table(columns, schema=SCHEMA)


class ShardWriter:
    """One shard written as its rows come (in stored order), so a producer holds at most
    :data:`ROW_GROUP_ROWS` records, not a shard of them. Row groups have a fixed number of
    rows, so the bytes do not depend on how the rows arrived. Atomic: the rows go to a
    temporary name that :meth:`finish` (with the producer's stats for the footer) renames to
    ``path``; leaving the ``with`` block without :meth:`finish` (an error) removes it::

        with ShardWriter(path) as shard:
            shard.write(records)          # any number of times
            shard.finish(stats)
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows = 0
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._buffer: list[RegionFeatures] = []
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._writer is not None or self._tmp.exists():  # not finished: an error left the block
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._tmp.unlink(missing_ok=True)

    def write(self, records: Iterable[RegionFeatures]) -> None:
        """Append rows, each checked with :meth:`RegionFeatures.validate` (the file is created by the
        first full row group or by :meth:`finish`: a bad record in a small shard leaves nothing)."""
        for r in records:
            r.validate()
            self._buffer.append(r)
        while len(self._buffer) >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS)

    def _flush(self, n: int) -> None:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self._tmp, SCHEMA, compression="zstd")
        if n:
            self._writer.write_table(_table(self._buffer[:n]), row_group_size=ROW_GROUP_ROWS)
            del self._buffer[:n]
            self.rows += n

    def finish(self, stats: dict | None = None) -> None:
        """Write the last rows and ``stats`` (JSON-able; read back by :func:`read_footer`), then
        rename the file to ``path``."""
        self._flush(len(self._buffer))
        if stats is not None:
            self._writer.add_key_value_metadata({STATS_KEY: json.dumps(stats, ensure_ascii=False)})
        self._writer.close()
        self._writer = None
        os.replace(self._tmp, self.path)


def write_shard(path: Path, records: list[RegionFeatures], *, stats: dict | None = None) -> None:
    """Write one shard atomically (temporary name, then rename); ``stats`` (JSON-able, e.g. images,
    boxes, skipped inputs with reasons) is stored in the file's key-value metadata, so the shard
    and its statistics are written, and found on disk, together. (:class:`ShardWriter` writes one
    row by row.)"""
    with ShardWriter(path) as shard:
        shard.write(records)
        shard.finish(stats)


def read_footer(path: Path) -> tuple[int, dict | None]:
    """A shard's row count and the stats :func:`write_shard` stored with it (None: none stored),
    from its Parquet footer only; a truncated or damaged file raises ``pyarrow.ArrowInvalid``."""
    meta = pq.read_metadata(path)
    stats = (meta.metadata or {}).get(STATS_KEY)
    return meta.num_rows, None if stats is None else json.loads(stats)


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete the temporary files that writers killed mid-shard left under ``root/{split}/``
    (those whose process is gone; a live writer's are kept); returns the deleted paths."""
    removed = []
    for path in sorted(Path(root).glob("*/.part-*.parquet.tmp-*")):
        match = _TEMP.fullmatch(path.name)
        if match and not pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _row_to_record(row: dict) -> RegionFeatures:
    n = row["num_boxes"]
    return RegionFeatures(
        image_id=row["image_id"], width=row["width"], height=row["height"],
        boxes=np.asarray(row["boxes"], np.float32).reshape(n, 4),
        classes=list(row["classes"]), class_conf=np.asarray(row["class_conf"], np.float32),
        features=np.frombuffer(row["features"], dtype="<f4").reshape(n, FEATURE_DIM),
        attributes=[list(a) for a in row["attributes"]], attr_conf=[list(a) for a in row["attr_conf"]])


def read_shard(path: Path) -> list[RegionFeatures]:
    table = pq.read_table(path, schema=SCHEMA)
    return [_row_to_record(row) for row in table.to_pylist()]


def iter_split(root: Path, split: str, start: int = 0) -> Iterator[RegionFeatures]:
    """Every image's features of ``split`` in stored order, from row ``start`` on (the shards
    before it are skipped by the row counts in their footers, unread)."""
    for path in shard_paths(root, split):
        rows = pq.read_metadata(path).num_rows
        if start >= rows:
            start -= rows
            continue
        table = pq.read_table(path, schema=SCHEMA).slice(start)
        start = 0
        yield from (_row_to_record(row) for row in table.to_pylist())


def iter_columns(root: Path, split: str, columns: Iterable[str]) -> Iterator[dict]:
    """Some columns of every image of ``split`` as plain dicts, in stored order (reads only
    those columns: labels without the feature bytes, say)."""
    columns = list(columns)
    for path in shard_paths(root, split):
        yield from pq.read_table(path, columns=columns, schema=SCHEMA).to_pylist()


class FeatureStore:
    """Random access by image id to one split's shards (loads one shard at a time)."""

    def __init__(self, root: Path, split: str):
        self.paths = shard_paths(root, split)
        if not self.paths:
            raise FileNotFoundError(f"no feature shards under {Path(root) / split}: run the features stage first")
        self._where: dict[int, tuple[int, int]] = {}
        for k, path in enumerate(self.paths):
            ids = pq.read_table(path, columns=["image_id"]).column(0).to_pylist()
            for i, image_id in enumerate(ids):
                self._where[image_id] = (k, i)
        self._cached: tuple[int, pa.Table] | None = None

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self._where

    def ids(self) -> list[int]:
        return list(self._where)

    def __getitem__(self, image_id: int) -> RegionFeatures:
        if image_id not in self._where:
            raise KeyError(f"image {image_id} has no features in {self.paths[0].parent}")
        k, i = self._where[image_id]
        if self._cached is None or self._cached[0] != k:
            self._cached = (k, pq.read_table(self.paths[k], schema=SCHEMA))
        return _row_to_record(self._cached[1].slice(i, 1).to_pylist()[0])

