"""Helpers shared by the stage scripts: load one params.yaml section, set up logging."""
from __future__ import annotations

import logging
from pathlib import Path

import yaml

from mmcn.logs import setup_logging

PARAMS_FILE = Path("params.yaml")


def stage_params(section: str) -> dict:
    """The ``section`` of params.yaml (the only place a stage reads its settings from)."""
    with open(PARAMS_FILE, encoding="utf-8") as f:
        params = yaml.safe_load(f) or {}
    if section not in params:
        raise SystemExit(f"{PARAMS_FILE}: missing section {section!r}")
    return params[section] or {}


def start_ray() -> None:
    """Start or join Ray as params.yaml's ``ray`` section says (an execution setting, not a
    DVC param: where the work runs does not change its results). ``address`` empty: a
    local Ray with ``num_cpus``; ``auto`` or ``ray://host:10001``: an existing cluster.
    The ``RAY_ADDRESS`` environment variable, when set, wins."""
    import os

    import ray

    with open(PARAMS_FILE, encoding="utf-8") as f:
        conf = (yaml.safe_load(f) or {}).get("ray") or {}
    address = os.environ.get("RAY_ADDRESS") or conf.get("address") or None
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=conf.get("num_cpus") or os.cpu_count(), include_dashboard=False)


def start(name: str) -> logging.Logger:
    setup_logging()
    return logging.getLogger(f"stages.{name}")
