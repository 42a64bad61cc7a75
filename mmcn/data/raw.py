"""The raw input layout: ``{root}/{split}/images/**`` plus ``{root}/{split}/captions.jsonl``.

One JSON object per line of ``captions.jsonl``, one line per image::

    {"image": "<path under images/>", "captions": ["…"],
     "objects": [{"box": [x1, y1, x2, y2], "label": "circle", "attributes": ["red"]}]}

``captions`` may be empty (test images), ``objects`` is optional. Boxes are in pixels of
the picture as displayed, EXIF orientation applied (what an annotator sees; the rule of
:mod:`mmcn.data.image`). The demo generator writes this layout and the ingest stage reads
it, both through this module.
"""
from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from mmcn.data.ingest_report import Skip, printable
from mmcn.data.jsonl import loads
from mmcn.data.splits import SPLITS

CAPTIONS_FILE = "captions.jsonl"
IMAGES_DIR = "images"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class RawObject:
    """A ground-truth object: box ``[x1, y1, x2, y2]`` in pixels, English label, attributes."""

    box: tuple[float, float, float, float]
    label: str
    attributes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"box": [_num(v) for v in self.box], "label": self.label, "attributes": list(self.attributes)}


@dataclass
class RawRecord:
    """One line of ``captions.jsonl``; ``line`` is its 1-based line number (0 if not read)."""

    image: str
    captions: list[str] = field(default_factory=list)
    objects: list[RawObject] = field(default_factory=list)
    line: int = 0

    def to_json(self) -> dict:
        out: dict = {"image": self.image, "captions": list(self.captions)}
        if self.objects:
            out["objects"] = [o.to_json() for o in self.objects]
        return out


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else round(float(v), 2)


def splits_in(root: Path) -> list[str]:
    """The known splits present under ``root``, in canonical order (train, valid, test)."""
    return [s for s in SPLITS if (root / s).is_dir()]


def is_raw_layout(root: Path) -> bool:
    return any((root / s / CAPTIONS_FILE).is_file() or (root / s / IMAGES_DIR).is_dir() for s in SPLITS)


def write_split(root: Path, split: str, items: Iterable[tuple[RawRecord, bytes]]) -> int:
    """Write images and ``captions.jsonl`` of one split; returns the number of images written."""
    split_dir = root / split
    (split_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    n = 0
    with open(split_dir / CAPTIONS_FILE, "w", encoding="utf-8") as f:
        for record, data in items:
            path = resolve_image(split_dir, record.image)
            if path is None:
                raise ValueError(f"image path {record.image!r} is not a relative path under {IMAGES_DIR}/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


def resolve_image(split_dir: Path, rel: str) -> Path | None:
    """The file ``rel`` names under ``split_dir/images``, or None if it points outside it.

    Purely lexical (no file-system calls): ``..`` that climbs out of ``images/`` and absolute
    paths are refused; symlinks inside ``images/`` are followed wherever they point.
    """
    if not rel or "\\" in rel or "\0" in rel or posixpath.isabs(rel):
        return None
    norm = posixpath.normpath(rel)
    if norm in (".", "..") or norm.startswith("../"):
        return None
    return split_dir / IMAGES_DIR / norm


def list_images(split_dir: Path) -> tuple[list[str], list[str]]:
    """Every file with an image extension under ``images/``, as sorted paths relative to it,
    and apart from them those whose path is not valid UTF-8 (no caption line can name them,
    no report or manifest can hold them), shown with backslash escapes (:func:`printable`)."""
    images = split_dir / IMAGES_DIR
    if not images.is_dir():
        return [], []
    found = [p.relative_to(images).as_posix() for p in images.rglob("*")
             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    bad = {rel for rel in found if printable(rel) != rel}
    return sorted(set(found) - bad), sorted(printable(rel) for rel in bad)


def read_records(root: Path, split: str) -> tuple[list[RawRecord], list[Skip]]:
    """Parse ``{root}/{split}/captions.jsonl`` into records, validating every line.

    Never raises on bad content: a line that is not JSON (whatever the reason:
    :func:`mmcn.data.jsonl.loads`), a record without an image path, a path outside
    ``images/`` or a missing file skips the record; an empty or non-string caption and a
    malformed object skip just that caption/object. Each skip names file and line.
    """
    split_dir = root / split
    path = split_dir / CAPTIONS_FILE
    records: list[RawRecord] = []
    skips: list[Skip] = []
    if not path.is_file():
        return records, skips
    name = f"{split}/{CAPTIONS_FILE}"

    def skip(line: int, reason: str, detail: str) -> None:
        skips.append(Skip(split, reason, name, line, detail))

    with open(path, "rb") as f:
        for line_no, raw_line in enumerate(f, start=1):
            try:
                text = raw_line.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                skip(line_no, "malformed_json", f"not UTF-8: {e}")
                continue
            if not text.strip():
                continue
            try:
                obj = loads(text)
            except ValueError as e:
                skip(line_no, "malformed_json", str(e))
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not obj["image"].strip():
                skip(line_no, "bad_record", 'expected an object with a non-empty string "image"')
                continue
            rel = obj["image"]
            image_path = resolve_image(split_dir, rel)
            if image_path is None:
                skip(line_no, "outside_images", f"{rel!r} is not a relative path under {IMAGES_DIR}/")
                continue
            if not image_path.is_file():
                skip(line_no, "missing_file", f"{IMAGES_DIR}/{rel} does not exist")
                continue
            captions = _parse_captions(obj.get("captions", []), line_no, skip)
            if captions is None:
                continue
            objects = _parse_objects(obj.get("objects", []), line_no, skip)
            rel = posixpath.normpath(rel)
            records.append(RawRecord(rel, captions, objects, line_no))
    return records, skips


def _parse_captions(value, line_no: int, skip) -> list[str] | None:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        skip(line_no, "bad_record", '"captions" must be a list of strings')
        return None
    captions = []
    for i, cap in enumerate(value):
        if not isinstance(cap, str):
            skip(line_no, "bad_caption", f"caption {i} is {type(cap).__name__}, not a string")
        elif not cap.strip():
            skip(line_no, "empty_caption", f"caption {i} is empty or whitespace")
        else:
            captions.append(cap.strip())
    return captions


def _parse_objects(value, line_no: int, skip) -> list[RawObject]:
    if value is None:
        return []
    if not isinstance(value, list):
        skip(line_no, "bad_object", '"objects" must be a list')
        return []
    objects = []
    for i, obj in enumerate(value):
        problem = _object_problem(obj)
        if problem:
            skip(line_no, "bad_object", f"object {i}: {problem}")
            continue
        attrs = obj.get("attributes") or []
        objects.append(RawObject(tuple(float(v) for v in obj["box"]), obj["label"].strip(),
                                 tuple(a.strip() for a in attrs if a.strip())))
    return objects


def _object_problem(obj) -> str:
    if not isinstance(obj, dict):
        return "not an object"
    box = obj.get("box")
    if (not isinstance(box, list) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        return '"box" must be four finite numbers [x1, y1, x2, y2]'
    if not (box[2] > box[0] and box[3] > box[1]):
        return f"box {box} has no area (need x2 > x1 and y2 > y1)"
    if not isinstance(obj.get("label"), str) or not obj["label"].strip():
        return '"label" must be a non-empty string'
    attrs = obj.get("attributes", [])
    if attrs is not None and (not isinstance(attrs, list) or not all(isinstance(a, str) for a in attrs)):
        return '"attributes" must be a list of strings'
    return ""
