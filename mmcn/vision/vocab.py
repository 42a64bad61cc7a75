"""Detector label vocabularies: the packaged object/attribute name lists and their display labels.

A vocabulary file has one entry per line; line i is index i (0-based). An entry may list
comma-separated synonyms (``"gray,grey"``); the first one is the display label. The
packaged files live in ``mmcn/resources/detector/`` (see the README there).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

PACKAGED = ("vg1600_objects", "vg400_attributes", "vinvl1594_objects", "vinvl524_attributes", "coco80_objects")
RESOURCES = ("resources/detector",)  # package data read here (mmcn.provenance: code deps, fingerprints)


def load_vocab(name_or_path: str | Path) -> tuple[str, ...]:
    """Entries of a packaged vocabulary (``"vg1600_objects"``) or of a vocabulary file path.

    Entries keep their synonyms; use :func:`display_label` for the label to show.
    """
    if isinstance(name_or_path, str) and name_or_path in PACKAGED:
        text = resources.files("mmcn").joinpath(f"resources/detector/{name_or_path}.txt").read_text("utf-8")
        where = f"mmcn/resources/detector/{name_or_path}.txt"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such vocabulary file (packaged vocabularies: {', '.join(PACKAGED)})")
        text = path.read_text("utf-8")
        where = str(path)
    entries = tuple(line.strip() for line in text.splitlines())
    if entries and entries[-1] == "":
        entries = entries[:-1]
    for i, entry in enumerate(entries):
        if not entry:
            raise ValueError(f"{where}: line {i + 1} is empty; every line must name index {i}")
    return entries


def display_label(entry: str) -> str:
    """The first synonym of a vocabulary entry: ``"gray,grey"`` -> ``"gray"``."""
    return entry.split(",")[0].strip()
