"""Skipped-input records and the per-split counts that ingest-like stages report."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path


# Skip reasons that only follow from images skipped before (a text whose images are gone):
# left out when saying why a split kept no image, so that the causes come first.
FOLLOW_FROM_IMAGES = frozenset({"unknown_image_id", "no_valid_image"})


def printable(path: str | os.PathLike) -> str:
    """A path as text that any report, log or terminal can hold: bytes of the name that are not
    UTF-8 (``os.fsdecode`` keeps them as lone surrogates) shown as backslash escapes (``\\xff``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Skip:
    """One piece of input that was left out, and why.

    ``file`` is the path (or TSV file) the input came from; ``line`` is the 1-based line of
    the record in its JSONL/TSV file, 0 when the input is a file without a record line.
    """

    split: str
    reason: str
    file: str
    line: int = 0
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"[{self.split}] {where}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class SplitCounts:
    """What happened to one split: counts of input seen and output written, skips by reason."""

    images_seen: int = 0
    images_written: int = 0
    captions_seen: int = 0
    texts_written: int = 0
    pairs_written: int = 0
    skipped: Counter = field(default_factory=Counter)

    def to_json(self) -> dict:
        out = asdict(self)
        out["skipped"] = dict(sorted(self.skipped.items()))
        return out


@dataclass
class IngestReport:
    """The whole ``ingest_report.json``: per-split counts plus every skip with its reason.

    It holds no timings or absolute paths, so the same input gives the same bytes (DVC
    then sees no change downstream when a stage is forced to rerun).
    """

    source: str
    source_format: str
    splits: dict[str, SplitCounts] = field(default_factory=dict)
    skips: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self, split: str) -> SplitCounts:
        return self.splits.setdefault(split, SplitCounts())

    def skip(self, skip: Skip) -> None:
        self.skips.append(skip)
        self.counts(skip.split).skipped[skip.reason] += 1

    def reasons(self, split: str, limit: int = 3, leave_out: frozenset[str] = frozenset()) -> str:
        """``split``'s most frequent skip reasons (but ``leave_out``) with their counts, each with
        its first case: ``not_an_image 10 (e.g. a.jpg: not an image: …); truncated 2 (e.g. …)``."""
        counts = {r: n for r, n in self.counts(split).skipped.items() if r not in leave_out}
        parts = []
        for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]:
            first = next(s for s in self.skips if s.split == split and s.reason == reason)
            where = f"{first.file}:{first.line}" if first.line else first.file
            parts.append(f"{reason} {n} (e.g. {where}" + (f": {first.detail})" if first.detail else ")"))
        more = len(counts) - limit
        return "; ".join(parts) + (f"; and {more} other reason(s)" if more > 0 else "") if parts else "nothing skipped"

    def unusable(self) -> list[str]:
        """Why the output is unusable, one line per problem: a split that had input but kept no
        image, or kept images but none of its captions; no split with an image at all. ``[]``: fine."""
        problems = []
        for split, c in self.splits.items():
            if c.images_seen and not c.images_written:
                problems.append(f"split {split}: {c.images_seen} image(s) in, none kept; skipped: "
                                f"{self.reasons(split, leave_out=FOLLOW_FROM_IMAGES)}")
            elif c.captions_seen and not c.texts_written:
                problems.append(f"split {split}: {c.captions_seen} caption(s) in, none kept; skipped: "
                                f"{self.reasons(split)}")
        if not any(c.images_written for c in self.splits.values()) and not problems:
            problems.append("no split holds any image: "
                            + ("; ".join(f"{s} {c.images_seen} image(s) in" for s, c in self.splits.items())
                               or "no split found"))
        return problems

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "source_format": self.source_format,
            "splits": {name: c.to_json() for name, c in self.splits.items()},
            "skipped_total": len(self.skips),
            "skipped": [asdict(s) for s in self.skips],
            "notes": self.notes,
        }

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
