"""Helpers shared by the stage scripts: load one params.yaml section, set up logging."""
from __future__ import annotations

import logging
from pathlib import Path

import yaml

from mmcn.cli import setup_logging

PARAMS_FILE = Path("params.yaml")


def stage_params(section: str) -> dict:
    """The ``section`` of params.yaml (the only place a stage reads its settings from)."""
    with open(PARAMS_FILE, encoding="utf-8") as f:
        params = yaml.safe_load(f) or {}
    if section not in params:
        raise SystemExit(f"{PARAMS_FILE}: missing section {section!r}")
    return params[section] or {}


def start(name: str) -> logging.Logger:
    setup_logging()
    return logging.getLogger(f"stages.{name}")
