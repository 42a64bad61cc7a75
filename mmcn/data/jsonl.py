"""Reading the JSON-lines files mmcn writes (texts, manifests, tags): one record per line,
blank lines ignored, and a bad line an error that names the file, the line and what to do."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


def read_jsonl(path: Path | str, parse: Callable[[dict], T], what: str, hint: str) -> Iterator[T]:
    """``parse(object)`` of every non-blank line of ``path``. Invalid JSON, or a ``parse`` that
    raises KeyError/TypeError/ValueError, is ``ValueError("{path}:{line}: {what} ({error}); {hint}")``."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = parse(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line_no}: {what} ({e}); {hint}") from None
            yield record
