"""Task folders that microsoft/Oscar's own scripts read, written from mmcn's feature shards,
Chinese-CLIP texts and Chinese tags (``mmcn export-oscar``).

``{out}/caption/`` for ``oscar/run_captioning.py`` (``CaptionTSVDataset``), per split:

- ``{split}.yaml``: ``feature``, ``label`` and (when the split has texts) ``caption``, file
  names relative to the yaml's folder (Oscar's ``find_file_path_in_yaml`` joins them to it);
- ``{split}.feature.tsv``: ``image_id\\t{"num_boxes": n, "features": base64 float32 n x 2054}``;
- ``{split}.label.tsv``: ``image_id\\t[{"class", "rect": [x1, y1, x2, y2], "conf"}]``, same rows;
- each TSV with its index ``X.lineidx`` (``TSVFile``: ``os.path.splitext(tsv)[0] + ".lineidx"``);
- ``{split}_caption.json``: ``[{"image_id": "<str>", "caption", "id"}]``; the image id is a
  string because Oscar keys images by the TSV's first column, read as text;
- ``{split}_caption_coco_format.json``: the same captions in COCO's caption format
  (``info``, ``licenses``, ``type``, ``images``, ``annotations``), what its evaluation loads.

When a split has texts, only images with at least one caption are written: Oscar's test loop
captions every row and its COCO evaluation fails on an image without a reference.

``{out}/retrieval/`` for ``oscar/run_retrieval.py`` (``RetrievalDataset``), one image file
for every split (``--img_feat_file`` is one file and its folder holds the rest):

- ``features.tsv`` (+ ``features.lineidx``): ``image_id\\tnum_boxes\\tbase64 float32``;
- ``imageid2idx.json``: ``{"<image_id>": row}`` of ``features.tsv``;
- ``predictions.tsv`` (+ ``.lineidx``), read with ``--add_od_labels``:
  ``image_id\\t{"image_h", "image_w", "objects": [{"class", "rect", "conf"}]}``;
- ``{split}_captions.pt``: ``torch.save`` of ``{int image_id: [caption, ...]}``, plain ints and
  strings. Oscar indexes caption ``k < num_captions_per_img`` of every image in its train
  and test loops, so an image with fewer captions than that number crashes them: those
  images are left out (and counted); images with more keep all theirs (Oscar reads the first
  ``num_captions_per_img``; counted too). The ``valid`` split's is also written as
  ``minival_captions.pt``, the name ``run_retrieval.py`` validates on during training.

``{out}/pretrain/`` for ``oscar/run_oscarplus_pretrain.py`` (``OscarTSVDataset``; run it with
``--data_dir {out}/pretrain --dataset_file pretrain.yaml``), from ``pretrain_splits`` only (the
train split by default: test images stay out of the pretraining corpus):

- ``pretrain.yaml``: ``corpus`` (the dataset name, ``corpus_name``: one of the single-folder
  names Oscar's reader accepts, ``coco`` by default), ``corpus_file: corpus.tsv``,
  ``image_label_path`` and ``image_feature_path``: ``{name: name}`` (the first is joined to the
  yaml's folder, the second to ``--data_dir``: the same folder here);
- ``corpus.tsv`` (+ ``corpus.lineidx``): one row per caption, ``{name}_{image_id}\t{name}_{image_id}\t
  caption`` (image key, label key, text a; Oscar splits the keys on ``_`` and takes the last
  part as the id). Tabs and line breaks inside a caption would cut Oscar's row: they become
  spaces (counted);
- ``{name}/features.tsv`` (3 columns, + ``.lineidx``), ``{name}/predictions_gt.tsv`` (+ ``.lineidx``):
  ``image_id\t{"image_h", "image_w", "objects": [{"class", "rect", "conf"}]}`` (Oscar's text b is
  the classes joined by spaces), both in the same row order, so one ``{name}/imageid2idx.json``
  indexes both, as Oscar reads it for each.

Only images with at least one caption and one labelled box are written (Oscar asserts a
non-empty text a and text b); the others are counted.

Label text (``labels``): ``"zh"``, the translate stage's Chinese tag of each box
(:mod:`mmcn.data.tags`; boxes whose tag is empty are left out of the label lists), or
``"en"``, the detector's English class.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pybase64
import yaml

from mmcn.data import tsv
from mmcn.data.features import RegionFeatures, iter_split, splits_in
from mmcn.data.tags import ImageTags, read_tags, tags_path
from mmcn.logs import Progress

log = logging.getLogger(__name__)

TASKS = ("caption", "retrieval", "pretrain")
# datasets that OscarTSVDataset reads from one folder (the others are chunked)
PRETRAIN_NAMES = ("coco", "flickr30k", "gqa")
LABEL_LANGUAGES = ("zh", "en")
_ROW_BREAKS = re.compile(r"[\t\r\n]+")   # what cuts a row of Oscar's TSVFile (tab split, text-mode readline)


@dataclass
class OscarExportConfig:
    tasks: tuple[str, ...] = TASKS
    labels: str = "zh"                       # "zh": Chinese tags per box; "en": English classes
    splits: tuple[str, ...] = ()             # () = every split of the features folder
    captions_per_image: int | None = None    # retrieval; None: per split, the most common count
    pretrain_splits: tuple[str, ...] = ("train",)  # splits whose captioned images form the pretraining corpus
    corpus_name: str = "coco"                # pretrain: Oscar's dataset name for the corpus (PRETRAIN_NAMES)


def export_oscar(features: Path, out: Path, texts: Path | None, tags: Path | None,
                 cfg: OscarExportConfig | None = None) -> dict:
    """Write the task folders of ``cfg.tasks`` under ``out``; returns counts per task and split.

    ``texts``: a Chinese-CLIP folder (``{split}_texts.jsonl``); ``tags``: the translate stage's
    output, needed when ``cfg.labels == "zh"``.
    """
    features, out, cfg = Path(features), Path(out), cfg or OscarExportConfig()
    unknown = set(cfg.tasks) - set(TASKS)
    if unknown or cfg.labels not in LABEL_LANGUAGES:
        raise ValueError(f"tasks {sorted(unknown)} / labels {cfg.labels!r} unknown: tasks are {TASKS}, "
                         f"labels {LABEL_LANGUAGES}")
    if cfg.corpus_name not in PRETRAIN_NAMES:
        raise ValueError(f"corpus name {cfg.corpus_name!r}: Oscar's pretraining reader accepts {PRETRAIN_NAMES} "
                         f"for a corpus in one folder; pick one of them")
    _require(features, "feature shard folder", "--features DIR (the features stage's data/features)")
    _require(texts, "texts folder", "--tsv DIR (the Chinese-CLIP folder with {split}_texts.jsonl, data/tsv)")
    if cfg.labels == "zh":
        _require(tags, "Chinese tags folder", "--tags DIR (the translate stage's data/labels_zh) or --labels en")
    if not splits_in(features):
        raise FileNotFoundError(f"no feature shards under {features}: run the features stage first")
    task_splits = (list(cfg.splits) or splits_in(features)) if {"caption", "retrieval"} & set(cfg.tasks) else []
    report: dict = {"labels": cfg.labels, "splits": {}}
    pretrain_splits = [s for s in cfg.pretrain_splits if s in splits_in(features)] if "pretrain" in cfg.tasks else []
    if "pretrain" in cfg.tasks and not pretrain_splits:
        why = (f"none of the splits {list(cfg.pretrain_splits)} has feature shards under {features}; "
               f"name others with --pretrain-splits")
        if cfg.tasks == ("pretrain",):
            raise ValueError(f"pretrain: {why}")
        log.warning("oscar export: no pretraining corpus: %s", why)
        report["pretrain"] = {"skipped": why}
    splits = task_splits + [s for s in pretrain_splits if s not in task_splits]

    caption_dir, retrieval_dir = out / "caption", out / "retrieval"
    for task, folder in (("caption", caption_dir), ("retrieval", retrieval_dir)):
        if task in cfg.tasks:
            folder.mkdir(parents=True, exist_ok=True)
    retrieval = _RetrievalImages(retrieval_dir) if "retrieval" in cfg.tasks else None
    pretrain = _PretrainCorpus(out / "pretrain", cfg.corpus_name) if pretrain_splits else None
    try:
        for split in splits:
            captions = _captions_of(texts, split)
            in_tasks = split in task_splits
            entry: dict = {}
            caption = _CaptionSplit(caption_dir, split, captions) if "caption" in cfg.tasks and in_tasks else None
            to_retrieval = retrieval if in_tasks else None
            to_pretrain = pretrain if split in pretrain_splits else None
            n_images = 0
            bar = Progress(None, f"oscar {split}", "img", log)
            for r, boxes in _labelled(features, split, tags if cfg.labels == "zh" else None):
                n_images += 1
                data = pybase64.b64encode(np.ascontiguousarray(r.features, dtype="<f4").tobytes()).decode()
                if caption is not None:
                    caption.add(r, data, boxes)
                if to_retrieval is not None:
                    to_retrieval.add(split, r, data, boxes)
                if to_pretrain is not None:
                    to_pretrain.add(split, r, data, boxes, (captions or {}).get(r.image_id, ([], []))[1])
                bar.update()
            bar.close()
            entry["images"] = n_images
            entry["texts"] = None if captions is None else len({t for ids, _ in captions.values() for t in ids})
            if caption is not None:
                entry["caption"] = caption.close()
            if to_retrieval is not None:
                entry["retrieval"] = _write_retrieval_captions(retrieval_dir, split, captions, retrieval.ids_of(split),
                                                               cfg.captions_per_image)
            report["splits"][split] = entry
            log.info("oscar export %s: %s", split, entry)
    finally:
        if retrieval is not None:
            retrieval.close()
        if pretrain is not None:
            report["pretrain"] = pretrain.close()
    if pretrain is not None:
        log.info("oscar export pretrain corpus: %s", report["pretrain"])
        if not report["pretrain"]["captions"]:
            raise ValueError(f"pretrain: no image of {pretrain_splits} has a caption and a labelled box, so the "
                             f"corpus in {out / 'pretrain'} is empty (Oscar's reader would fail on it)")
    return report


def _require(path: Path | None, what: str, option: str) -> None:
    if path is None or not Path(path).is_dir():
        raise FileNotFoundError(f"{what} {path} not found: pass {option}")


def _captions_of(texts: Path, split: str) -> dict[int, tuple[list[int], list[str]]] | None:
    """``{image_id: ([text_id, ...], [caption, ...])}`` in text order; None when the split has no texts file."""
    path = tsv.texts_path(Path(texts), split)
    if not path.is_file():
        return None
    by_image: dict[int, tuple[list[int], list[str]]] = {}
    for t in tsv.read_texts(path):
        for image_id in t.image_ids:
            ids, caps = by_image.setdefault(image_id, ([], []))
            ids.append(t.text_id)
            caps.append(t.text)
    return by_image


def _labelled(features: Path, split: str, tags: Path | None) -> Iterator[tuple[RegionFeatures, list[dict]]]:
    """Each image's features with its label list (Chinese tags when ``tags`` is given)."""
    tag_rows: Iterator[ImageTags] | None = None
    if tags is not None:
        path = tags_path(tags, split)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the translate stage, or pass --labels en")
        tag_rows = read_tags(path)
    for row, r in enumerate(iter_split(features, split), start=1):
        names = r.classes
        if tag_rows is not None:
            t = next(tag_rows, None)
            if t is None or t.image_id != r.image_id or len(t.tags) != r.num_boxes:
                raise ValueError(f"{tags_path(tags, split)}:{row}: expected image {r.image_id} with {r.num_boxes} "
                                 f"boxes, found {t and (t.image_id, len(t.tags))}; rerun the translate stage")
            names = t.tags
        yield r, [{"class": c, "rect": [float(v) for v in b], "conf": float(s)}
                  for c, b, s in zip(names, r.boxes.tolist(), r.class_conf.tolist()) if c]
    if tag_rows is not None and (extra := next(tag_rows, None)) is not None:
        raise ValueError(f"{tags_path(tags, split)}: image {extra.image_id} has tags but no features; "
                         f"rerun the translate stage")


class _CaptionSplit:
    """One split of the captioning folder, written as the images stream by."""

    def __init__(self, root: Path, split: str, captions: dict | None):
        self.root, self.split, self.captions = root, split, captions
        self.feats = tsv.TsvWriter(root / f"{split}.feature.tsv")
        self.labels = tsv.TsvWriter(root / f"{split}.label.tsv")
        self.rows: list[dict] = []
        self.image_ids: list[str] = []
        self.uncaptioned = 0

    def add(self, r: RegionFeatures, data: str, boxes: list[dict]) -> None:
        if self.captions is not None and r.image_id not in self.captions:
            self.uncaptioned += 1
            return
        self.feats.write(r.image_id, json.dumps({"num_boxes": r.num_boxes, "features": data}).encode())
        self.labels.write(r.image_id, json.dumps(boxes, ensure_ascii=False).encode())
        key = str(r.image_id)
        self.image_ids.append(key)
        for text in (self.captions or {}).get(r.image_id, ([], []))[1]:
            self.rows.append({"image_id": key, "caption": text, "id": len(self.rows)})

    def close(self) -> dict:
        self.feats.close()
        self.labels.close()
        split, root = self.split, self.root
        spec = {"feature": f"{split}.feature.tsv", "label": f"{split}.label.tsv"}
        if self.captions is not None:
            spec["caption"] = f"{split}_caption.json"
            _dump_json(root / spec["caption"], self.rows)
            _dump_json(root / f"{split}_caption_coco_format.json", {
                "info": {"description": f"mmcn export, split {split}"}, "licenses": [], "type": "captions",
                "images": [{"id": k, "file_name": k} for k in self.image_ids],
                "annotations": self.rows})
        (root / f"{split}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        return {"images": len(self.image_ids), "captions": len(self.rows),
                "images_without_caption_left_out": self.uncaptioned}


class _RetrievalImages:
    """``features.tsv``, ``predictions.tsv`` and ``imageid2idx.json`` of every split together."""

    def __init__(self, root: Path):
        self.root = root
        self.feats = tsv.TsvWriter(root / "features.tsv")
        self.labels = tsv.TsvWriter(root / "predictions.tsv")
        self.index: dict[str, int] = {}
        self.split_of: dict[int, str] = {}
        self.by_split: dict[str, list[int]] = {}

    def add(self, split: str, r: RegionFeatures, data: str, boxes: list[dict]) -> None:
        if r.image_id in self.split_of:
            raise ValueError(f"image {r.image_id} is in splits {self.split_of[r.image_id]} and {split}: Oscar's "
                             f"retrieval reads one image file for all splits; export them apart with --splits")
        self.split_of[r.image_id] = split
        self.by_split.setdefault(split, []).append(r.image_id)
        self.index[str(r.image_id)] = len(self.feats)
        self.feats.write(r.image_id, f"{r.num_boxes}\t{data}".encode())
        self.labels.write(r.image_id, json.dumps({"image_h": r.height, "image_w": r.width, "objects": boxes},
                                                 ensure_ascii=False).encode())

    def ids_of(self, split: str) -> list[int]:
        return self.by_split.get(split, [])

    def close(self) -> None:
        self.feats.close()
        self.labels.close()
        _dump_json(self.root / "imageid2idx.json", self.index)


class _PretrainCorpus:
    """The Oscar+ pretraining folder: ``pretrain.yaml``, ``corpus.tsv`` and the image folder."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = root, name
        (root / name).mkdir(parents=True, exist_ok=True)
        self.corpus = tsv.TsvWriter(root / "corpus.tsv")
        self.feats = tsv.TsvWriter(root / name / "features.tsv")
        self.labels = tsv.TsvWriter(root / name / "predictions_gt.tsv")
        self.index: dict[str, int] = {}
        self.counts = Counter()

    def add(self, split: str, r: RegionFeatures, data: str, boxes: list[dict], captions: list[str]) -> None:
        texts = [_ROW_BREAKS.sub(" ", c).strip() for c in captions]   # Oscar splits rows on these, strips fields
        texts = [t for t in texts if t]
        if not texts or not boxes:
            self.counts["images_left_out_no_caption" if not texts else "images_left_out_no_label"] += 1
            return
        if str(r.image_id) in self.index:
            raise ValueError(f"image {r.image_id} is in two pretraining splits: Oscar keys the corpus by image id; "
                             f"name one split with --pretrain-splits")
        self.counts["captions_whitespace_replaced"] += sum(t != c for t, c in zip(texts, captions))
        self.index[str(r.image_id)] = len(self.feats)
        self.feats.write(r.image_id, f"{r.num_boxes}\t{data}".encode())
        self.labels.write(r.image_id, json.dumps({"image_h": r.height, "image_w": r.width, "objects": boxes},
                                                 ensure_ascii=False).encode())
        key = f"{self.name}_{r.image_id}"
        for text in texts:
            self.corpus.write(key, f"{key}\t{text}".encode())
        self.counts["images"] += 1
        self.counts["captions"] += len(texts)

    def close(self) -> dict:
        for writer in (self.corpus, self.feats, self.labels):
            writer.close()
        _dump_json(self.root / self.name / "imageid2idx.json", self.index)
        spec = {"corpus": self.name, "corpus_file": "corpus.tsv",
                "image_label_path": {self.name: self.name}, "image_feature_path": {self.name: self.name}}
        (self.root / "pretrain.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        return {"images": 0, "captions": 0, **dict(self.counts)}


def _write_retrieval_captions(root: Path, split: str, captions: dict | None, image_ids: list[int],
                              per_image: int | None) -> dict:
    """``{split}_captions.pt`` for the images of ``split`` with at least ``per_image`` captions."""
    if captions is None:
        return {"skipped": f"no {split}_texts.jsonl"}
    import torch

    counts = [len(captions[i][1]) for i in image_ids if i in captions]
    if per_image is None:  # the most common count, the smaller on a tie
        per_image = min(Counter(counts).items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else 1
    kept = {int(i): [str(c) for c in captions[i][1]] for i in image_ids
            if len(captions.get(i, ((), ()))[1]) >= per_image}
    torch.save(kept, root / f"{split}_captions.pt")
    if split == "valid":  # run_retrieval.py validates during training on the split it names "minival"
        torch.save(kept, root / "minival_captions.pt")
    return {"images": len(kept), "captions": sum(len(c) for c in kept.values()),
            "num_captions_per_img": per_image,
            "images_fewer_left_out": len(image_ids) - len(kept),
            "images_more_kept": sum(len(c) > per_image for c in kept.values())}


def _dump_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
