"""``mmcn export-oscar``: the task folders read back with this file's own implementation of
microsoft/Oscar's reader conventions (TSVFile's ``splitext`` lineidx, CaptionTSVDataset's yaml,
keys and captions, RetrievalDataset's 3-column features, imageid2idx, captions.pt, predictions.tsv)."""
from __future__ import annotations

import base64
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmcn.cli import main as cli_main
from mmcn.data import tsv
from mmcn.data.oscar_export import OscarExportConfig, export_oscar
from mmcn.data.tags import ImageTags, read_tags, tags_path, write_tags

sys.path.insert(0, str(Path(__file__).parent))
from test_lmdb import make_dataset  # noqa: E402


def oscar_rows(path: str) -> list[list[str]]:
    """Every row as Oscar's TSVFile.seek returns it: index at splitext + .lineidx, text mode, tab split."""
    with open(os.path.splitext(path)[0] + ".lineidx") as f:
        offsets = [int(line) for line in f]
    rows = []
    with open(path, encoding="utf-8") as f:
        for pos in offsets:
            f.seek(pos)
            rows.append([s.strip() for s in f.readline().split("\t")])
    return rows


def decode(b64: str, num_boxes: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), np.float32).reshape((num_boxes, -1))


@pytest.fixture
def data(tmp_path):
    data = make_dataset(tmp_path / "src")
    uncaptioned = data["ids"][6]  # its only caption removed: left out of the caption task
    data["texts"] = [t for t in data["texts"] if uncaptioned not in t.image_ids]
    tsv.write_texts(tsv.texts_path(data["tsv"], "test"), data["texts"])
    data["uncaptioned"] = uncaptioned
    return data


def captions_by_image(data) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for t in data["texts"]:
        for i in t.image_ids:
            out.setdefault(i, []).append(t.text)
    return out


def test_caption_folder_as_oscar_reads_it(data, tmp_path):
    report = export_oscar(data["features"], tmp_path / "out", data["tsv"], data["tags"])
    root = tmp_path / "out" / "caption"
    caps = captions_by_image(data)
    records = {r.image_id: r for r in data["records"]}
    kept = [i for i in data["ids"] if i in caps]
    assert report["splits"]["test"]["caption"] == {"images": 6, "captions": sum(len(caps[i]) for i in kept),
                                                   "images_without_caption_left_out": 1}
    # CaptionTSVDataset: yaml keys relative to the yaml's folder, every file present
    cfg = yaml.safe_load((root / "test.yaml").read_text())
    files = {k: os.path.join(root, cfg[k]) for k in ("feature", "label", "caption")}
    assert all(os.path.isfile(p) for p in files.values())
    feat_rows, label_rows = oscar_rows(files["feature"]), oscar_rows(files["label"])
    keys = [row[0] for row in label_rows]
    assert keys == [row[0] for row in feat_rows] == [str(i) for i in kept]
    for key, (_, payload), (_, labels) in zip(keys, feat_rows, label_rows):
        r = records[int(key)]
        info = json.loads(payload)
        features = decode(info["features"], info["num_boxes"])
        assert features.shape == (r.num_boxes, 2054)
        np.testing.assert_array_equal(features, r.features)
        boxes = json.loads(labels)
        assert " ".join(b["class"] for b in boxes) == " ".join(["红色 圆形"] * r.num_boxes)  # zh: the tags
        np.testing.assert_allclose([b["rect"] for b in boxes], r.boxes)
    # prepare_image_key_to_captions: every caption's image_id a key of the TSV (strings)
    with open(files["caption"], encoding="utf-8") as f:
        captions = json.load(f)
    key2captions = {k: [] for k in keys}
    for c in captions:
        assert isinstance(c["image_id"], str)
        key2captions[c["image_id"]].append(c["caption"])
    assert key2captions == {str(i): caps[i] for i in kept}
    # the evaluation's COCO file, as coco-caption's COCO()/loadRes use it
    coco = json.loads((root / "test_caption_coco_format.json").read_text(encoding="utf-8"))
    assert {"info", "licenses", "type", "images", "annotations"} <= set(coco) and coco["type"] == "captions"
    image_ids = {img["id"] for img in coco["images"]}
    assert image_ids == set(keys)  # predictions cover every TSV row: all must be COCO images
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"]) == len(captions)
    assert {a["image_id"] for a in coco["annotations"]} == image_ids  # a reference for every image


@pytest.mark.parametrize("per_image", [None, 2])
def test_retrieval_folder_as_oscar_reads_it(data, tmp_path, per_image):
    cfg = OscarExportConfig(tasks=("retrieval",), captions_per_image=per_image)
    report = export_oscar(data["features"], tmp_path / "out", data["tsv"], data["tags"], cfg)["splits"]["test"]
    root = tmp_path / "out" / "retrieval"
    assert not (tmp_path / "out" / "caption").exists()
    caps = captions_by_image(data)
    counts = Counter(len(caps.get(i, [])) for i in data["ids"] if i in caps)
    n = per_image or max(counts, key=lambda c: (counts[c], -c))
    expected = {i: caps[i] for i in data["ids"] if len(caps.get(i, [])) >= n}
    assert report["retrieval"]["num_captions_per_img"] == n
    assert report["retrieval"]["images_fewer_left_out"] == len(data["ids"]) - len(expected)
    assert report["retrieval"]["images_more_kept"] == sum(len(c) > n for c in expected.values())
    # captions.pt: plain ints -> lists of strings
    captions = torch.load(root / "test_captions.pt", weights_only=True)
    assert captions == expected and all(type(k) is int for k in captions)
    img_keys = list(captions)
    for index in range(len(img_keys) * n):  # Oscar's train/test indexing never fails
        assert isinstance(captions[img_keys[index // n]][index % n], str)
    # features.tsv through imageid2idx.json: 3 columns, the right row
    rows = oscar_rows(str(root / "features.tsv"))
    image_id2idx = json.loads((root / "imageid2idx.json").read_text())
    assert len(rows) == len(data["ids"]) and all(len(row) == 3 for row in rows)
    for r in data["records"]:
        row = rows[image_id2idx[str(r.image_id)]]
        assert row[0] == str(r.image_id) and int(row[1]) == r.num_boxes
        np.testing.assert_array_equal(decode(row[-1], int(row[1])), r.features)
    # --add_od_labels: predictions.tsv next to the features file
    labels = {int(row[0]): json.loads(row[1]) for row in oscar_rows(str(root / "predictions.tsv"))}
    for r in data["records"]:
        objects = labels[r.image_id]["objects"]
        assert (labels[r.image_id]["image_h"], labels[r.image_id]["image_w"]) == (r.height, r.width)
        assert [o["class"] for o in objects] == ["红色 圆形"] * r.num_boxes
        np.testing.assert_allclose(np.array([o["rect"] for o in objects], np.float32), r.boxes)


def test_english_labels_and_empty_tags(data, tmp_path):
    path = tags_path(data["tags"], "test")
    rows = list(read_tags(path))
    first = rows[0]
    rows[0] = ImageTags(first.image_id, first.objects, first.attributes, [""] + first.tags[1:])
    write_tags(path, rows)
    export_oscar(data["features"], tmp_path / "zh", data["tsv"], data["tags"], OscarExportConfig(tasks=("caption",)))
    zh = oscar_rows(str(tmp_path / "zh" / "caption" / "test.label.tsv"))
    assert zh[0][0] == str(first.image_id) and len(json.loads(zh[0][1])) == len(first.tags) - 1
    export_oscar(data["features"], tmp_path / "en", data["tsv"], None, OscarExportConfig(labels="en"))
    for row in oscar_rows(str(tmp_path / "en" / "caption" / "test.label.tsv")):
        assert {b["class"] for b in json.loads(row[1])} == {"circle"}
    for row in oscar_rows(str(tmp_path / "en" / "retrieval" / "predictions.tsv")):
        assert {o["class"] for o in json.loads(row[1])["objects"]} == {"circle"}


def test_valid_split_is_also_oscars_minival(tmp_path):
    data = make_dataset(tmp_path, split="valid")
    report = export_oscar(data["features"], tmp_path / "out", data["tsv"], data["tags"])
    root = tmp_path / "out" / "retrieval"
    minival = torch.load(root / "minival_captions.pt", weights_only=True)
    assert minival == torch.load(root / "valid_captions.pt", weights_only=True)
    assert len(minival) == report["splits"]["valid"]["retrieval"]["images"] > 0


def test_an_image_in_two_splits_is_refused(tmp_path):
    data = make_dataset(tmp_path, split="test")
    make_dataset(tmp_path, split="valid")  # same image ids
    with pytest.raises(ValueError, match="in splits"):
        export_oscar(data["features"], tmp_path / "out", data["tsv"], data["tags"])


def test_cli_defaults_and_missing_folders(data, tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    monkeypatch.chdir(project)
    assert cli_main(["export-oscar", "--features", str(data["features"]), "--out", "oscar"]) == 2
    err = capsys.readouterr().err
    assert "data/tsv" in err and "--tsv" in err
    os.symlink(data["tsv"], project / "data" / "tsv")
    assert cli_main(["export-oscar", "--features", str(data["features"]), "--out", "oscar"]) == 2
    assert "data/labels_zh" in capsys.readouterr().err
    os.symlink(data["tags"], project / "data" / "labels_zh")
    assert cli_main(["export-oscar", "--features", str(data["features"]), "--out", "oscar"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["test"]["images"] == 7
    assert (project / "oscar" / "caption" / "test.yaml").is_file()
    assert (project / "oscar" / "retrieval" / "test_captions.pt").is_file()


def oscar_pretrain_samples(data_dir: Path, dataset_file: str) -> list[tuple[str, str, str, np.ndarray]]:
    """(image key, text a, text b, features) of every corpus row, read the way Oscar's
    OscarTSVDataset does: the yaml at data_dir/dataset_file; corpus_file and image_label_path
    joined to the yaml's folder, image_feature_path to data_dir; keys split on '_' (first part
    the dataset name, last part the id); predictions_gt.tsv / features.tsv (3 columns) reached
    through each folder's imageid2idx.json; text b = the object classes joined by spaces."""
    yaml_file = os.path.join(data_dir, dataset_file)
    cfg = yaml.safe_load(open(yaml_file, encoding="utf-8"))
    root = os.path.dirname(yaml_file)
    names = cfg["corpus"].split("_")
    samples = []
    for row in oscar_rows(os.path.join(root, cfg["corpus_file"])):
        img_info, label_info = row[0].split("_"), row[1].split("_")
        assert img_info[0] == label_info[0] and img_info[0] in names
        name = img_info[0]
        label_dir = os.path.join(root, cfg["image_label_path"][name])
        feat_dir = os.path.join(data_dir, cfg["image_feature_path"][name])
        label_map = json.load(open(os.path.join(label_dir, "imageid2idx.json")))
        feat_map = json.load(open(os.path.join(feat_dir, "imageid2idx.json")))
        assert img_info[-1] in feat_map and img_info[-1] == label_info[-1]
        assert len(row[2]) != 0
        rowb = oscar_rows(os.path.join(label_dir, "predictions_gt.tsv"))[label_map[label_info[-1]]]
        assert label_info[-1] == rowb[0]
        results = json.loads(rowb[1])
        assert {"image_h", "image_w", "objects"} <= set(results)
        textb = " ".join(o["class"] for o in results["objects"])
        assert len(textb) != 0
        arr = oscar_rows(os.path.join(feat_dir, "features.tsv"))[feat_map[img_info[-1]]]
        samples.append((row[0], row[2], textb, decode(arr[-1], int(arr[1]))))
    return samples


def test_pretraining_corpus_as_oscar_reads_it(tmp_path):
    data = make_dataset(tmp_path / "src", split="train")
    make_dataset(tmp_path / "src", split="test", n_images=3)  # not in the corpus by default
    texts = list(data["texts"])
    texts[0] = tsv.Text(texts[0].text_id, "一只\t猫\n在 桌上", texts[0].image_ids)  # would cut Oscar's row
    tsv.write_texts(tsv.texts_path(data["tsv"], "train"), texts)
    data["texts"] = texts
    report = export_oscar(data["features"], tmp_path / "out", data["tsv"], data["tags"],
                          OscarExportConfig(tasks=("pretrain",), corpus_name="flickr30k"))["pretrain"]
    root = tmp_path / "out" / "pretrain"
    samples = oscar_pretrain_samples(root, "pretrain.yaml")
    caps = captions_by_image(data)
    records = {r.image_id: r for r in data["records"]}
    expected = [(f"flickr30k_{i}", c.replace("\t", " ").replace("\n", " ")) for i in data["ids"] for c in caps.get(i, [])]
    assert [(key, a) for key, a, _, _ in samples] == expected
    for key, _, b, features in samples:
        r = records[int(key.split("_")[-1])]
        assert b == " ".join(["红色 圆形"] * r.num_boxes)
        np.testing.assert_array_equal(features, r.features)
    assert report["images"] == len({k for k, _ in expected}) and report["captions"] == len(expected)
    assert report["captions_whitespace_replaced"] == len(texts[0].image_ids)  # one corpus row per image
    assert not (tmp_path / "out" / "caption").exists() and not (tmp_path / "out" / "retrieval").exists()


def test_pretraining_corpus_needs_a_split(data, tmp_path):
    report = export_oscar(data["features"], tmp_path / "out", data["tsv"], data["tags"])  # test split only
    assert "has feature shards" in report["pretrain"]["skipped"]
    with pytest.raises(ValueError, match="--pretrain-splits"):
        export_oscar(data["features"], tmp_path / "p", data["tsv"], data["tags"], OscarExportConfig(tasks=("pretrain",)))
    report = export_oscar(data["features"], tmp_path / "q", data["tsv"], data["tags"],
                          OscarExportConfig(tasks=("pretrain",), pretrain_splits=("test",)))
    assert report["pretrain"]["images_left_out_no_caption"] == 1  # data["uncaptioned"]
