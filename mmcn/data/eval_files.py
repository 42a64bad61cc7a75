"""Evaluation files: caption references and predictions, Chinese-CLIP retrieval predictions and
feature files (``{split}_imgs.img_feat.jsonl``: ``{"image_id": 1, "feature": [...]}``,
``{split}_texts.txt_feat.jsonl``: ``{"text_id": 7, "feature": [...]}``), per-image scores.

Caption references, either
  JSONL, one image per line: ``{"image_id": 1, "captions": ["一只猫", ...]}``, or
  COCO JSON: ``{"images": [{"id": 1}, ...], "annotations": [{"image_id": 1, "caption": "..."}]}``
  (``images`` optional; if present, every listed image needs at least one caption).
Caption predictions, JSONL: ``{"image_id": 1, "caption": "一只猫"}``.
Retrieval predictions, JSONL, exactly Chinese-CLIP's: ``{"text_id": 7, "image_ids": [top 10]}``
(text-to-image) or ``{"image_id": 3, "text_ids": [top 10]}`` (image-to-text). The gold side of
retrieval is the Chinese-CLIP texts file, read by :func:`mmcn.data.tsv.read_texts`.
Image ids are ints or strings and compared as they are (``1`` and ``"1"`` differ); retrieval
ids are ints, as in Chinese-CLIP. Blank lines are skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

ImageId = int | str
Direction = Literal["t2i", "i2t"]
# (query id key, ranked ids key) of a retrieval prediction line, per direction.
RETRIEVAL_KEYS: dict[str, tuple[str, str]] = {"t2i": ("text_id", "image_ids"), "i2t": ("image_id", "text_ids")}
TOP_K = 10  # Chinese-CLIP's evaluation requires exactly this many ranked ids per query


class EvalFileError(ValueError):
    """A malformed evaluation file; the message names the file, the line and what to do."""


@dataclass(frozen=True)
class CaptionPrediction:
    image_id: ImageId
    caption: str
    line: int


@dataclass(frozen=True)
class RetrievalPrediction:
    query_id: int
    ranked_ids: list[int]
    line: int


def read_caption_references(path: Path) -> dict[ImageId, list[str]]:
    """``image_id -> captions`` from a JSONL or COCO-format file, in file order (format detected)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # JSONL with more than one line
    if isinstance(whole, dict) and "annotations" in whole:
        refs = _coco_references(path, whole)
    else:
        refs = _jsonl_references(path, text)
    if not refs:
        raise EvalFileError(f"{path}: no reference captions found; expected JSONL lines "
                            '{"image_id": ..., "captions": [...]} or a COCO JSON with "annotations"')
    return refs


def _jsonl_references(path: Path, text: str) -> dict[ImageId, list[str]]:
    refs: dict[ImageId, list[str]] = {}
    first_line: dict[ImageId, int] = {}
    for line_no, obj in _json_objects(path, text.splitlines()):
        image_id = _image_id(path, line_no, obj.get("image_id"))
        captions = obj.get("captions")
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise EvalFileError(f'{path}:{line_no}: "captions" of image_id {image_id!r} must be a non-empty list '
                                "of strings; drop images without reference captions")
        if image_id in refs:
            raise EvalFileError(f"{path}:{line_no}: image_id {image_id!r} already appeared on line "
                                f"{first_line[image_id]}; put all captions of an image on one line")
        refs[image_id] = captions
        first_line[image_id] = line_no
    return refs


def _coco_references(path: Path, coco: dict) -> dict[ImageId, list[str]]:
    annotations = coco["annotations"]
    if not isinstance(annotations, list):
        raise EvalFileError(f'{path}: "annotations" must be a list of {{"image_id", "caption"}} objects')
    refs: dict[ImageId, list[str]] = {}
    listed = coco.get("images")
    if listed is not None:
        if not isinstance(listed, list):
            raise EvalFileError(f'{path}: "images" must be a list of {{"id": ...}} objects')
        for i, image in enumerate(listed):
            where = f"{path}: images[{i}]"
            if not isinstance(image, dict):
                raise EvalFileError(f'{where}: expected an object with "id", got {_short(image)}')
            refs.setdefault(_image_id(where, None, image.get("id"), key="id"), [])
    for i, ann in enumerate(annotations):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            raise EvalFileError(f'{where}: expected {{"image_id": ..., "caption": "..."}}, got {_short(ann)}')
        image_id = _image_id(where, None, ann.get("image_id"))
        if listed is not None and image_id not in refs:
            raise EvalFileError(f'{where}: image_id {image_id!r} is not in "images"; add it there or drop '
                                "the annotation")
        refs.setdefault(image_id, []).append(ann["caption"])
    empty = [image_id for image_id, captions in refs.items() if not captions]
    if empty:
        raise EvalFileError(f'{path}: {len(empty)} image(s) in "images" have no caption in "annotations" '
                            f"({format_ids(empty)}); remove them from \"images\" or add their captions")
    return refs


def read_caption_predictions(path: Path) -> list[CaptionPrediction]:
    """Every prediction line in file order, duplicates included (the caller decides about them)."""
    preds = []
    with open(path, encoding="utf-8") as f:
        for line_no, obj in _json_objects(path, f):
            image_id = _image_id(path, line_no, obj.get("image_id"))
            caption = obj.get("caption")
            if not isinstance(caption, str):
                raise EvalFileError(f'{path}:{line_no}: "caption" of image_id {image_id!r} must be a string, '
                                    f"got {_short(caption)}")
            preds.append(CaptionPrediction(image_id, caption, line_no))
    return preds


def write_caption_predictions(path: Path, captions: Mapping[ImageId, str]) -> None:
    _write_jsonl(path, ({"image_id": image_id, "caption": c} for image_id, c in captions.items()))


def write_caption_scores(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Per-image scores, one JSON object per line (``{"image_id", "Bleu_1", ..., "CIDEr"}``)."""
    _write_jsonl(path, rows)


def read_caption_scores(path: Path) -> list[dict[str, Any]]:
    """The rows :func:`write_caption_scores` wrote, in file order."""
    with open(path, encoding="utf-8") as f:
        return [obj for _, obj in _json_objects(path, f)]


def read_retrieval_predictions(path: Path, direction: Direction, k: int = TOP_K,
                               fewer: bool = False) -> dict[int, RetrievalPrediction]:
    """``query_id -> prediction`` from a Chinese-CLIP predictions file, checked line by line.

    Raises :class:`EvalFileError` naming the file, line and query for: a line that is not a
    JSON object, a missing or non-int query id, ranked ids that are not a list of exactly
    ``k`` distinct ints (``fewer``: of 1 to ``k``; the caller checks them against its
    gallery), or a query id that already had a line.
    """
    query_key, ids_key = RETRIEVAL_KEYS[direction]
    preds: dict[int, RetrievalPrediction] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, obj in _json_objects(path, f):
            where = f"{path}:{line_no}"
            qid = obj.get(query_key)
            if type(qid) is not int:
                raise EvalFileError(f'{where}: "{query_key}" must be an integer, got {_short(qid)}; each line is '
                                    f'{{"{query_key}": int, "{ids_key}": [{k} ints]}}')
            ranked = obj.get(ids_key)
            if not isinstance(ranked, list):
                raise EvalFileError(f'{where}: {query_key} {qid}: "{ids_key}" must be a list of {k} integers, '
                                    f"got {_short(ranked)}")
            if len(ranked) != k and not (fewer and 0 < len(ranked) < k):
                raise EvalFileError(f"{where}: {query_key} {qid} has {len(ranked)} {ids_key}; Chinese-CLIP's "
                                    f"evaluation requires exactly {k} per query, best first"
                                    + (" (all the candidates when the gallery has fewer)" if fewer else ""))
            for rank, item in enumerate(ranked, start=1):
                if type(item) is not int:
                    raise EvalFileError(f"{where}: {query_key} {qid} has a non-integer id {_short(item)} at rank "
                                        f"{rank}; ids must be JSON integers")
            if len(set(ranked)) != len(ranked):
                dups = sorted({i for i in ranked if ranked.count(i) > 1})
                raise EvalFileError(f"{where}: {query_key} {qid} ranks {format_ids(dups)} more than once; "
                                    f"give {len(ranked)} distinct {ids_key}")
            if qid in preds:
                raise EvalFileError(f"{where}: {query_key} {qid} already has a prediction on line "
                                    f"{preds[qid].line}; keep one line per query")
            preds[qid] = RetrievalPrediction(qid, ranked, line_no)
    return preds


def write_retrieval_predictions(path: Path, direction: Direction, rankings: Mapping[int, Sequence[int]]) -> None:
    query_key, ids_key = RETRIEVAL_KEYS[direction]
    _write_jsonl(path, ({query_key: int(q), ids_key: [int(i) for i in ids]} for q, ids in rankings.items()))


def feature_paths(out_dir: Path, split: str) -> tuple[Path, Path]:
    """Chinese-CLIP's feature files of ``split``: ``{split}_imgs.img_feat.jsonl`` and ``{split}_texts.txt_feat.jsonl``."""
    return Path(out_dir) / f"{split}_imgs.img_feat.jsonl", Path(out_dir) / f"{split}_texts.txt_feat.jsonl"


def write_features(path: Path, key: str, ids: Sequence[int], features: Any) -> None:
    """Chinese-CLIP's ``extract_features.py`` output: a line ``{key: id, "feature": [floats]}``
    per row of ``features`` (unit-length embeddings); ``key`` is image_id or text_id."""
    _write_jsonl(path, ({key: int(i), "feature": [float(x) for x in row]} for i, row in zip(ids, features)))


def read_features(path: Path, key: str) -> dict[int, list[float]]:
    """``id -> feature`` of a Chinese-CLIP feature file; a line without an int ``key``, a
    list of numbers or of another length than the first, or a repeated id is an error."""
    out: dict[int, list[float]] = {}
    dim = None
    with open(path, encoding="utf-8") as f:
        for line_no, obj in _json_objects(path, f):
            qid, feat = obj.get(key), obj.get("feature")
            if type(qid) is not int:
                raise EvalFileError(f'{path}:{line_no}: "{key}" must be an integer, got {_short(qid)}')
            if not isinstance(feat, list) or not all(type(x) in (int, float) for x in feat):
                raise EvalFileError(f'{path}:{line_no}: {key} {qid}: "feature" must be a list of numbers')
            dim = len(feat) if dim is None else dim
            if len(feat) != dim:
                raise EvalFileError(f"{path}:{line_no}: {key} {qid} has {len(feat)} values, the first line {dim}")
            if qid in out:
                raise EvalFileError(f"{path}:{line_no}: {key} {qid} appears twice; keep one line per {key}")
            out[qid] = feat
    return out


def _json_objects(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, dict]]:
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalFileError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}); "
                                "each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise EvalFileError(f"{path}:{line_no}: expected a JSON object, got {_short(obj)}")
        yield line_no, obj


def _image_id(path: Path | str, line_no: int | None, value: Any, key: str = "image_id") -> ImageId:
    if type(value) is int or isinstance(value, str):
        return value
    where = f"{path}:{line_no}" if line_no is not None else str(path)
    raise EvalFileError(f'{where}: "{key}" must be an integer or a string, got {_short(value)}')


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _short(value: Any, limit: int = 60) -> str:
    text = "missing" if value is None else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_ids(items: Sequence[Any], limit: int = 10) -> str:
    """``1, 2, 3`` or ``1, 2, ..., 10, ... (+N more)``: ids for an error message."""
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... (+{len(items) - limit} more)"
