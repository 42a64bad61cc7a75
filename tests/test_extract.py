"""Features stage library: Ray Data extraction into Parquet shards, bad rows, resume."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from mmcn import provenance
from mmcn.data import features as region_features
from mmcn.data import tsv
from mmcn.vision.config import detector_config
from mmcn.vision.detector import build_detector, save_detector
from mmcn.vision.extract import ExtractConfig, extract_features


def jpeg(size, color) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, (235, 235, 235))
    img.paste(Image.new("RGB", (size[0] // 3, size[1] // 3), color), (size[0] // 4, size[1] // 4))
    img.save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("detector")
    save_detector(build_detector(detector_config("small")), out)
    return out


@pytest.fixture
def tsv_dir(tmp_path):
    root = tmp_path / "tsv"
    root.mkdir()
    rows = {"train": [(11, jpeg((128, 96), (200, 0, 0))), (12, jpeg((96, 128), (0, 0, 200))),
                      (13, b"definitely not an image"), (14, jpeg((1, 1), (0, 0, 0))),
                      (15, jpeg((128, 128), (0, 150, 0)))],
            "test": [(21, jpeg((120, 80), (0, 0, 0)))]}
    for split, items in rows.items():
        with tsv.TsvWriter(tsv.imgs_path(root, split)) as w:
            for image_id, data in items:
                w.write(image_id, __import__("base64").b64encode(data))
    return root


def test_extract_shapes_geometry_bad_rows_and_resume(ray_session, detector_dir, tsv_dir, tmp_path, monkeypatch,
                                                     caplog):
    out = tmp_path / "features"
    cfg = ExtractConfig(min_boxes=3, max_boxes=5, shard_size=2, batch_size=2)
    report = extract_features(detector_dir, tsv_dir, out, cfg)
    assert {(s["image_id"], s["reason"].split(":")[0]) for s in report["skipped"]} == {
        (13, "not an image"), (14, "image of 1x1 is too small")}
    assert report["splits"]["train"]["images"] == 3 and report["splits"]["test"]["images"] == 1
    assert [p.name for p in region_features.shard_paths(out, "train")] == ["part-00000.parquet", "part-00001.parquet",
                                                             "part-00002.parquet"]
    records = list(region_features.iter_split(out, "train"))
    assert [r.image_id for r in records] == [11, 12, 15]  # TSV order, bad rows left out
    for r in records:
        assert 3 <= r.num_boxes <= 5 and r.features.shape == (r.num_boxes, 2054)
        assert np.all(np.diff(r.class_conf) <= 1e-6)  # sorted by confidence
        assert np.all(r.boxes[:, 0] >= 0) and np.all(r.boxes[:, 2] <= r.width + 1e-3)
        wh = np.array([r.width, r.height, r.width, r.height], np.float32)
        np.testing.assert_allclose(r.features[:, 2048:2052] * wh, r.boxes, rtol=1e-5, atol=1e-3)
        assert len(r.attributes) == r.num_boxes and all(c in detector_config("small").classes for c in r.classes)

    # resume: a lost shard (the one of the two bad rows) and a truncated one are redone, a killed
    # writer's temporary file is cleared, the rest is kept, bytes (report included) end up identical
    before = {p.name: p.read_bytes() for p in region_features.shard_paths(out, "train")}
    report_bytes = (out / "features_report.json").read_bytes()
    kept_mtime = region_features.shard_path(out, "train", 0).stat().st_mtime_ns
    region_features.shard_path(out, "train", 1).unlink()
    cut = region_features.shard_path(out, "train", 2)
    cut.write_bytes(before[cut.name][: len(before[cut.name]) // 2])
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale = out / "train" / f".part-00001.parquet.tmp-{dead.pid}"
    stale.write_bytes(b"half a shard")
    with caplog.at_level(logging.INFO, logger="mmcn.vision.extract"):
        again = extract_features(detector_dir, tsv_dir, out, cfg)
    assert {p.name: p.read_bytes() for p in region_features.shard_paths(out, "train")} == before
    assert region_features.shard_path(out, "train", 0).stat().st_mtime_ns == kept_mtime
    assert (out / "features_report.json").read_bytes() == report_bytes and again == report
    assert f"{cut} is unreadable (ArrowInvalid" in caplog.text and "extracting it again" in caplog.text
    assert not stale.exists() and str(stale) in caplog.text

    # the code that extracts changed (an extra file in the walker's result stands for an edit of
    # extract.py): nothing is resumed, the folder is cleared and every shard extracted again
    edit = tmp_path / "extract_edit.py"
    edit.write_text("# an edit\n")
    walk = provenance.code_files
    monkeypatch.setattr(provenance, "code_files", lambda target: [*walk(target), edit])
    (out / "stale").touch()
    redone = extract_features(detector_dir, tsv_dir, out, cfg)
    assert not (out / "stale").exists() and redone["splits"] == report["splits"]
    assert region_features.shard_path(out, "train", 0).stat().st_mtime_ns != kept_mtime
    assert {p.name: p.read_bytes() for p in region_features.shard_paths(out, "train")} == before
    assert edit.as_posix() in json.loads((out / "_fingerprint.json").read_text())["code"]

    # other settings: the old shards are not reused
    changed = extract_features(detector_dir, tsv_dir, out, ExtractConfig(min_boxes=2, max_boxes=2, shard_size=2))
    assert all(r.num_boxes == 2 for r in region_features.iter_split(out, "train"))
    assert json.loads((out / "_fingerprint.json").read_text())["settings"]["max_boxes"] == 2
    assert changed["splits"]["train"]["boxes"] == 6

    # an image that cannot fit max_memory_mb even alone: the actor's error, as one line (not Ray's traceback)
    from mmcn.vision.extract import MemoryBudgetError
    with pytest.raises(MemoryBudgetError, match=r"^image (11|21) \((train|test) line 1\): .* set features.max_memory_mb to \d+ "
                       r"or more \(0: no limit\)$"):
        extract_features(detector_dir, tsv_dir, tmp_path / "tight", ExtractConfig(max_memory_mb=10))


@pytest.mark.parametrize("setting, message", [
    ({"workers": 0}, r"^workers: 0 is below 1 \(detector actors\)"),
    ({"batch_size": 0}, r"^batch_size: 0 is below 1"),
    ({"shard_size": -3}, r"^shard_size: -3 is below 1"),
    ({"min_boxes": 0}, r"^min_boxes: 0 is below 1"),
    ({"min_boxes": 10, "max_boxes": 5}, r"^max_boxes: 5 is below min_boxes \(10\): raise max_boxes or lower min_boxes"),
    ({"score_thresh": 2}, r"^score_thresh: 2 is not between 0 and 1"),
    ({"score_thresh": 0.0}, r"^score_thresh: 0.0 is not between 0 and 1"),
    ({"score_thresh": "1e-3"}, r"^score_thresh: '1e-3' is not a number \(YAML reads 1e-3 as text"),
    ({"nms_thresh": 0}, r"^nms_thresh: 0 is not in \(0, 1\]"),
    ({"cpus_per_worker": 0}, r"^cpus_per_worker: 0 is not above 0"),
    ({"max_boxes": 50.5}, r"^max_boxes: 50.5 is not a whole number"),
    ({"workers": True}, r"^workers: True is not a whole number"),
    ({"use_gpu": "no"}, r"^use_gpu: 'no' is not true or false"),
    ({"min_side": 100, "max_pixels": 9999}, r"^max_pixels: 9999 is below min_side squared \(10000\)"),
])
def test_settings_are_checked_with_the_field_named(setting, message):
    with pytest.raises(ValueError, match=message):
        ExtractConfig(**setting)
    ExtractConfig(min_boxes=1, max_boxes=1, score_thresh=0.5, nms_thresh=1, cpus_per_worker=0.5)  # edges that work


def test_bad_settings_or_inputs_leave_existing_shards_untouched(detector_dir, tsv_dir, tmp_path):
    out = tmp_path / "features"
    (out / "train").mkdir(parents=True)
    (out / "train" / "part-00000.parquet").write_bytes(b"a shard of an earlier run")
    (out / "_fingerprint.json").write_text("{}")
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"^max_boxes: 5 is below min_boxes \(10\)"):
        extract_features(detector_dir, tsv_dir, out, ExtractConfig(min_boxes=10, max_boxes=5))
    (tmp_path / "no_detector").mkdir()
    with pytest.raises(FileNotFoundError, match="no_detector: no detector \\(config.json, model.safetensors missing"):
        extract_features(tmp_path / "no_detector", tsv_dir, out, ExtractConfig())
    with pytest.raises(FileNotFoundError, match=r"no \{split\}_imgs.tsv: run the ingest stage"):
        extract_features(detector_dir, tmp_path / "no_detector", out, ExtractConfig())
    # a split that lost its images TSV (its texts still there) is no split to leave out silently
    partial = tmp_path / "partial"
    shutil.copytree(tsv_dir, partial)
    next(partial.glob("*_imgs.tsv")).unlink()
    with pytest.raises(FileNotFoundError, match=r"_imgs.tsv missing while the split's other files are there"):
        extract_features(detector_dir, partial, out, ExtractConfig(nms_thresh=0.4))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_killed_run_resumes_to_the_bytes_of_an_uninterrupted_one(ray_session, detector_dir, tsv_dir, tmp_path):
    settings = {"min_boxes": 3, "max_boxes": 5, "shard_size": 1, "batch_size": 2}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    extract_features(detector_dir, tsv_dir, whole, ExtractConfig(**settings))
    # its own Ray; once shard train/2 is on disk the detector actor kills the run (the driver's process
    # group: driver, Ray's services) and then itself, before it could start on a shard already queued to it
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from mmcn.vision import extract as E
        GROUP = os.getpgid(0)
        class DyingExtractor(E.ShardExtractor):
            def run(self, task):
                stats = super().run(task)
                if (task.split, task.index) == ("train", 2):
                    os.killpg(GROUP, signal.SIGKILL)
                    os.kill(os.getpid(), signal.SIGKILL)
                return stats
        E.ShardExtractor = DyingExtractor
        E.extract_features(Path({str(detector_dir)!r}), Path({str(tsv_dir)!r}), Path({str(killed)!r}),
                           E.ExtractConfig(**{settings!r}))
    """)
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert code == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    left = sorted(p.name for p in killed.rglob("*.parquet"))
    assert left == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # train/0..2
    assert not (killed / "features_report.json").exists()

    extract_features(detector_dir, tsv_dir, killed, ExtractConfig(**settings))
    files = {p.relative_to(whole): p.read_bytes() for p in whole.rglob("*") if p.is_file()}
    assert {p.relative_to(killed): p.read_bytes() for p in killed.rglob("*") if p.is_file()} == files
    report = json.loads((killed / "features_report.json").read_text())  # every shard's, not only the resumed ones'
    assert report["splits"]["train"]["images"] == 3 and len(report["skipped"]) == 2 and len(report["shards"]) == 6


# --------------------------------------------------------------------------- bounded memory

# the small detector's network input for the photo sizes below (DetectorConfig "small": shorter side
# 192, longer side at most 320, padded to a multiple of 16): (height, width)
NET = {(128, 96): (192, 256), (96, 128): (256, 192), (120, 80): (192, 288)}


@pytest.fixture
def shapes_tsv(tmp_path):
    """One split of 9 photos of three sizes (w, h) in an interleaved order, and one bad row."""
    root = tmp_path / "shapes"
    root.mkdir()
    sizes = [(128, 96), (96, 128), (128, 96), (120, 80), (128, 96), (96, 128), (128, 96), (96, 128), (128, 96)]
    rng = np.random.default_rng(0)
    with tsv.TsvWriter(tsv.imgs_path(root, "train")) as w:
        for k, size in enumerate(sizes):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
            w.write(100 + k, __import__("base64").b64encode(buf.getvalue()))
            if k == 4:
                w.write(99, __import__("base64").b64encode(b"not an image"))
    return root, sizes


def _extract(detector_dir, tsv_dir, out, **settings):
    from mmcn.vision.extract import ShardExtractor, ShardTask

    actor = ShardExtractor(str(detector_dir), str(tsv_dir), str(out), asdict_cfg(**settings))
    calls = []
    detect = actor.model.detect
    actor.model.detect = lambda images, **kw: calls.append([tuple(x.tensor.shape[1:]) for x in images]) \
        or detect(images, **kw)
    stats = actor.run(ShardTask("train", 0, 0, 10))
    return actor, calls, stats, region_features.shard_path(out, "train", 0).read_bytes()


def asdict_cfg(**settings) -> dict:
    from dataclasses import asdict

    return asdict(ExtractConfig(**{"min_boxes": 4, "max_boxes": 6, "shard_size": 10, **settings}))


def test_batches_hold_one_network_shape_and_leave_the_bytes_alone(detector_dir, shapes_tsv, tmp_path, pinned_torch,
                                                                  monkeypatch, caplog):
    """Batches by network shape, capped by batch_size and by max_memory_mb's estimate, halved when the
    measured peak passes the limit: the shard's bytes are those of batch 1 each time."""
    from mmcn.vision import extract

    tsv_dir, sizes = shapes_tsv
    nets = [NET[s] for s in sizes]
    _, calls, stats, one = _extract(detector_dir, tsv_dir, tmp_path / "b1", batch_size=1, max_memory_mb=0)
    assert calls == [[s] for s in nets]
    assert stats["images"] == 9 and [s["image_id"] for s in stats["skipped"]] == [99]

    # batch_size 3: a batch runs when 3 of a shape are pending, the rest at the end, the group holding the
    # oldest image first (the rule, applied by hand to the order a b a c a - b a b a)
    a, b, c = NET[(128, 96)], NET[(96, 128)], NET[(120, 80)]
    _, calls, _, three = _extract(detector_dir, tsv_dir, tmp_path / "b3", batch_size=3, max_memory_mb=0)
    assert calls == [[a, a, a], [b, b, b], [c], [a, a]]
    assert three == one

    # max_memory_mb: with the detector's memory taken as 1000 MB, room for 2 images of shape a by the estimate
    # (input bytes x (1 + the small detector's activation factor))
    per_image = a[0] * a[1] * 3 * 4 * (1 + extract.ACTIVATION_FACTOR["small"]) / 2 ** 20
    limit = int(1000 + 2.5 * per_image)
    monkeypatch.setattr(extract, "rss_mb", lambda: 1000.0)
    monkeypatch.setattr(extract, "peak_rss_mb", lambda: 1000.0)  # the forward's peak: not this process's real one
    with caplog.at_level(logging.INFO, logger="mmcn.vision.extract"):
        _, calls, _, budget = _extract(detector_dir, tsv_dir, tmp_path / "mem", batch_size=8, max_memory_mb=limit)
    assert [len(batch) for batch in calls if batch[0] == a] == [2, 2, 1] and budget == one
    assert "batches of 256x192 network input held to 2 image(s)" in caplog.text

    # the measured peak passes the limit during every forward: batches halve (8 -> 1 for 2 pending of a shape)
    peak = iter(range(10 ** 6, 2 * 10 ** 6, 10))
    monkeypatch.setattr(extract, "peak_rss_mb", lambda: float(next(peak)))
    with caplog.at_level(logging.WARNING, logger="mmcn.vision.extract"):
        actor, calls, _, halved = _extract(detector_dir, tsv_dir, tmp_path / "rss", batch_size=4, max_memory_mb=limit)
    assert max(len(batch) for batch in calls[1:]) == 1 and halved == one
    assert "passed features.max_memory_mb" in caplog.text and "batches of at most 1 from now on" in caplog.text


def test_originals_are_dropped_once_prepared(detector_dir, shapes_tsv, tmp_path, monkeypatch):
    import weakref

    from mmcn.vision import extract

    tsv_dir, _ = shapes_tsv
    originals, live_at_detect = [], []
    decode = extract.decode

    def counting_decode(data, cfg):
        image = decode(data, cfg)
        originals.append(weakref.ref(image))
        return image

    monkeypatch.setattr(extract, "decode", counting_decode)
    actor = extract.ShardExtractor(str(detector_dir), str(tsv_dir), str(tmp_path / "out"), asdict_cfg(batch_size=8))
    detect = actor.model.detect
    actor.model.detect = lambda images, **kw: live_at_detect.append(sum(r() is not None for r in originals)) \
        or detect(images, **kw)
    actor.run(extract.ShardTask("train", 0, 0, 10))
    assert len(originals) == 9  # every good image decoded once
    assert max(live_at_detect) <= 1  # at most the image being added; the others are network-size copies
    assert all(r() is None for r in originals)


def test_one_image_that_cannot_fit_is_an_error_naming_it_and_the_setting(detector_dir, shapes_tsv, tmp_path,
                                                                          monkeypatch):
    from mmcn.vision import extract

    monkeypatch.setattr(extract, "rss_mb", lambda: 1000.0)
    with pytest.raises(extract.MemoryBudgetError, match=r"^image 100 \(train line 1\): detecting it at 256x192 "
                       r"network input needs about \d+ MB \(small\) besides the 1000 MB the detector actor holds, "
                       r"more than features.max_memory_mb=1001: set features.max_memory_mb to \d+ or more"):
        _extract(detector_dir, shapes_tsv[0], tmp_path / "out", max_memory_mb=1001)
    assert not list((tmp_path / "out").rglob("*.parquet*"))  # no shard, no temporary file left


def test_peak_memory_is_measured_from_a_reset():
    """The guard's measurement: the peak since reset_peak_rss, not the process's lifetime peak."""
    from mmcn.vision import extract

    block = np.ones(300 * 2 ** 20 // 8)  # 300 MB, touched
    del block
    extract.reset_peak_rss()
    start = extract.rss_mb()
    assert extract.peak_rss_mb() < start + 100  # the 300 MB peak before the reset is forgotten
    block = np.ones(200 * 2 ** 20 // 8)
    assert extract.peak_rss_mb() >= start + 190
    del block


def test_a_shard_written_row_by_row_has_the_bytes_of_one_written_at_once(tmp_path):
    """The extractor streams rows into ShardWriter: row groups of a fixed size, so the bytes do not
    depend on how the rows came; the stats are in the footer as write_shard puts them."""
    rng = np.random.default_rng(3)
    records = []
    for k in range(region_features.ROW_GROUP_ROWS * 2 + 5):  # two full row groups and a part
        n = int(rng.integers(1, 5))
        boxes = np.sort(rng.uniform(0, 90, (n, 4)).astype(np.float32), axis=1)
        records.append(region_features.RegionFeatures(
            k, 100, 90, boxes, ["circle"] * n, np.full(n, 0.5, np.float32),
            region_features.region_features(rng.standard_normal((n, 2048)).astype(np.float32), boxes, 100, 90)))
    stats = {"split": "train", "index": 0, "images": len(records), "skipped": [], "boxes": 7}
    whole = region_features.shard_path(tmp_path / "whole", "train", 0)
    region_features.write_shard(whole, records, stats=stats)
    streamed = region_features.shard_path(tmp_path / "streamed", "train", 0)
    with region_features.ShardWriter(streamed) as shard:
        for r in records:
            shard.write([r])
        shard.finish(stats)
    assert streamed.read_bytes() == whole.read_bytes()
    assert region_features.read_footer(streamed) == (len(records), stats)
    assert [r.image_id for r in region_features.read_shard(streamed)] == list(range(len(records)))
    assert os.listdir(streamed.parent) == [streamed.name]  # no temporary file left
