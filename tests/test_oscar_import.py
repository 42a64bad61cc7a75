"""``mmcn import-features`` / ``features.source``: released Oscar/VinVL feature folders (both
row styles, written here by hand in the release's layout) read into feature shards that equal
the source values, matched by the documented key -> id rule, with every problem reported."""
from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmcn.cli import main as cli_main
from mmcn.data import features as region_features
from mmcn.data import tsv
from mmcn.data.oscar_import import FeatureImportError, ImportConfig, image_id_of, import_features

# ingested image id -> (ingested width, height); the release saw each photo 10x larger
SIZES = {101: (40, 30), 102: (30, 40), 103: (50, 50), 104: (36, 24)}


def jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, "JPEG")
    return buf.getvalue()


def ingested(root: Path, ids=tuple(SIZES)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with tsv.TsvWriter(tsv.imgs_path(root, "train")) as w:
        for i in ids:
            w.write(i, base64.b64encode(jpeg(*SIZES[i])))
    return root


def released_image(image_id: int, n: int, orig: tuple[int, int]):
    """(features n x 2054 as the release stores them, label boxes) for a photo of size ``orig``."""
    rng = np.random.default_rng(image_id)
    w, h = orig
    x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
    rects = np.stack([x1, y1, x1 + rng.uniform(5, w / 2, n), y1 + rng.uniform(5, h / 2, n)], axis=1)
    geo = np.stack([rects[:, 0] / w, rects[:, 1] / h, rects[:, 2] / w, rects[:, 3] / h,
                    (rects[:, 2] - rects[:, 0]) / w, (rects[:, 3] - rects[:, 1]) / h], axis=1)
    feats = np.concatenate([rng.standard_normal((n, 2048)), geo], axis=1).astype(np.float32)
    boxes = [{"class": f"thing{k}", "rect": [float(v) for v in r], "conf": float(0.9 - 0.1 * k),
              "attributes": ["red"], "attr_scores": [0.5]} for k, r in enumerate(rects)]
    return feats, boxes


def b64(feats: np.ndarray) -> str:
    return base64.b64encode(feats.astype("<f4").tobytes()).decode()


def write_release(folder: Path, style: str, images: dict) -> None:
    """``images``: key -> (features, boxes, (w, h)); in Oscar's captioning (JSON rows) or
    retrieval (3 columns + predictions.tsv + imageid2idx.json) layout."""
    folder.mkdir(parents=True, exist_ok=True)
    if style == "caption":
        with open(folder / "train.feature.tsv", "w") as f, open(folder / "train.label.tsv", "w") as g:
            for key, (feats, boxes, _) in images.items():
                f.write(f"{key}\t{json.dumps({'num_boxes': len(feats), 'features': b64(feats)})}\n")
                g.write(f"{key}\t{json.dumps(boxes)}\n")
    else:
        with open(folder / "features.tsv", "w") as f, open(folder / "predictions.tsv", "w") as g:
            for key, (feats, boxes, (w, h)) in images.items():
                f.write(f"{key}\t{len(feats)}\t{b64(feats)}\n")
                g.write(f"{key}\t{json.dumps({'image_h': h, 'image_w': w, 'objects': boxes})}\n")
        (folder / "imageid2idx.json").write_text(json.dumps({k: i for i, k in enumerate(images)}))


def release(ids=tuple(SIZES), keys=lambda i: str(i)) -> dict:
    out = {}
    for n, i in enumerate(ids):
        w, h = SIZES[i]
        feats, boxes = released_image(i, 3 + n, (10 * w, 10 * h))
        out[keys(i)] = (feats, boxes, (10 * w, 10 * h))
    return out


@pytest.mark.parametrize(("style", "keys"), [("caption", lambda i: f"COCO_val2014_{i:012d}"), ("retrieval", str)])
def test_release_imported_equals_source(tmp_path, style, keys):
    tsv_dir = ingested(tmp_path / "tsv")
    images = release(keys=keys)
    write_release(tmp_path / "release", style, images)
    report = import_features(tmp_path / "release", tsv_dir, tmp_path / "features", ImportConfig(shard_size=3))
    assert report["splits"]["train"] == {"images": 4, "boxes": 3 + 4 + 5 + 6, "skipped": 0}
    assert report["skipped"] == [] and report["rows_without_image"]["count"] == 0
    assert [p.name for p in region_features.shard_paths(tmp_path / "features", "train")] == \
        ["part-00000.parquet", "part-00001.parquet"]
    got = list(region_features.iter_split(tmp_path / "features", "train"))
    assert [r.image_id for r in got] == list(SIZES)  # the ingested order
    for r, (feats, boxes, _) in zip(got, images.values()):
        w, h = SIZES[r.image_id]
        assert (r.width, r.height) == (w, h)
        np.testing.assert_array_equal(r.features, feats)  # bit for bit
        np.testing.assert_allclose(r.boxes, np.asarray([b["rect"] for b in boxes]) / 10, rtol=1e-5, atol=1e-4)
        assert r.classes == [b["class"] for b in boxes]
        np.testing.assert_allclose(r.class_conf, [b["conf"] for b in boxes], rtol=1e-6)
        assert r.attributes == [["red"]] * len(boxes) and r.attr_conf == [[0.5]] * len(boxes)
    chain = json.loads((tmp_path / "features" / "_chain.json").read_text())
    assert chain["features"] == {"source": "imported"}


def test_every_problem_is_reported_per_image(tmp_path):
    tsv_dir = ingested(tmp_path / "tsv")
    images = release(ids=(101, 102, 103))
    images["104"] = (*released_image(104, 3, (240, 360)), (240, 360))  # a portrait photo: 104 is 36x24
    images["999"] = release(ids=(101,))["101"]           # no such ingested image
    images["no_id_here"] = release(ids=(103,))["103"]    # no id in the key
    write_release(tmp_path / "release", "caption", images)
    # 103: 2048 floats per box (no geometry) instead of 2054
    rows = (tmp_path / "release" / "train.feature.tsv").read_text().splitlines()
    short = images["103"][0][:, :2048]
    rows[2] = f"103\t{json.dumps({'num_boxes': len(short), 'features': b64(short)})}"
    (tmp_path / "release" / "train.feature.tsv").write_text("\n".join(rows) + "\n")
    report = import_features(tmp_path / "release", tsv_dir, tmp_path / "features")
    reasons = {s["image_id"]: s["reason"] for s in report["skipped"]}
    assert report["splits"]["train"] == {"images": 2, "boxes": 3 + 4, "skipped": 2}, report["skipped"]
    assert "2048 floats per box" in reasons[103]
    assert "another photo" in reasons[104] and "aspect" in reasons[104]
    assert [r.image_id for r in region_features.iter_split(tmp_path / "features", "train")] == [101, 102]
    assert report["rows_without_image"] == {"count": 1, "first_keys": ["999"]}
    assert report["keys_without_id"] == {"count": 1, "first_keys": ["no_id_here"]}
    stored = json.loads((tmp_path / "features" / "features_report.json").read_text())
    assert stored["skipped"] == report["skipped"]


def test_label_count_mismatch_and_missing_label_row(tmp_path):
    tsv_dir = ingested(tmp_path / "tsv")
    images = release()
    feats, boxes, size = images["101"]
    images["101"] = (feats, boxes[:-1], size)
    feats, boxes, size = images["102"]
    images["102"] = (feats, boxes, (size[1], size[0]))  # the label row's size contradicts its rectangles
    write_release(tmp_path / "release", "retrieval", images)
    lines = (tmp_path / "release" / "predictions.tsv").read_text().splitlines()
    (tmp_path / "release" / "predictions.tsv").write_text("\n".join(lines[:-1]) + "\n")  # 104's labels gone
    report = import_features(tmp_path / "release", tsv_dir, tmp_path / "features")
    reasons = {s["image_id"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {101, 102, 104}
    assert "label row has 2 boxes, the feature row 3" in reasons[101]
    assert "imply a 300x400 image, the label row says 400x300" in reasons[102]
    assert "no label row" in reasons[104]


def test_unusable_sources_fail_without_touching_the_output(tmp_path):
    tsv_dir = ingested(tmp_path / "tsv")
    out = tmp_path / "features"
    (out / "train").mkdir(parents=True)
    (out / "train" / "part-00000.parquet").write_bytes(b"earlier output")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureImportError, match="no feature file"):
        import_features(tmp_path / "empty", tsv_dir, out)
    write_release(tmp_path / "nolabels", "retrieval", release())
    os.remove(tmp_path / "nolabels" / "predictions.tsv")
    with pytest.raises(FeatureImportError, match="no label file"):
        import_features(tmp_path / "nolabels", tsv_dir, out)
    write_release(tmp_path / "other", "retrieval", release(keys=lambda i: str(i + 5000)))
    with pytest.raises(FeatureImportError, match="no ingested image .* got features"):
        import_features(tmp_path / "other", tsv_dir, out)
    assert (out / "train" / "part-00000.parquet").read_bytes() == b"earlier output"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".features")]


@pytest.mark.parametrize(("key", "image_id"), [
    ("391895", 391895), ("COCO_val2014_000000391895", 391895), ("coco_391895", 391895),
    ("flickr30k_1000092795", 1000092795), ("-5", -5), ("abc", None), ("x_99999999999999999999999", None)])
def test_key_to_image_id(key, image_id):
    assert image_id_of(key) == image_id


def test_cli(tmp_path, capsys):
    tsv_dir = ingested(tmp_path / "tsv")
    write_release(tmp_path / "release", "retrieval", release())
    args = ["import-features", str(tmp_path / "release"), "--tsv", str(tsv_dir), "--out", str(tmp_path / "f")]
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["images"] == 4
    assert cli_main(["import-features", str(tmp_path / "nothing"), "--tsv", str(tsv_dir)]) == 2
    err = capsys.readouterr().err
    assert "no feature file" in err and len(err.strip().splitlines()) == 1


def test_exif_rotated_image_is_matched_as_displayed(tmp_path):
    """The stored pixels of 101 are 30x40 with EXIF Orientation 6 (turn 90 degrees): it displays
    40x30, the frame mmcn's decoders (and VinVL's OpenCV reader) give the detector, so the
    release's 400x300 features fit it and the record says 40x30."""
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (30, 40), (10, 200, 30)).save(buf, "JPEG", exif=exif)
    tsv_dir = tmp_path / "tsv"
    tsv_dir.mkdir()
    with tsv.TsvWriter(tsv.imgs_path(tsv_dir, "train")) as w:
        w.write(101, base64.b64encode(buf.getvalue()))
    write_release(tmp_path / "release", "caption", release(ids=(101,)))
    report = import_features(tmp_path / "release", tsv_dir, tmp_path / "features")
    assert report["splits"]["train"] == {"images": 1, "boxes": 3, "skipped": 0}, report["skipped"]
    (r,) = region_features.iter_split(tmp_path / "features", "train")
    assert (r.width, r.height) == (40, 30)
