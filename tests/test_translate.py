"""en→zh label table (coverage of every shipped vocabulary, photo senses), overrides,
unknown-label policies, and the translation of a features folder into per-box tags."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mmcn.data import features as region_features
from mmcn.data.demo import CLASSES, COLOURS, SIZES
from mmcn.data.tags import read_tags, tag_text, tags_path
from mmcn.text.translate import LabelTable, TranslateConfig, UnknownLabelError, translate_features
from mmcn.vision.vocab import load_vocab

CJK = re.compile(r"[\u4e00-\u9fff]")
VOCABS = {"vg1600_objects": "object", "vinvl1594_objects": "object", "coco80_objects": "object",
          "vg400_attributes": "attribute", "vinvl524_attributes": "attribute"}


@pytest.fixture(scope="module")
def table() -> LabelTable:
    return LabelTable.load()


@pytest.mark.parametrize("vocab", sorted(VOCABS))
def test_every_shipped_vocabulary_is_covered(table, vocab):
    kind = VOCABS[vocab]
    entries = load_vocab(vocab)
    assert len(entries) == {"vg1600_objects": 1600, "vinvl1594_objects": 1594, "coco80_objects": 80,
                            "vg400_attributes": 400, "vinvl524_attributes": 524}[vocab]
    missing, empty = [], []
    for entry in entries:
        synonyms = [s.strip() for s in entry.split(",")]
        zh = [table.get(s, kind) for s in synonyms]
        missing += [s for s, z in zip(synonyms, zh) if z is None]
        empty += [s for s, z in zip(synonyms, zh) if z is not None and not CJK.search(z)]
        if None not in zh:
            assert len(set(zh)) == 1, f"{entry}: synonyms translated differently: {zh}"
    assert missing == [] and empty == []


def test_demo_vocabulary_is_covered(table):
    for label in CLASSES:
        assert CJK.search(table.get(label, "object"))
    for label in (*COLOURS, *SIZES):
        assert CJK.search(table.get(label, "attribute"))


def test_photo_senses(table):
    assert table.get("sink", "object") == "水槽"
    assert "球场" in table.get("court", "object")
    assert table.get("bat", "object") == "球棒"
    assert table.get("remote", "object") == "遥控器"
    assert table.get("red", "attribute") == "红色"
    assert "ambiguous" in table.notes["bat"]
    # look-ups ignore case, underscores and extra spaces
    assert table.get("Traffic_Light", "object") == table.get("traffic  light", "object") is not None


def test_overrides_win_and_are_kind_specific(tmp_path):
    path = tmp_path / "over.tsv"
    path.write_text("# comment\ncross\t十字形\tobject\norange\t橘黄色\tattribute\nsink\t洗手池\n", encoding="utf-8")
    table = LabelTable.load(path)
    assert table.get("cross", "object") == "十字形" and table.get("sink", "object") == "洗手池"
    assert table.get("orange", "attribute") == "橘黄色"
    assert table.get("orange", "object") == LabelTable.load().get("orange", "object") != "橘黄色"
    assert table.n_overrides == 3

    path.write_text("cross\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"over.tsv:1: expected"):
        LabelTable.load(path)
    path.write_text("cross\t十字\tthing\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"over.tsv:1: kind must be"):
        LabelTable.load(path)
    with pytest.raises(FileNotFoundError, match="translate.overrides"):
        LabelTable.load(tmp_path / "nope.tsv")


def features(root, rows):
    """Feature shards whose boxes carry the given (classes, attributes) per image."""
    records = []
    for image_id, (classes, attrs) in rows.items():
        n = len(classes)
        boxes = np.tile(np.array([[1, 1, 9, 9]], np.float32), (n, 1))
        records.append(region_features.RegionFeatures(image_id, 10, 10, boxes, classes, np.linspace(0.9, 0.5, n, dtype=np.float32),
                                        region_features.region_features(np.zeros((n, 2048), np.float32), boxes, 10, 10),
                                        attrs, [[0.9] * len(a) for a in attrs]))
    region_features.write_shard(region_features.shard_path(root, "train", 0), records)


ROWS = {7: (["circle", "blorp", "dog"], [["red", "large"], ["shiny"], []]),
        8: (["cross"], [["zorgy"]])}


def test_translate_keeps_box_order_and_counts_unknowns(tmp_path):
    features(tmp_path / "feat", ROWS)
    summary = translate_features(tmp_path / "feat", tmp_path / "zh", LabelTable.load(), TranslateConfig(max_attributes=2))
    tags = {t.image_id: t for t in read_tags(tags_path(tmp_path / "zh", "train"))}
    table = LabelTable.load()
    circle, dog, red, large = (table.get("circle", "object"), table.get("dog", "object"),
                               table.get("red", "attribute"), table.get("large", "attribute"))
    assert tags[7].objects == [circle, "blorp", dog]
    assert tags[7].attributes == [[red, large], [table.get("shiny", "attribute")], []]
    assert tags[7].tags == [f"{red} {large} {circle}", f"{table.get('shiny', 'attribute')} blorp", dog]
    assert tag_text(tags[8].tags) == f"zorgy {table.get('cross', 'object')}"
    assert summary["images"] == {"train": 2}
    assert summary["objects"] == {"occurrences": 4, "unknown": 1, "coverage": 75.0}
    assert summary["attributes"] == {"occurrences": 4, "unknown": 1, "coverage": 75.0}
    assert summary["coverage"] == 75.0
    assert summary["unknown_labels"] == {"object": {"blorp": 1}, "attribute": {"zorgy": 1}}


def test_drop_policy_and_objects_only(tmp_path):
    features(tmp_path / "feat", ROWS)
    translate_features(tmp_path / "feat", tmp_path / "zh", LabelTable.load(),
                       TranslateConfig(unknown="drop", max_attributes=0))
    tags = {t.image_id: t for t in read_tags(tags_path(tmp_path / "zh", "train"))}
    table = LabelTable.load()
    assert tags[7].objects == [table.get("circle", "object"), "", table.get("dog", "object")]
    assert tags[7].tags == [table.get("circle", "object"), "", table.get("dog", "object")]
    assert tags[8].attributes == [[]]


def test_error_policy_lists_every_unknown_and_writes_nothing(tmp_path):
    features(tmp_path / "feat", ROWS)
    with pytest.raises(UnknownLabelError, match=r"'blorp' ×1.*'zorgy' ×1.*translate.overrides"):
        translate_features(tmp_path / "feat", tmp_path / "zh", LabelTable.load(), TranslateConfig(unknown="error"))
    assert not (tmp_path / "zh").exists()
    with pytest.raises(ValueError, match="policy"):
        TranslateConfig(unknown="guess")


def test_cli_writes_tags_and_metrics(tmp_path):
    from mmcn.cli import main

    features(tmp_path / "feat", {1: (["circle", "dog"], [["red"], ["brown"]])})
    over = tmp_path / "over.tsv"
    over.write_text("circle\t圆形\tobject\n", encoding="utf-8")
    assert main(["translate", "--features", str(tmp_path / "feat"), "--out", str(tmp_path / "zh"),
                 "--overrides", str(over), "--metrics", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert metrics["coverage"] == 100.0 and metrics["overrides"] == 1
    assert next(read_tags(tags_path(tmp_path / "zh", "train"))).tags[0] == "红色 圆形"
