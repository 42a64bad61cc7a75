"""Chinese object tags per image (the translate stage's output): ``{root}/{split}.jsonl``.

One line per image of the features split, in the same order, boxes in the same order as
the region features (so box k's tag describes feature row k)::

    {"image_id": 123, "objects": ["圆形", "三角形"], "attributes": [["红色"], ["蓝色", "大"]],
     "tags": ["红色 圆形", "蓝色 大 三角形"]}

``objects[k]`` is the Chinese name of box k's class ("" when the label was dropped by
the unknown-label policy), ``attributes[k]`` its Chinese attributes (best first),
``tags[k]`` the box's tag text: its attributes then its object, space-separated ("" when
nothing is left). An image's tag text for a model is the non-empty tags joined by spaces
(:func:`tag_text`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from mmcn.data.jsonl import read_jsonl
from mmcn.data.splits import ordered


@dataclass
class ImageTags:
    image_id: int
    objects: list[str]
    attributes: list[list[str]]
    tags: list[str]

    def to_json(self) -> dict:
        return {"image_id": self.image_id, "objects": self.objects, "attributes": self.attributes, "tags": self.tags}


def tag_text(tags: Iterable[str]) -> str:
    """The text a model reads for an image's tags: non-empty box tags in box order, space-joined."""
    return " ".join(t for t in tags if t)


def tags_path(root: Path, split: str) -> Path:
    return Path(root) / f"{split}.jsonl"


def splits_in(root: Path) -> list[str]:
    return ordered(p.stem for p in Path(root).glob("*.jsonl"))


def write_tags(path: Path, records: Iterable[ImageTags]) -> int:
    """Write one split's tags (to a temporary name, renamed when complete); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_tags(path: Path) -> Iterator[ImageTags]:
    """Every image's tags in ``path``; a malformed line is an error naming file and line."""
    return read_jsonl(path, _parse_tags, "bad tags line", "rerun the translate stage")


def _parse_tags(obj: dict) -> ImageTags:
    record = ImageTags(int(obj["image_id"]), list(obj["objects"]), [list(a) for a in obj["attributes"]],
                       list(obj["tags"]))
    if not len(record.objects) == len(record.attributes) == len(record.tags):
        raise ValueError(f"image {record.image_id} has {len(record.objects)} objects, {len(record.attributes)} "
                         f"attribute lists and {len(record.tags)} tags")
    return record
