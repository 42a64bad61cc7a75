"""The LMDB store: round trip of every field, sharding, map growth, atomic builds (a
killed build), referential checks, readers in many DataLoader workers; per-record checksums
and `mmcn verify-lmdb`, byte-reproducible builds, atomic replacement, one builder per output,
leftovers of dead builds, ids beyond int64, a full disk."""
from __future__ import annotations

import errno
import fnmatch
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
import xxhash
from PIL import Image

from mmcn.cli import main as cli_main
from mmcn.data import features as region_features
from mmcn.data import lmdb_build as L
from mmcn.data import tsv
from mmcn.models.regions.datasets import CaptionDataset, RetrievalDataset
from mmcn.data.lmdb_build import REPORT, LmdbBuildError, LmdbBusyError, LmdbConfig, build_lmdb
from mmcn.data.lmdb_store import (SCHEMA_VERSION, LmdbCorruptError, LmdbStore, LmdbStoreError, _open_readonly,
                                  position_key, verify_store)
from mmcn.data.outputs import pid_alive
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
    assert meta["schema_version"] == SCHEMA_VERSION == 2 and meta["feature_dim"] == 2054 and meta["shards"] == shards
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
    assert not pid_alive(int((tmp_path / "lmdb.lock").read_text()))  # its lock file, locked no more
    assert {p.name: p.read_bytes() for p in (out / "test").iterdir()} == before
    assert len(LmdbStore(out / "test")) == 7
    build(data, out, shards=2)  # the next build completes and clears the leftovers
    assert not list(tmp_path.glob("lmdb.tmp-*")) and not (tmp_path / "lmdb.lock").exists()
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


# --- checksums, verify-lmdb ---------------------------------------------------------------

def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def stored_offset(env_dir: Path, db: str | None, key: bytes, at: float = 0.5) -> int:
    """The offset in ``env_dir/data.mdb`` of a byte inside the value of ``key`` (``at``: where in
    it), found by the stored bytes (value + checksum), which occur once in the file."""
    _, dbs, txn = _open_readonly(env_dir)
    stored = bytes(txn.get(key, db=dbs[db]) if db else txn.get(key))
    raw = (env_dir / "data.mdb").read_bytes()
    start = raw.find(stored)
    assert start >= 0 and raw.find(stored, start + 1) < 0
    return start + min(len(stored) - 1, int(len(stored) * at))


def edit_env(env_dir: Path, code: str) -> None:
    """Run ``code`` on the store in a write transaction ``txn`` of ``env``, in another process
    (py-lmdb opens an environment once per process, and this one may have it open to read)."""
    script = (f"import json, lmdb\nenv = lmdb.open({str(env_dir)!r}, max_dbs=8, lock=False)\n"
              "with env.begin(write=True) as txn:\n" + textwrap.indent(code.strip(), "    ") + "\nenv.close()\n")
    subprocess.run([sys.executable, "-c", script], check=True)


@pytest.mark.parametrize(("db", "position", "at"), [
    ("images", 2, 0.5), ("images", 3, 1.0),  # a value byte; a checksum byte
    ("features", 0, 0.3), ("regions", 1, 0.5), ("texts", 0, 0.9)])
def test_a_flipped_value_byte_is_an_error_naming_store_split_and_key(data, tmp_path, capsys, db, position, at):
    build(data, tmp_path / "lmdb", shards=2)
    store = LmdbStore(tmp_path / "lmdb" / "test")
    shard_dir = tmp_path / "lmdb" / "test" / "shard-00000"  # positions 0..3 (texts: shard 0)
    flip_byte(shard_dir / "data.mdb", stored_offset(shard_dir, db, position_key(position), at))
    what = f"text {data['texts'][0].text_id}" if db == "texts" else f"image {data['ids'][position]}"
    pattern = (rf"{shard_dir}: split test: record {db}\[{position}\] \({'text block of ' if db == 'texts' else ''}"
               rf"{what}\) is corrupt \(checksum mismatch\); the store is damaged, rebuild it: `dvc repro -f lmdb` "
               r"\(or `mmcn build-lmdb`\)")
    with pytest.raises(LmdbCorruptError, match=pattern):
        store.text_str(0) if db == "texts" else store.get(position)
    assert store.get(6).image == data["images"][data["ids"][6]]  # other records read as before
    unchecked = LmdbStore(tmp_path / "lmdb" / "test", verify=False)  # the setting that skips the checks
    unchecked.text_str(0) if db == "texts" else unchecked.get(position, fields=(("image",) if db == "images" else ()))

    assert cli_main(["verify-lmdb", str(tmp_path / "lmdb")]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["bad"] == 1 and json.loads(out)["ok"] is False
    assert f"{shard_dir}: split test: {db}[{position}] ({what}): checksum mismatch" in err
    assert "1 bad records; rebuild it: `dvc repro -f lmdb` (or `mmcn build-lmdb`)" in err


def test_no_flipped_byte_anywhere_goes_unnoticed(data, tmp_path):
    """Bytes flipped at random offsets of data.mdb, one at a time: verify-lmdb reports each
    one, or every record still reads back as written (the byte was unused page space)."""
    build(data, tmp_path / "lmdb")
    split = tmp_path / "lmdb" / "test"
    store = LmdbStore(split)

    def everything(s: LmdbStore) -> list:
        records = [s.get(k) for k in range(len(s))]
        return [(r.image, r.features.tobytes(), r.boxes.tobytes(), r.tags) for r in records] + [
            s.text_at(k) for k in range(s.num_texts)]

    written = everything(store)
    size = (split / "data.mdb").stat().st_size
    found = 0
    for offset in np.random.default_rng(0).integers(0, size, 40).tolist():
        flip_byte(split / "data.mdb", offset)  # seen at once through this process's map of the file
        problems = verify_store(split)[1]
        if problems:
            found += 1
        else:
            assert everything(LmdbStore(split)) == written, f"offset {offset}: changed, and nothing said so"
        flip_byte(split / "data.mdb", offset)
    assert found >= 10 and verify_store(split)[1] == []


@pytest.mark.parametrize("record", [b"meta", b"image_ids", b"pairs"])
def test_corrupt_metadata_fails_the_store_at_open(data, tmp_path, capsys, record):
    build(data, tmp_path / "lmdb")
    split = tmp_path / "lmdb" / "test"
    flip_byte(split / "data.mdb", stored_offset(split, None, record, 0.2 if record == b"meta" else 0.5))
    with pytest.raises(LmdbCorruptError, match=rf"{split}: (split test: )?record {record.decode()} is corrupt"):
        LmdbStore(split)
    assert cli_main(["verify-lmdb", str(split)]) == 1
    assert f"{split}: split test: {record.decode()}: " in capsys.readouterr().err


def test_verify_lmdb_command(data, tmp_path, capsys):
    build(data, tmp_path / "lmdb", shards=3)
    assert cli_main(["verify-lmdb", str(tmp_path / "lmdb")]) == 0
    out = json.loads(capsys.readouterr().out)
    # per shard: meta + 4 arrays; 7 images x (image, features, regions); texts: one block
    assert out == {"ok": True, "bad": 0, "splits": {"test": {"shards": 3, "records": 3 * 5 + 7 * 3 + 1}}}
    assert cli_main(["verify-lmdb", str(tmp_path / "lmdb" / "test"), "--no-structure"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert cli_main(["verify-lmdb", str(tmp_path / "nothing")]) == 2
    assert "nothing: no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["verify-lmdb", str(tmp_path / "empty")]) == 2
    assert "no LMDB store here" in capsys.readouterr().err

    # a record deleted, one added: both listed, by key
    build(data, tmp_path / "edited", shards=3)
    shard = tmp_path / "edited" / "test" / "shard-00001"
    edit_env(shard, """
txn.delete((1).to_bytes(4, "big"), db=env.open_db(b"features", txn=txn))
txn.put((9).to_bytes(4, "big"), b"x" * 20, db=env.open_db(b"images", txn=txn))
""")
    with pytest.raises(LmdbCorruptError, match=rf"record features\[1\] \(image {data['ids'][4]}\) is missing"):
        LmdbStore(tmp_path / "edited" / "test").get(4)
    assert cli_main(["verify-lmdb", str(tmp_path / "edited"), "--max-listed", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{shard}: split test: images[key 00000009]: a record the metadata does not count (3 records)" in err
    assert "... and 1 more" in err and "2 bad records" in err
    assert cli_main(["verify-lmdb", str(tmp_path / "edited")]) == 1
    assert f"{shard}: split test: features[1] (image {data['ids'][4]}): missing" in capsys.readouterr().err


def test_damaged_pages_are_found_without_opening_them(data, tmp_path, capsys):
    build(data, tmp_path / "lmdb")
    split = tmp_path / "lmdb" / "test"
    page = 4096
    raw = bytearray((split / "data.mdb").read_bytes())
    raw[3 * page:4 * page] = b"\xff" * page  # the images database's leaf page (builds are reproducible)
    (split / "data.mdb").write_bytes(bytes(raw))
    summary, problems = verify_store(tmp_path / "lmdb")
    assert problems and all(p.key == "pages" and p.problem.startswith("LMDB structure: ") for p in problems)
    assert f"{split}: split test: pages: LMDB structure: main/images DB: page 3 stores mp_pgno " in str(problems[0])
    assert summary == {"test": {"shards": 1, "records": 0}}


def test_old_schema_store_says_what_to_rerun(data, tmp_path, capsys):
    build(data, tmp_path / "lmdb")
    split = tmp_path / "lmdb" / "test"
    edit_env(split, """
meta = json.loads(txn.get(b"meta"))  # as schema 1 wrote it: no checksums
txn.put(b"meta", json.dumps({**meta, "schema_version": 1}, sort_keys=True).encode())
txn.delete(b"meta.xxh3")
""")
    message = (rf"{split}: schema version 1 \(built by an older mmcn\), this mmcn reads {SCHEMA_VERSION} \(a checksum "
               r"after every record\); rebuild it: `dvc repro -f lmdb` \(or `mmcn build-lmdb`\)")
    with pytest.raises(LmdbStoreError, match=message):
        LmdbStore(split)
    assert cli_main(["verify-lmdb", str(tmp_path / "lmdb")]) == 1
    assert f"{split}: split test: meta: schema version 1" in capsys.readouterr().err


# --- reproducible, atomic, one builder at a time ---------------------------------------

def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): xxhash.xxh3_128_hexdigest(p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("shards", [1, 2])
def test_builds_are_byte_reproducible(tmp_path, shards):
    data = make_dataset(tmp_path, n_images=30, boxes=(30, 50))  # several commits, the map grown from 1 MiB
    build(data, tmp_path / "a", shards=shards, map_size_mb=1, commit_bytes_mb=1)
    first = file_hashes(tmp_path / "a")
    assert REPORT in first and not any(name.endswith("lock.mdb") for name in first)
    assert "seconds" not in json.loads((tmp_path / "a" / REPORT).read_text())
    build(data, tmp_path / "a", shards=shards, map_size_mb=1, commit_bytes_mb=1)  # a forced rebuild in place
    build(data, tmp_path / "b", shards=shards, map_size_mb=1, commit_bytes_mb=1, workers=1)
    assert file_hashes(tmp_path / "a") == first == file_hashes(tmp_path / "b")


@pytest.mark.parametrize("swap", [True, False])  # renameat2 exchange; rename aside where the filesystem cannot
def test_rebuild_replaces_the_store_while_a_reader_keeps_the_old(data, tmp_path, monkeypatch, swap):
    out = tmp_path / "lmdb"
    build(data, out)
    old = LmdbStore(out / "test")
    old_image = old.get(0).image
    if not swap:
        monkeypatch.setattr(L, "_exchange", lambda a, b: False)
    tsv.write_texts(tsv.texts_path(data["tsv"], "test"), data["texts"][:4])
    build(data, out, shards=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("lmdb")) == ["lmdb"]  # nothing left
    assert LmdbStore(out / "test").num_texts == 4 and old.num_texts == len(data["texts"])
    assert old.get(0).image == old_image  # a reader that had it open still reads the old store


def test_output_that_is_not_a_store_is_not_replaced(data, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(LmdbBuildError, match="exists and is not an LMDB store"):
        build(data, out)
    assert (out / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(LmdbBuildError, match="is not an LMDB store"):
        build(data, tmp_path / "file")


SLOW_BUILD = """
import sys, time
from pathlib import Path
from mmcn.data import lmdb_build as L
flush = L._EnvWriter.flush
def slow_flush(self, main=None):
    print("writing", flush=True)
    time.sleep(0.3)
    flush(self, main)
L._EnvWriter.flush = slow_flush
d, out = Path(sys.argv[1]), Path(sys.argv[2])
L.build_lmdb(d / "tsv", out, d / "features", d / "tags", L.LmdbConfig(shards=3))
"""


def test_a_second_builder_of_the_same_output_fails_at_once_naming_the_first(data, tmp_path, capsys):
    make_dataset(tmp_path, n_images=9, split="train")  # two splits: test and train
    out = tmp_path / "lmdb"
    build(data, out)
    first = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(tmp_path), str(out)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert first.stdout.readline() == "writing\n"  # it holds the lock and writes
        with pytest.raises(LmdbBusyError, match=rf"{out} is being built by another process \(pid {first.pid}, lock "
                                                rf"{out}.lock\): wait for it to finish"):
            build(data, out)
        assert list(tmp_path.glob("lmdb.tmp-*")) == [tmp_path / f"lmdb.tmp-{first.pid}"]  # its temp dir untouched
        args = ["build-lmdb", "--tsv", str(data["tsv"]), "--out", str(out)]
        capsys.readouterr()
        assert cli_main(args) == 2
        assert capsys.readouterr().err == (f"error: {out} is being built by another process (pid {first.pid}, lock "
                                           f"{out}.lock): wait for it to finish, or stop it, then build again\n")
    finally:
        assert first.wait(60) == 0
    store = json.loads((out / REPORT).read_text())["splits"]
    assert set(store) == {"test", "train"} and len(LmdbStore(out / "train")) == 9 and len(LmdbStore(out / "test")) == 7
    assert not (tmp_path / "lmdb.lock").exists() and not list(tmp_path.glob("lmdb.tmp-*"))
    build(data, out)  # the lock is free again


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_builds_are_cleared_and_a_store_set_aside_restored(data, tmp_path, caplog):
    out = tmp_path / "lmdb"
    build(data, out)
    dead = dead_pid()
    (tmp_path / f"lmdb.tmp-{dead}" / "test").mkdir(parents=True)
    (tmp_path / f"lmdb.tmp-{os.getpid()}").mkdir()  # this very pid, from an earlier life (containers reuse pids)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f"lmdb.tmp-{alive.pid}").mkdir()  # not a builder of this output (it would hold the lock)
        (tmp_path / "lmdb.tmp-notapid").mkdir()
        build(data, out)
        left = sorted(p.name for p in tmp_path.glob("lmdb.tmp-*"))
        assert left == sorted([f"lmdb.tmp-{alive.pid}", "lmdb.tmp-notapid"])
        assert f"leaving {tmp_path / f'lmdb.tmp-{alive.pid}'}: process {alive.pid}" in caplog.text
    finally:
        alive.kill()
        alive.wait()
    # killed between its two renames: the previous store aside, no store under the name
    out.rename(tmp_path / f"lmdb.old-{dead}")
    tsv.write_texts(tsv.texts_path(data["tsv"], "test"), [*data["texts"], data["texts"][0]])  # this build fails
    with pytest.raises(LmdbBuildError, match="appears twice"):
        build(data, out)
    assert len(LmdbStore(out / "test")) == 7 and not list(tmp_path.glob("lmdb.old-*"))


def test_temporary_names_are_ignored_by_git():
    ignored = [line.strip() for line in (Path(__file__).resolve().parents[1] / "data/.gitignore").read_text().splitlines()]
    out = Path("data/lmdb")
    for path in (L._temp_name(out, 1234), L._aside_name(out, 1234), L._lock_name(out), out):
        assert any(fnmatch.fnmatch("/" + path.name, pattern) for pattern in ignored), path


# --- what the build says when it cannot go on -------------------------------------------

@pytest.mark.parametrize("where", ["texts", "tsv"])
def test_ids_beyond_int64_are_an_error_naming_the_line(data, tmp_path, where):
    big = 10 ** 23
    if where == "texts":
        path = tsv.texts_path(data["tsv"], "test")
        lines = path.read_text(encoding="utf-8").splitlines()
        lines[2] = json.dumps({"text_id": 52, "text": "大", "image_ids": [data["ids"][0], big]}, ensure_ascii=False)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        message = rf"{path}:3: image id {big} does not fit in a signed 64-bit integer"
    else:
        path = tsv.imgs_path(data["tsv"], "test")
        lines = path.read_bytes().splitlines(keepends=True)
        lines[4] = str(big).encode() + lines[4][lines[4].index(b"\t"):]
        path.write_bytes(b"".join(lines))
        message = rf"{path}:5: image id {big} does not fit in a signed 64-bit integer"
    with pytest.raises(LmdbBuildError, match=message + r" \(-9223372036854775808..9223372036854775807\).*re-ingest"):
        build(data, tmp_path / "lmdb")


@pytest.mark.parametrize("error", [lmdb.DiskError("mdb_txn_commit: No space left on device"),
                                   lmdb.Error("mdb_txn_commit: Input/output error"),
                                   OSError(errno.ENOSPC, "No space left on device")])
def test_a_full_disk_says_so_and_what_to_do(data, tmp_path, monkeypatch, capsys, error):
    out = tmp_path / "lmdb"
    build(data, out)
    before = file_hashes(out)

    def full(self, main=None):
        raise error

    monkeypatch.setattr(L._EnvWriter, "flush", full)
    args = ["build-lmdb", "--tsv", str(data["tsv"]), "--features", str(data["features"]), "--tags", str(data["tags"]),
            "--out", str(out)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]  # one line (and the progress bar)
    assert f"error: cannot write the LMDB store at {tmp_path}/lmdb.tmp-{os.getpid()}" in line
    assert str(error) in err and f"the disk or volume holding {tmp_path} is full or not writable (" in err
    assert "GiB free of" in err and "free space there" in err and "`mmcn build-lmdb --out DIR`" in err
    assert file_hashes(out) == before and not list(tmp_path.glob("lmdb.tmp-*"))


FILE_SIZE_LIMIT = """
import resource, signal, sys
from pathlib import Path
from mmcn.data import lmdb_build as L
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail (EFBIG) instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
d = Path(sys.argv[1])
try:
    L.build_lmdb(d / "tsv", Path(sys.argv[2]), d / "features", d / "tags")
except L.LmdbWriteError as e:
    print(e)
"""


def test_a_real_short_write_is_reported_as_a_full_disk(tmp_path):
    """A file size limit makes LMDB's page writes come up short, as on a full disk: LMDB
    then says "Input/output error"."""
    make_dataset(tmp_path, n_images=20, boxes=(40, 60))
    out = tmp_path / "lmdb"
    proc = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(tmp_path), str(out)], capture_output=True,
                          text=True, check=True)
    assert "cannot write the LMDB store at" in proc.stdout and "is full or not writable" in proc.stdout, proc.stderr
    assert not out.exists() and not list(tmp_path.glob("lmdb.tmp-*"))
