"""The LMDB store: round trip of every field, sharding, map growth, atomic builds (a
killed build), referential checks, readers in many DataLoader workers."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from PIL import Image

from mmcn.cli import main as cli_main
from mmcn.data import features as region_features
from mmcn.data import tsv
from mmcn.data.datasets import CaptionDataset, RetrievalDataset
from mmcn.data.lmdb_build import REPORT, LmdbBuildError, LmdbConfig, build_lmdb
from mmcn.data.lmdb_store import LmdbStore
from mmcn.data.tags import ImageTags, tags_path, write_tags


def png(i: int, size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size + i % 5, size), (i * 37 % 256, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


def make_dataset(root: Path, n_images: int = 7, split: str = "test", boxes=(3, 5, 2)) -> dict:
    """A Chinese-CLIP folder + feature shards + tags for ``n_images`` images; returns what was written."""
    rng = np.random.default_rng(n_images)
    tsv_dir, feat_dir, tags_dir = root / "tsv", root / "features", root / "tags"
    tsv_dir.mkdir(parents=True, exist_ok=True)
    ids = [1000 + 7 * i for i in range(n_images)][::-1]  # not sorted: order must follow the files
    images = {i: png(k) for k, i in enumerate(ids)}
    with tsv.TsvWriter(tsv.imgs_path(tsv_dir, split)) as w:
        for i in ids:
            w.write(i, tsv.pybase64.b64encode(images[i]))
    texts = [tsv.Text(50 + t, f"第{t}张图片的描述", [ids[t % n_images], ids[(t + 1) % n_images]] if t % 3 == 0
                      else [ids[t % n_images]]) for t in range(n_images + 3)]
    tsv.write_texts(tsv.texts_path(tsv_dir, split), texts)
    records, tags = [], []
    for k, i in enumerate(ids):
        n = boxes[k % len(boxes)]
        xy = rng.uniform(0, 10, (n, 2))
        b = np.concatenate([xy, xy + 5], axis=1).astype(np.float32)
        records.append(region_features.RegionFeatures(i, 30, 24, b, ["circle"] * n, rng.uniform(0.2, 1, n).astype(np.float32),
                                        region_features.region_features(rng.standard_normal((n, 2048)).astype(np.float32), b, 30, 24),
                                        [["red"]] * n, [[0.9]] * n))
        tags.append(ImageTags(i, ["圆形"] * n, [["红色"]] * n, ["红色 圆形"] * n))
    region_features.write_shard(region_features.shard_path(feat_dir, split, 0), records[:4])
    region_features.write_shard(region_features.shard_path(feat_dir, split, 1), records[4:])
    write_tags(tags_path(tags_dir, split), tags)
    return {"tsv": tsv_dir, "features": feat_dir, "tags": tags_dir, "ids": ids, "images": images,
            "texts": texts, "records": records}


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path)


def build(data, out, **cfg):
    return build_lmdb(data["tsv"], out, data["features"], data["tags"], LmdbConfig(**cfg))


@pytest.mark.parametrize(("shards", "workers"), [(1, 0), (3, 1), (3, 3)])  # shards one by one / in parallel
def test_round_trip_every_field(data, tmp_path, shards, workers):
    report = build(data, tmp_path / "lmdb", shards=shards, workers=workers)
    assert report["splits"]["test"]["images"] == 7 and report["skipped"] == []
    store = LmdbStore(tmp_path / "lmdb" / "test")
    assert len(store) == 7 and list(store.image_ids) == data["ids"]
    for k, r in enumerate(data["records"]):
        for got in (store[k], store.by_id(r.image_id)):
            assert got.image_id == r.image_id and got.image == data["images"][r.image_id]
            assert got.features.dtype == np.float32 and got.features.shape == (r.num_boxes, 2054)
            np.testing.assert_array_equal(got.features, r.features)
            np.testing.assert_array_equal(got.boxes, r.boxes)
            np.testing.assert_array_equal(got.conf, r.class_conf)
            assert (got.width, got.height, got.classes, got.attributes) == (30, 24, r.classes, r.attributes)
            assert got.objects_zh == ["圆形"] * r.num_boxes and got.attributes_zh == [["红色"]] * r.num_boxes
            assert got.tags == ["红色 圆形"] * r.num_boxes and got.tag_text == " ".join(["红色 圆形"] * r.num_boxes)
    assert store.num_texts == len(data["texts"])
    for t in data["texts"]:
        assert store.text(t.text_id) == t
    expected_pairs = [(t.text_id, i) for t in data["texts"] for i in t.image_ids]
    assert [tuple(p) for p in store.pairs.tolist()] == expected_pairs
    meta = store.meta
    assert meta["schema_version"] == 1 and meta["feature_dim"] == 2054 and meta["shards"] == shards
    assert sum(m["counts"]["images"] for m in store.metas) == 7
    raw = tsv.imgs_path(data["tsv"], "test").read_bytes()
    assert meta["sources"]["test_imgs.tsv"] == {"xxh3_128": xxhash.xxh3_128_hexdigest(raw), "bytes": len(raw)}
    assert "features/test/part-00000.parquet" in meta["sources"] and "tags/test.jsonl" in meta["sources"]
    with pytest.raises(KeyError, match="image 5 is not in"):
        store.by_id(5)
    with pytest.raises(IndexError):
        store.get(7)
    only_image = store.get(2, fields=("image",))
    assert only_image.image == data["images"][data["ids"][2]] and only_image.features is None


def test_images_and_texts_only(data, tmp_path):
    build_lmdb(data["tsv"], tmp_path / "lmdb")
    store = LmdbStore(tmp_path / "lmdb" / "test")
    assert store.feature_dim == 0 and len(store) == 7
    rec = store[0]
    assert rec.image == data["images"][data["ids"][0]] and rec.features is None and rec.tags is None


def test_map_grows_when_full(tmp_path):
    data = make_dataset(tmp_path, n_images=40, boxes=(60, 80))  # ~40 x 70 x 2054 x 4 bytes = 23 MB
    report = build(data, tmp_path / "lmdb", map_size_mb=1, commit_bytes_mb=4)
    assert report["splits"]["test"]["map_grown"] >= 4
    store = LmdbStore(tmp_path / "lmdb" / "test")
    np.testing.assert_array_equal(store[39].features, data["records"][39].features)


def test_killed_build_leaves_the_previous_store(data, tmp_path):
    out = tmp_path / "lmdb"
    build(data, out)
    before = {p.name: p.read_bytes() for p in (out / "test").iterdir()}
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from mmcn.data import lmdb_build as L
        flush = L._EnvWriter.flush
        def dying_flush(self, main=None):
            flush(self, main)
            os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of the build
        L._EnvWriter.flush = dying_flush
        L.build_lmdb(Path({str(data['tsv'])!r}), Path({str(out)!r}), Path({str(data['features'])!r}),
                     Path({str(data['tags'])!r}), L.LmdbConfig(shards=3))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert list(tmp_path.glob("lmdb.tmp-*")), "the killed build was writing under a temporary name"
    assert {p.name: p.read_bytes() for p in (out / "test").iterdir()} == before
    assert len(LmdbStore(out / "test")) == 7
    build(data, out, shards=2)  # the next build completes and clears the leftover
    assert not list(tmp_path.glob("lmdb.tmp-*"))
    assert len(LmdbStore(out / "test")) == 7


def test_referential_checks(data, tmp_path):
    # a text naming an image that is not in the TSV, an image without features
    texts = data["texts"] + [tsv.Text(999, "不存在的图片", [42])]
    tsv.write_texts(tsv.texts_path(data["tsv"], "test"), texts)
    first = data["records"][:4]
    region_features.write_shard(region_features.shard_path(data["features"], "test", 0), first[:3])  # image ids[3] loses its features
    report = build(data, tmp_path / "lmdb")
    reasons = {(s["reason"], s.get("image_id"), s.get("text_id")) for s in report["skipped"]}
    assert ("no_features", data["ids"][3], None) in reasons
    assert ("pair_without_image", 42, 999) in reasons and ("text_without_image", None, 999) in reasons
    assert any(r[0] == "pair_image_left_out" and r[1] == data["ids"][3] for r in reasons)
    store = LmdbStore(tmp_path / "lmdb" / "test")
    assert len(store) == 6 and data["ids"][3] not in set(store.image_ids.tolist())
    assert data["ids"][3] not in set(store.pairs[:, 1].tolist()) and 999 not in set(store.text_ids.tolist())
    assert json.loads((tmp_path / "lmdb" / REPORT).read_text())["skipped"] == report["skipped"]

    with pytest.raises(LmdbBuildError, match="no_features"):
        build(data, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()

    tsv.write_texts(tsv.texts_path(data["tsv"], "test"), data["texts"] + [data["texts"][0]])
    with pytest.raises(LmdbBuildError, match="text id 50 appears twice"):
        build(data, tmp_path / "dup")
    tsv.write_texts(tsv.texts_path(data["tsv"], "test"), data["texts"])
    with tsv.TsvWriter(tsv.imgs_path(data["tsv"], "test")) as w:
        for i in data["ids"] + data["ids"][:1]:
            w.write(i, tsv.pybase64.b64encode(data["images"][i]))
    with pytest.raises(LmdbBuildError, match=rf"test_imgs.tsv:8: image id {data['ids'][0]} already on line 1"):
        build(data, tmp_path / "dup")


def test_bad_image_payload_names_its_line(data, tmp_path):
    with tsv.TsvWriter(tsv.imgs_path(data["tsv"], "test")) as w:
        for i in data["ids"][:-1]:
            w.write(i, tsv.pybase64.b64encode(data["images"][i]))
        w.write(data["ids"][-1], b"not base64!")
    with pytest.raises(LmdbBuildError, match=rf"test_imgs.tsv:7: image {data['ids'][-1]}: invalid base64.*re-ingest"):
        build(data, tmp_path / "lmdb", shards=3)  # fails in the last shard's thread
    assert not (tmp_path / "lmdb").exists() and not list(tmp_path.glob("lmdb.tmp-*"))


def test_build_lmdb_command(data, tmp_path, capsys):
    args = ["build-lmdb", "--tsv", str(data["tsv"]), "--features", str(data["features"]), "--tags", str(data["tags"])]
    assert cli_main([*args, "--out", str(tmp_path / "lmdb"), "--shards", "2", "--workers", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["test"]["images"] == 7
    assert len(LmdbStore(tmp_path / "lmdb" / "test")) == 7
    assert cli_main([*args, "--out", str(tmp_path / "bad"), "--workers", "-1"]) == 2
    assert "workers must be >= 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_stale_tags_are_an_error(data, tmp_path):
    write_tags(tags_path(data["tags"], "test"), [ImageTags(i, ["圆形"], [[]], ["圆形"]) for i in data["ids"]])
    with pytest.raises(LmdbBuildError, match="stale"):
        build(data, tmp_path / "lmdb")


def test_datasets_in_many_dataloader_workers(data, tmp_path):
    build(data, tmp_path / "lmdb", shards=2)
    path = tmp_path / "lmdb" / "test"
    captions = CaptionDataset(path)
    assert len(captions) == sum(len(t.image_ids) for t in data["texts"])

    def collect(dataset, workers):
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                             multiprocessing_context="spawn" if workers else None)
        return [(item["text_id"], item["image_id"], item["caption"], item["tags"], item["features"].sum().item())
                for item in loader]

    assert collect(captions, 2) == collect(captions, 0)
    item = captions[0]
    t = data["texts"][0]
    assert (item["text_id"], item["image_id"], item["caption"]) == (t.text_id, t.image_ids[0], t.text)
    assert item["features"].shape == (data["records"][0].num_boxes, 2054)

    per_image = CaptionDataset(path, per_image=True)
    assert len(per_image) == 7
    first = per_image[0]
    assert first["image_id"] == data["ids"][0]
    assert sorted(first["captions"]) == sorted(t.text for t in data["texts"] if data["ids"][0] in t.image_ids)

    retrieval = RetrievalDataset(path)
    assert len(retrieval) == len(captions) and retrieval[1]["text"] == captions[1]["caption"]
    assert retrieval.text(0)["image_ids"] == data["texts"][0].image_ids
    assert retrieval.image(6)["image_id"] == data["ids"][6]
