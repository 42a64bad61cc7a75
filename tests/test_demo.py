"""Tests of the demo generator: raw layout, determinism, captions grounded in the drawn scene."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmcn.data import raw
from mmcn.data.demo import CLASS_ZH, CLASSES, COLOUR_ZH, COLOURS, SIZES, DemoConfig, generate

SMALL = DemoConfig(seed=3, train=12, valid=3, test=3)
POSITIONS = (("左上角", "上方", "右上角"), ("左侧", "中间", "右侧"), ("左下角", "下方", "右下角"))
ALL_POSITIONS = [p for row in POSITIONS for p in row]


def _where(box, size: int) -> str:
    """The position word of a box centre by thirds of the image (computed here, not by mmcn)."""
    column = min(2, int((box[0] + box[2]) / 2 * 3 / size))
    row = min(2, int((box[1] + box[3]) / 2 * 3 / size))
    return POSITIONS[row][column]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _records(root: Path, split: str) -> list[raw.RawRecord]:
    records, skips = raw.read_records(root, split)
    assert skips == []
    return records


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "raw"
    return out, generate(out, SMALL)


def test_layout_and_records(demo):
    root, summary = demo
    assert raw.splits_in(root) == ["train", "valid", "test"]
    assert summary["images"] == {"train": 12, "valid": 3, "test": 3}
    n_objects = 0
    for split in raw.SPLITS:
        records = _records(root, split)
        assert len(records) == getattr(SMALL, split)
        assert raw.list_images(root / split) == (sorted(r.image for r in records), [])  # (good, not UTF-8)
        for r in records:
            assert re.fullmatch(r"\d{6}\.jpg", r.image)
            with Image.open(root / split / "images" / r.image) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (128, 128)
            assert len(r.captions) == SMALL.captions_per_image == len(set(r.captions))
            assert all(re.search(r"[\u4e00-\u9fff]", c) for c in r.captions)
            assert SMALL.min_objects <= len(r.objects) <= SMALL.max_objects
            n_objects += len(r.objects)
            for o in r.objects:
                x1, y1, x2, y2 = o.box
                assert all(float(v).is_integer() for v in o.box)
                assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
                assert o.label in CLASSES
                assert len(o.attributes) == 2 and o.attributes[0] in COLOURS and o.attributes[1] in SIZES
    assert summary["objects"] == n_objects == sum(summary["per_class"].values())


def test_generate_replaces_output_dir(tmp_path):
    out = tmp_path / "raw"
    (out / "old").mkdir(parents=True)
    (out / "old" / "stale.txt").write_text("x")
    generate(out, DemoConfig(train=2, valid=0, test=0))
    assert sorted(p.name for p in out.iterdir()) == ["train"]
    assert len(_records(out, "train")) == 2


def test_deterministic(tmp_path, demo):
    root, _ = demo
    again = tmp_path / "again"
    generate(again, SMALL)
    assert _files(again) == _files(root)

    more_train = tmp_path / "more_train"
    generate(more_train, dataclasses.replace(SMALL, train=5))
    for split in ("valid", "test"):
        assert _files(more_train / split) == _files(root / split)
    # The first train images do not depend on how many follow them.
    old_train, new_train = _files(root / "train"), _files(more_train / "train")
    assert all(data == old_train[name] for name, data in new_train.items() if name.startswith("images/"))
    old_lines = old_train["captions.jsonl"].decode().splitlines()
    assert new_train["captions.jsonl"].decode().splitlines() == old_lines[:5]

    other_seed = tmp_path / "other_seed"
    generate(other_seed, dataclasses.replace(SMALL, seed=4))
    old, new = _files(root / "train"), _files(other_seed / "train")
    assert all(old[k] != new[k] for k in old if k.startswith("images/"))
    # Each split has its own images, not copies of another split's.
    valid = _files(root / "valid")
    assert all(valid[k] != old[k] for k in valid if k.startswith("images/"))


def test_config_validation():
    with pytest.raises(ValueError, match="captions_per_image"):
        DemoConfig(captions_per_image=20)
    with pytest.raises(ValueError, match="max_objects"):
        DemoConfig(min_objects=3, max_objects=2)


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda c: float(np.abs(rgb - np.array(COLOURS[c])).max()))


def test_shapes_are_drawn_in_their_boxes(demo):
    root, _ = demo
    checked = 0
    for split in raw.SPLITS:
        for r in _records(root, split):
            pixels = np.asarray(Image.open(root / split / "images" / r.image).convert("RGB"), dtype=float)
            for i, o in enumerate(r.objects):
                x1, y1, x2, y2 = (int(v) for v in o.box)
                others = [p.box for j, p in enumerate(r.objects) if j != i]
                overlapped = any(x1 < b[2] and b[0] < x2 and y1 < b[3] and b[1] < y2 for b in others)
                if overlapped and i != len(r.objects) - 1:  # objects are listed in drawing order
                    continue
                cx, cy, h = (x1 + x2) // 2, (y1 + y2) // 2, max(1, min(x2 - x1, y2 - y1) // 10)
                mean = pixels[cy - h:cy + h + 1, cx - h:cx + h + 1].reshape(-1, 3).mean(axis=0)
                colour = o.attributes[0]
                assert np.abs(mean - np.array(COLOURS[colour])).max() < 40, (split, r.image, o)
                assert _nearest_colour(mean) == colour
                # Just above the tight box is background, not the shape.
                above = (cx, y1 - 2)
                if y1 >= 2 and not any(b[0] - 2 <= above[0] < b[2] + 2 and b[1] - 2 <= above[1] < b[3] + 2
                                       for b in others):
                    assert np.abs(pixels[above[1], above[0]] - COLOURS[colour]).max() > 60, (split, r.image, o)
                checked += 1
    assert checked >= 20


def test_sizes_are_separable(demo):
    root, _ = demo
    for split in raw.SPLITS:
        for r in _records(root, split):
            for o in r.objects:
                side = max(o.box[2] - o.box[0], o.box[3] - o.box[1])
                if o.attributes[1] == "large":
                    assert side >= 0.38 * 128
                else:
                    assert side <= 0.27 * 128


def test_captions_are_grounded(demo):
    root, _ = demo
    for split in raw.SPLITS:
        for r in _records(root, split):
            colours = {COLOUR_ZH[o.attributes[0]] for o in r.objects}
            classes = {CLASS_ZH[o.label] for o in r.objects}
            text = "".join(r.captions)
            for o in r.objects:
                assert any(COLOUR_ZH[o.attributes[0]] in c and CLASS_ZH[o.label] in c for c in r.captions), r
            # No caption names a colour or a class that is not in the scene.
            assert {w for w in COLOUR_ZH.values() if w in text} == colours
            assert {w for w in CLASS_ZH.values() if w in text} <= classes
            for c in r.captions:
                m = re.search(r"有(.)个物体", c)
                if m:
                    assert "零一两三四五六".index(m.group(1)) == len(r.objects), c


def test_single_object_captions_match_position_and_size(tmp_path):
    root = tmp_path / "raw"
    generate(root, DemoConfig(seed=1, train=30, valid=0, test=0, min_objects=1, max_objects=1, captions_per_image=8))
    sizes = set()
    for r in _records(root, "train"):
        (o,) = r.objects
        sizes.add(o.attributes[1])
        where = _where(o.box, 128)
        wrong_size = "小" if o.attributes[1] == "large" else "大"
        for c in r.captions:
            assert COLOUR_ZH[o.attributes[0]] in c and CLASS_ZH[o.label] in c, c
            assert wrong_size not in c, (c, o)
            assert [p for p in ALL_POSITIONS if p in c] in ([], [where]), (c, o)
        assert any(where in c for c in r.captions), r
    assert sizes == {"large", "small"}
