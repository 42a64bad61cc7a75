"""Split names and their canonical order (train, valid, test, then any others by name)."""
from __future__ import annotations

from typing import Iterable

SPLITS = ("train", "valid", "test")


def ordered(names: Iterable[str]) -> list[str]:
    """``names`` without repeats, the known splits first in canonical order, then the rest sorted."""
    rank = {s: k for k, s in enumerate(SPLITS)}
    return sorted(set(names), key=lambda s: (rank.get(s, len(SPLITS)), s))
