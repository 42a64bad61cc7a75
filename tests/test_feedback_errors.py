"""Fail early, fail clearly: EXIF orientation wherever pixels are used, OOV rates and warnings,
warnings on degenerate caption output (issue 17, "What to build" 3)."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from mmcn.data import image as imagelib
from mmcn.data import tsv
from mmcn.data.ingest import IngestConfig, ingest
from mmcn.data.manifest import manifest_path, read_manifest

RED = (220, 0, 0)
# the picture as a viewer shows it: 40 wide, 60 high, a red block under BOX (x1, y1, x2, y2)
DISPLAYED_W, DISPLAYED_H = 40, 60
BOX = (5, 42, 20, 55)   # y beyond the stored grid's height (40): only right on the displayed picture


def displayed_picture() -> np.ndarray:
    arr = np.full((DISPLAYED_H, DISPLAYED_W, 3), 235, np.uint8)
    x1, y1, x2, y2 = BOX
    arr[y1:y2, x1:x2] = RED
    return arr


def phone_photo(fmt: str = "JPEG") -> bytes:
    """The bytes a phone writes: the sensor's grid (60x40), EXIF Orientation 6 = "rotate 90 degrees
    clockwise to display". The stored grid is the displayed picture turned back counter-clockwise."""
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(displayed_picture(), k=1)))
    assert stored.size == (DISPLAYED_H, DISPLAYED_W)
    exif = stored.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def assert_red_under_box(rgb: np.ndarray, box=BOX, scale: float = 1.0) -> None:
    """``rgb`` (H, W, 3) is the displayed picture (maybe scaled): red inside the box, grey elsewhere."""
    assert rgb.shape[:2] == (round(DISPLAYED_H * scale), round(DISPLAYED_W * scale))
    x1, y1, x2, y2 = (round(v * scale) for v in box)
    inside = rgb[y1 + 1:y2 - 1, x1 + 1:x2 - 1].reshape(-1, 3).astype(float).mean(0)
    assert inside[0] > 170 and inside[1] < 60, inside
    outside = rgb.astype(float).copy()
    outside[max(0, y1 - 2):y2 + 2, max(0, x1 - 2):x2 + 2] = 235
    assert np.abs(outside - 235).max() < 40  # no red anywhere else (JPEG ringing aside)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decoders_give_the_displayed_picture(fmt):
    data = phone_photo(fmt)
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (60, 40) and imagelib.orientation(img) == 6  # what the file stores
    info = imagelib.inspect(data)
    assert (info.width, info.height) == (DISPLAYED_W, DISPLAYED_H)
    # features, detector training and `mmcn caption` (mmcn.vision.extract.decode -> decode_rgb)
    from mmcn.vision.extract import ExtractConfig, decode

    tensor = decode(data, ExtractConfig())
    assert tuple(tensor.shape) == (3, DISPLAYED_H, DISPLAYED_W)
    assert_red_under_box(tensor.permute(1, 2, 0).numpy())
    # ingest's re-encoding: upright pixels, no orientation tag left
    jpeg, info, boxes = imagelib.normalize(data, [list(BOX)], max_side=30)
    with Image.open(io.BytesIO(jpeg)) as out:
        assert imagelib.orientation(out) == 1 and out.size == (info.width, info.height) == (20, 30)
        assert boxes == [[v / 2 for v in BOX]]
        assert_red_under_box(np.asarray(out.convert("RGB")), BOX, 0.5)


def test_ingest_keeping_original_bytes_records_displayed_size_and_boxes(tmp_path):
    from mmcn.data.raw import CAPTIONS_FILE

    split = tmp_path / "raw" / "train"
    (split / "images").mkdir(parents=True)
    (split / "images" / "phone.jpg").write_bytes(phone_photo())
    (split / CAPTIONS_FILE).write_text(json.dumps(
        {"image": "phone.jpg", "captions": ["一个红色的方块"], "objects": [{"box": list(BOX), "label": "block"}]},
        ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "tsv"
    report = ingest(tmp_path / "raw", out, IngestConfig(workers=1, max_side=None))
    assert not report.skips  # the box is inside the displayed 40x60 picture (outside the stored 60x40 grid)
    (entry,) = read_manifest(manifest_path(out, "train"))
    assert (entry.width, entry.height) == (DISPLAYED_W, DISPLAYED_H)
    assert entry.objects[0].box == BOX
    ((_, stored),) = list(tsv.TsvReader(tsv.imgs_path(out, "train")))
    assert stored == phone_photo()  # the original bytes, EXIF tag and all: every decoder must turn them
    # the detector's training samples: pixels and boxes agree
    from mmcn.vision.train import load_samples

    (sample,) = load_samples(out, "train", ("block",), ())
    assert tuple(sample.image.shape) == (3, DISPLAYED_H, DISPLAYED_W)
    assert sample.boxes.tolist() == [list(map(float, BOX))]
    x1, y1, x2, y2 = (int(v) for v in sample.boxes[0])
    assert_red_under_box(sample.image.permute(1, 2, 0).numpy(), (x1, y1, x2, y2))


@pytest.mark.parametrize("side", [0, 30])
def test_report_thumbnails_are_upright_under_their_boxes(side):
    from mmcn.eval.report import _data_uri

    uri = _data_uri(phone_photo(), side)
    data = base64.b64decode(uri.split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as img:
        assert imagelib.orientation(img) == 1  # no viewer can turn it a second time
        scale = img.height / DISPLAYED_H
        assert img.size == (round(DISPLAYED_W * scale), DISPLAYED_H * scale)
        assert_red_under_box(np.asarray(img.convert("RGB")), BOX, scale)


# --- degenerate caption output, galleries under 10 ---------------------------------------

def test_caption_warnings_fire_past_half_the_images():
    from mmcn.eval.evaluate import caption_warnings

    assert caption_warnings({1: "", 2: " ", 3: "一只猫"})[0].startswith("2 of 3 generated captions are empty")
    assert caption_warnings({1: "", 2: "一只猫", 3: "一只狗", 4: ""}) == []  # half is not most
    (same,) = caption_warnings({i: "一只猫" for i in range(3)} | {3: "狗", 4: ""})
    assert same.startswith("one caption, '一只猫', was generated for 3 of 5 images")
    assert len(caption_warnings({i: "" for i in range(4)})) == 1  # empty ones are not "one caption"


def test_gallery_notes_name_each_trivial_recall():
    from mmcn.eval.retrieval_metrics import gallery_notes

    assert gallery_notes(11, "images") == []
    assert gallery_notes(10, "images")[0].startswith("the gallery has 10 images: R@10 ranks all of them, so it is 100")
    assert gallery_notes(3, "texts")[0].startswith("the gallery has 3 texts: R@5, R@10 rank all of them, so they are")
