"""Helpers shared by the stage scripts: load one params.yaml section (and its execution
settings), start Ray, set up logging."""
from __future__ import annotations

import logging
from pathlib import Path

import yaml

from mmcn.logs import setup_logging

PARAMS_FILE = Path("params.yaml")


def _load() -> dict:
    with open(PARAMS_FILE, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def _lookup(params: dict, section: str) -> dict | None:
    """``params["caption"]["eval"]`` for ``"caption.eval"``; None when a part is missing."""
    for part in section.split("."):
        if not isinstance(params, dict) or part not in params:
            return None
        params = params[part]
    return params or {}


def stage_params(section: str) -> dict:
    """The ``section`` of params.yaml (dotted for a subsection: ``"caption.eval"``): the only
    place a stage reads the settings that decide its results. Call it with a literal or an
    f-string of the foreach item, so that tests/test_deps.py can check it against the stage's
    ``params:`` in dvc.yaml."""
    found = _lookup(_load(), section)
    if found is None:
        raise SystemExit(f"{PARAMS_FILE}: missing section {section!r}")
    return found


def execution_params(section: str) -> dict:
    """``execution.{section}`` of params.yaml (e.g. ``{"workers": 4}``): settings that change
    how fast a stage runs, not what it makes (worker counts, threads). No stage declares the
    ``execution`` section in dvc.yaml, so changing them reruns nothing; like ``ray``. Missing:
    ``{}`` (the library's defaults). A key also in the tracked ``section`` is an error."""
    params = _load()
    found = _lookup(params.get("execution") or {}, section) or {}
    both = sorted(set(found) & set(_lookup(params, section) or {}))
    if both:
        raise SystemExit(f"{PARAMS_FILE}: {', '.join(f'{section}.{k}' for k in both)} also set under "
                         f"execution.{section}: keep execution settings in the execution section only")
    return found


def start_ray() -> None:
    """Start or join Ray as params.yaml's ``ray`` section says (an execution setting, not a
    DVC param: where the work runs does not change its results). ``address`` empty: a
    local Ray with ``num_cpus``; ``auto`` or ``ray://host:10001``: an existing cluster.
    The ``RAY_ADDRESS`` environment variable, when set, wins."""
    import os

    import ray

    conf = _load().get("ray") or {}
    address = os.environ.get("RAY_ADDRESS") or conf.get("address") or None
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=conf.get("num_cpus") or os.cpu_count(), include_dashboard=False)


def start(name: str) -> logging.Logger:
    setup_logging()
    return logging.getLogger(f"stages.{name}")
