"""Reading JSON lines: :func:`loads`, one line of any JSON-lines input (a bad line is a
ValueError saying why, whatever is wrong with it), and :func:`read_jsonl` for the files mmcn
writes (texts, manifests, tags): one record per line, blank lines ignored, and a bad line an
error that names the file, the line and what to do."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")


def loads(line: str | bytes) -> Any:
    """``json.loads(line)``, with every way a line can fail as a ValueError with a short reason:
    invalid JSON, bytes that are not UTF-8, nesting deeper than Python's recursion limit, an
    integer with more digits than Python converts, a string with a lone surrogate escape
    (``"\\ud800"``: no UTF-8 file can hold it, so writing it out later would fail)."""
    try:
        obj = json.loads(line)
    except RecursionError:
        raise ValueError(f"nested deeper than Python's recursion limit ({sys.getrecursionlimit()} levels)") from None
    if (b"\\u" if isinstance(line, bytes) else "\\u") in line:
        bad = _lone_surrogate(obj)
        if bad is not None:
            raise ValueError(f"string {bad!r} holds a lone surrogate escape (not a Unicode character)")
    return obj


def _lone_surrogate(obj: Any) -> str | None:
    """The first string in ``obj`` (keys included) that cannot be encoded as UTF-8, or None."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item[:40]
        elif isinstance(item, dict):
            stack += list(item.keys()) + list(item.values())
        elif isinstance(item, list):
            stack += item
    return None


def read_jsonl(path: Path | str, parse: Callable[[dict], T], what: str, hint: str) -> Iterator[T]:
    """``parse(object)`` of every non-blank line of ``path``. A line that :func:`loads` refuses,
    or a ``parse`` that raises KeyError/TypeError/ValueError, is ``ValueError("{path}:{line}:
    {what} ({error}); {hint}")``."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = parse(loads(line))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line_no}: {what} ({e}); {hint}") from None
            yield record
