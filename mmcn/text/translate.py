"""English detector labels -> Chinese: the packaged en→zh table, user overrides, and the
translation of a features folder's labels into per-box Chinese tags.

The table (``mmcn/resources/labels_zh.tsv``) and an overrides file share one format: UTF-8,
one label per line, tab-separated ``en  zh  [kind  [note]]``; ``kind`` is ``object``,
``attribute`` or empty (both); lines starting with ``#`` and blank lines are ignored.
Every label is translated in the sense it has as a thing or property seen in a photo
(a detector's "sink" is 水槽, "court" 球场, "bat" 球棒); the ``note`` column marks the
genuinely ambiguous ones. Look-ups ignore case, underscores and repeated spaces; an
override wins over the table; a kind-specific row wins over a row for both kinds.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Literal, Sequence

from mmcn.data import features as region_features
from mmcn.data.chain import read_chain, write_chain
from mmcn.data.tags import ImageTags, tags_path, write_tags
from mmcn.logs import Progress

log = logging.getLogger(__name__)

Kind = Literal["object", "attribute"]
KINDS: tuple[str, ...] = ("object", "attribute")
POLICIES: tuple[str, ...] = ("keep", "drop", "error")
PACKAGED_TABLE = "resources/labels_zh.tsv"
IMAGENET_TABLE = "resources/imagenet_zh.tsv"  # the grid detector's ImageNet labels (mmcn.vision.grid)
RESOURCES = (PACKAGED_TABLE, IMAGENET_TABLE)  # package data read here (mmcn.provenance: code deps, fingerprints)


class UnknownLabelError(ValueError):
    """Labels without a translation under the ``error`` policy (message lists them with counts)."""


def normalise(label: str) -> str:
    """The look-up key of a label: lower case, ``_`` as space, single spaces, stripped."""
    return " ".join(label.lower().replace("_", " ").split())


@dataclass(frozen=True)
class Entry:
    en: str
    zh: str
    kind: str = ""      # "object", "attribute" or "" (both)
    note: str = ""


def read_table(text: str, where: str) -> list[Entry]:
    """Parse the table format (see the module docstring); errors name ``where`` and the line."""
    entries = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) < 2 or not cols[0] or not cols[1]:
            raise ValueError(f"{where}:{line_no}: expected 'english<TAB>chinese[<TAB>kind[<TAB>note]]', "
                             f"got {line!r}")
        kind = cols[2] if len(cols) > 2 else ""
        if kind not in ("", *KINDS):
            raise ValueError(f"{where}:{line_no}: kind must be 'object', 'attribute' or empty, got {kind!r}")
        entries.append(Entry(cols[0], cols[1], kind, cols[3] if len(cols) > 3 else ""))
    return entries


class LabelTable:
    """en→zh look-up for detector object and attribute labels (packaged table + overrides)."""

    def __init__(self, entries: list[Entry], overrides: list[Entry] = ()):
        self._maps: dict[str, dict[str, str]] = {k: {} for k in KINDS}
        self.notes: dict[str, str] = {}
        for source in (entries, overrides):  # later rows win: overrides over the table
            for e in sorted(source, key=lambda e: e.kind != ""):  # rows for both kinds first, specific ones win
                for kind in ([e.kind] if e.kind else KINDS):
                    self._maps[kind][normalise(e.en)] = e.zh
                if e.note:
                    self.notes[normalise(e.en)] = e.note
        self.overrides = list(overrides)
        self.n_overrides = len(overrides)

    @classmethod
    def load(cls, overrides: Path | None = None, rows: Sequence[Entry] = ()) -> "LabelTable":
        """The packaged table (plus ``imagenet_zh.tsv``'s rows for the grid detector's ImageNet
        labels it lacks), with the rows of an ``overrides`` file (or given ``rows``) on top."""
        text = resources.files("mmcn").joinpath(PACKAGED_TABLE).read_text("utf-8")
        extra: list[Entry] = list(rows)
        if overrides:
            path = Path(overrides)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: overrides file not found (set translate.overrides to an "
                                        "existing TSV of 'english<TAB>chinese' lines, or to empty)")
            extra += read_table(path.read_text("utf-8"), str(path))
        entries = read_table(text, f"mmcn/{PACKAGED_TABLE}")
        known = {normalise(e.en) for e in entries if e.kind in ("", "object")}
        imagenet = read_table(resources.files("mmcn").joinpath(IMAGENET_TABLE).read_text("utf-8"),
                              f"mmcn/{IMAGENET_TABLE}")
        return cls(entries + [e for e in imagenet if normalise(e.en) not in known], extra)  # it fills gaps only

    def get(self, label: str, kind: Kind) -> str | None:
        return self._maps[kind].get(normalise(label))

    def labels(self, kind: Kind) -> set[str]:
        return set(self._maps[kind])


@dataclass(frozen=True)
class TranslateConfig:
    unknown: str = "keep"      # keep (English stays) | drop (left out of the tags) | error
    max_attributes: int = 2    # attributes per box in its tag text, best first (0: objects only)

    def __post_init__(self) -> None:
        if self.unknown not in POLICIES:
            raise ValueError(f"unknown: the unknown-label policy must be one of {', '.join(POLICIES)}, "
                             f"got {self.unknown!r}")
        if not self.max_attributes >= 0:
            raise ValueError(f"max_attributes: must be >= 0, got {self.max_attributes}")


class Translator:
    """Translates boxes' labels with a :class:`LabelTable`, counting every unknown label."""

    def __init__(self, table: LabelTable, cfg: TranslateConfig):
        self.table, self.cfg = table, cfg
        self.seen = Counter()                    # occurrences per kind
        self.unknown = {k: Counter() for k in KINDS}

    def word(self, label: str, kind: Kind) -> str:
        self.seen[kind] += 1
        zh = self.table.get(label, kind)
        if zh is not None:
            return zh
        self.unknown[kind][label] += 1
        return label if self.cfg.unknown == "keep" else ""

    def image(self, image_id: int, classes: list[str], attributes: list[list[str]]) -> ImageTags:
        objects = [self.word(c, "object") for c in classes]
        attrs = [[w for w in (self.word(a, "attribute") for a in box) if w]
                 for box in (attributes or [[] for _ in classes])]
        tags = [" ".join(a[: self.cfg.max_attributes] + [o]) if o else "" for o, a in zip(objects, attrs)]
        return ImageTags(image_id, objects, attrs, tags)

    def summary(self) -> dict:
        """Coverage (percent of label occurrences with a translation) and every unknown label."""
        total = sum(self.seen.values())
        missed = sum(sum(c.values()) for c in self.unknown.values())
        return {
            "coverage": round(100.0 * (total - missed) / total, 4) if total else 100.0,
            "policy": self.cfg.unknown,
            **{f"{k}s": {"occurrences": self.seen[k], "unknown": sum(self.unknown[k].values()),
                         "coverage": round(100.0 * (1 - sum(self.unknown[k].values()) / self.seen[k]), 4)
                         if self.seen[k] else 100.0} for k in KINDS},
            "unknown_labels": {k: dict(self.unknown[k].most_common()) for k in KINDS},
        }


def translate_features(features_dir: Path, out_dir: Path, table: LabelTable,
                       cfg: TranslateConfig = TranslateConfig()) -> dict:
    """Write ``out_dir/{split}.jsonl`` (see :mod:`mmcn.data.tags`) for every split of a
    features folder; returns the summary (coverage, counts, unknown labels).

    Under the ``error`` policy nothing is written when a label is unknown: the
    :class:`UnknownLabelError` lists every unknown label with its count.
    """
    start = time.perf_counter()
    translator = Translator(table, cfg)
    splits = region_features.splits_in(features_dir)
    if not splits:
        raise FileNotFoundError(f"{features_dir}: no feature shards; run the features stage first")
    results: dict[str, list[ImageTags]] = {}
    for split in splits:
        records = region_features.iter_columns(features_dir, split, ("image_id", "classes", "attributes"))
        results[split] = [translator.image(r["image_id"], r["classes"], r["attributes"])
                          for r in Progress(None, f"translate {split}", "img", log).iterate(records)]
    summary = translator.summary()
    if cfg.unknown == "error" and any(summary["unknown_labels"].values()):
        listing = "; ".join(f"{k}s: " + ", ".join(f"{label!r} ×{n}" for label, n in c.items())
                            for k, c in summary["unknown_labels"].items() if c)
        raise UnknownLabelError(f"{features_dir}: labels without a Chinese translation ({listing}). Add them "
                                "to the overrides file (translate.overrides), or set translate.unknown to "
                                "keep or drop")
    for split, records in results.items():
        write_tags(tags_path(out_dir, split), records)
    write_chain(out_dir, read_chain(features_dir), "translate",
                {**asdict(cfg), "overrides": [asdict(e) for e in table.overrides]})
    summary["images"] = {split: len(records) for split, records in results.items()}
    summary["overrides"] = table.n_overrides
    log.info("translate: %s images, coverage %.2f%% (%d unknown object / %d unknown attribute occurrences, "
             "policy %s) in %.1fs", summary["images"], summary["coverage"], summary["objects"]["unknown"],
             summary["attributes"]["unknown"], cfg.unknown, time.perf_counter() - start)
    return summary
