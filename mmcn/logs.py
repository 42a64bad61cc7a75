"""Logging set-up shared by the `mmcn` CLI and the DVC stage scripts."""
from __future__ import annotations

import logging


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with ``verbose``) to stderr, with time, level and logger name on every line."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
