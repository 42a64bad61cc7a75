"""Helpers shared by the stage scripts: load one params.yaml section (and its execution
settings), start Ray, set up logging, run a stage's main (a user error: one line, exit 2)."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from mmcn.logs import quiet_ray_data, ray_init_options, setup_logging
from mmcn.settings import SettingsError, build, run_main

PARAMS_FILE = Path("params.yaml")


def _load() -> dict:
    with open(PARAMS_FILE, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def _lookup(params: dict, section: str) -> dict | None:
    """``params["caption"]["eval"]`` for ``"caption.eval"``; None when a part is missing.
    A part that is not a mapping (``ingest: null``, ``ingest: data/raw``) is an error."""
    for part in section.split("."):
        if not isinstance(params, dict) or part not in params:
            return None
        params = params[part]
    if not isinstance(params, dict):
        raise SettingsError(f"{PARAMS_FILE}: {section}: expected a mapping of settings, got {params!r}; "
                            f"give its keys indented under {section.split('.')[-1]}: (see README)")
    return params


def stage_params(section: str) -> dict:
    """The ``section`` of params.yaml (dotted for a subsection: ``"caption.eval"``): the only
    place a stage reads the settings that decide its results. Call it with a literal or an
    f-string of the foreach item, so that tests/test_deps.py can check it against the stage's
    ``params:`` in dvc.yaml."""
    found = _lookup(_load(), section)
    if found is None:
        raise SettingsError(f"{PARAMS_FILE}: {section}: missing section; add it (see README)")
    return dict(found)


def stage_param(dotted: str):
    """One value of params.yaml (``"features.source"``), for a stage that depends on that one
    setting of another stage's section and declares just it in dvc.yaml's ``params:``."""
    section, _, key = dotted.rpartition(".")
    found = _lookup(_load(), section)
    if found is None or key not in found:
        raise SettingsError(f"{PARAMS_FILE}: {dotted}: missing; add it (see README)")
    return found[key]


def execution_params(section: str) -> dict:
    """``execution.{section}`` of params.yaml (e.g. ``{"workers": 4}``): settings that change
    how fast a stage runs, not what it makes (worker counts, threads). No stage declares the
    ``execution`` section in dvc.yaml, so changing them reruns nothing; like ``ray``. Missing:
    ``{}`` (the library's defaults). A key also in the tracked ``section`` is an error."""
    params = _load()
    found = _lookup({"execution": params.get("execution") or {}}, f"execution.{section}") or {}
    both = sorted(set(found) & set(_lookup(params, section) or {}))
    if both:
        raise SettingsError(f"{PARAMS_FILE}: {', '.join(f'{section}.{k}' for k in both)} also set under "
                            f"execution.{section}: keep execution settings in the execution section only")
    return dict(found)


@dataclass(frozen=True)
class RaySettings:
    """params.yaml's ``ray`` section (see :func:`start_ray`)."""

    address: str = ""
    num_cpus: int | None = None
    storage_path: str = ".ray_results"

    def __post_init__(self) -> None:
        if self.num_cpus is not None and not self.num_cpus >= 1:
            raise ValueError(f"num_cpus: must be >= 1 (or null: all cores), got {self.num_cpus}")
        if not self.storage_path:
            raise ValueError("storage_path: empty; give the folder for Ray Train's checkpoints")


def ray_settings() -> RaySettings:
    """The ``ray`` section, checked (missing: the defaults)."""
    params = _load()
    return build(RaySettings, ("ray", _lookup(params, "ray") if "ray" in params else {}))


def start_ray() -> None:
    """Start or join Ray as params.yaml's ``ray`` section says (an execution setting, not a
    DVC param: where the work runs does not change its results). ``address`` empty: a
    local Ray with ``num_cpus``; ``auto`` or ``ray://host:10001``: an existing cluster.
    The ``RAY_ADDRESS`` environment variable, when set, wins."""
    import os

    import ray

    conf = ray_settings()
    address = os.environ.get("RAY_ADDRESS") or conf.address or None
    quiet = ray_init_options()  # Ray's INFO lines and routine notices out of the stage's log
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=conf.num_cpus or os.cpu_count(), include_dashboard=False, **quiet)
    quiet_ray_data()


def start(name: str) -> logging.Logger:
    setup_logging()
    return logging.getLogger(f"stages.{name}")


def run(main: Callable[[], None], *user_errors: type[BaseException]) -> None:
    """Run a stage's ``main`` and exit: a user error (a bad param, a bad input file, a refused
    checkpoint; :data:`mmcn.settings.USER_ERRORS` and ``user_errors``) ends as one line on
    stderr and exit code 2, its traceback shown only with ``MMCN_DEBUG=1``."""
    sys.exit(run_main(main, user_errors))
