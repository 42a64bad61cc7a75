"""The image manifest written beside the TSVs: ``{split}_manifest.jsonl``, one line per image.

Each line: ``{"image_id", "source", "sha256", "width", "height", "format", "mode",
"objects": [{"box", "label", "attributes"}]}``; ``source`` is the original file (relative to
the ingested folder) or ``{split}_imgs.tsv:<line>``, ``sha256`` is of the original bytes,
size and boxes are those of the image as stored in the TSV.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mmcn.data.jsonl import read_jsonl
from mmcn.data.raw import RawObject


@dataclass
class ManifestEntry:
    image_id: int
    source: str
    sha256: str
    width: int
    height: int
    format: str
    mode: str
    objects: list[RawObject] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"image_id": self.image_id, "source": self.source, "sha256": self.sha256,
                "width": self.width, "height": self.height, "format": self.format, "mode": self.mode,
                "objects": [o.to_json() for o in self.objects]}


def manifest_path(root: Path, split: str) -> Path:
    return root / f"{split}_manifest.jsonl"


def write_manifest(path: Path, entries: list[ManifestEntry]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e.to_json(), ensure_ascii=False) + "\n")


def read_manifest(path: Path) -> list[ManifestEntry]:
    return list(read_jsonl(path, _parse_entry, "bad manifest line", "rerun `mmcn ingest`"))


def _parse_entry(obj: dict) -> ManifestEntry:
    objects = [RawObject(tuple(o["box"]), o["label"], tuple(o.get("attributes", []))) for o in obj.get("objects", [])]
    return ManifestEntry(int(obj["image_id"]), obj["source"], obj["sha256"], int(obj["width"]), int(obj["height"]),
                         obj["format"], obj["mode"], objects)
