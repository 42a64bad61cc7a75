"""Region-feature shards: write/read round trip, random access, stats in the footer, stale temporary files
(Oscar export: test_oscar_export.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from mmcn.data import features as region_features


def record(image_id: int, n: int, rng: np.random.Generator) -> region_features.RegionFeatures:
    w, h = 640, 480
    xy = rng.uniform(0, 300, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 150, (n, 2))], axis=1).astype(np.float32)
    pooled = rng.standard_normal((n, region_features.POOLED_DIM)).astype(np.float32)
    return region_features.RegionFeatures(image_id, w, h, boxes, [f"class{i}" for i in range(n)],
                            np.sort(rng.uniform(0.2, 1, n)).astype(np.float32)[::-1].copy(),
                            region_features.region_features(pooled, boxes, w, h),
                            [["红", "large"] if i % 2 else [] for i in range(n)],
                            [[0.9, 0.5] if i % 2 else [] for i in range(n)])


def test_region_features_geometry():
    pooled = np.ones((1, region_features.POOLED_DIM), np.float32)
    feats = region_features.region_features(pooled, np.array([[10, 20, 110, 70]]), 200, 100)
    assert feats.shape == (1, 2054) and feats.dtype == np.float32
    np.testing.assert_allclose(feats[0, 2048:], [0.05, 0.2, 0.55, 0.7, 0.5, 0.5])


def test_shards_round_trip_and_random_access(tmp_path):
    rng = np.random.default_rng(0)
    records = [record(100 + i, n, rng) for i, n in enumerate([10, 37, 100])]
    region_features.write_shard(region_features.shard_path(tmp_path, "train", 0), records[:2])
    region_features.write_shard(region_features.shard_path(tmp_path, "train", 1), records[2:])
    assert [p.name for p in region_features.shard_paths(tmp_path, "train")] == ["part-00000.parquet", "part-00001.parquet"]
    back = list(region_features.iter_split(tmp_path, "train"))
    assert [r.image_id for r in back] == [100, 101, 102]
    for start in range(4):  # from a row on: whole shards before it skipped
        assert [r.image_id for r in region_features.iter_split(tmp_path, "train", start=start)] == [100, 101, 102][start:]
    for a, b in zip(records, back):
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert a.classes == b.classes and a.attributes == b.attributes
    store = region_features.FeatureStore(tmp_path, "train")
    assert len(store) == 3 and 101 in store
    np.testing.assert_array_equal(store[102].features, records[2].features)
    with pytest.raises(KeyError, match="no features"):
        store[5]


def test_mismatched_record_is_refused(tmp_path):
    bad = record(1, 10, np.random.default_rng(1))
    bad.classes = bad.classes[:-1]
    with pytest.raises(ValueError, match="image 1"):
        region_features.write_shard(region_features.shard_path(tmp_path, "test", 0), [bad])
    assert not list((tmp_path / "test").glob("*"))



def test_stats_travel_with_the_shard_and_damage_shows_in_the_footer(tmp_path):
    rng = np.random.default_rng(2)
    path = region_features.shard_path(tmp_path, "train", 0)
    stats = {"images": 2, "skipped": [{"image_id": 7, "line": 3, "reason": "不是图片"}], "boxes": 47}
    region_features.write_shard(path, [record(1, 10, rng), record(2, 37, rng)], stats=stats)
    assert region_features.read_footer(path) == (2, stats)
    assert [r.image_id for r in region_features.read_shard(path)] == [1, 2]  # readers unaffected
    plain = region_features.shard_path(tmp_path, "train", 1)
    region_features.write_shard(plain, [record(3, 10, rng)])  # as before: no stats
    assert region_features.read_footer(plain) == (1, None)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated copy
    with pytest.raises(ValueError, match="Parquet magic bytes not found"):
        region_features.read_footer(path)


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    (tmp_path / "train").mkdir()
    stale = tmp_path / "train" / f".part-00003.parquet.tmp-{dead.pid}"
    live = tmp_path / "train" / f".part-00004.parquet.tmp-{os.getpid()}"  # a writer still at work
    other = tmp_path / "train" / ".notes.tmp-1"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    assert region_features.remove_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()
