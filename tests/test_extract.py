"""Features stage library: Ray Data extraction into Parquet shards, bad rows, resume."""
from __future__ import annotations

import io
import json

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


def test_extract_shapes_geometry_bad_rows_and_resume(ray_session, detector_dir, tsv_dir, tmp_path, monkeypatch):
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

    # resume: a lost shard is redone, the rest is kept, bytes end up identical
    before = {p.name: p.read_bytes() for p in region_features.shard_paths(out, "train")}
    kept_mtime = region_features.shard_path(out, "train", 0).stat().st_mtime_ns
    region_features.shard_path(out, "train", 1).unlink()
    again = extract_features(detector_dir, tsv_dir, out, cfg)
    assert {p.name: p.read_bytes() for p in region_features.shard_paths(out, "train")} == before
    assert region_features.shard_path(out, "train", 0).stat().st_mtime_ns == kept_mtime
    assert again["splits"] == report["splits"]

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
