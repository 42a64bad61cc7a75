"""The chain settings a dataset was made with, carried from stage to stage.

How an image becomes model inputs is decided by settings spread over three stages:
ingest's re-encoding (``max_side``), the detector's extraction settings and the label
translation (policy, attributes per box, the override rows). Each of those library calls
writes ``_chain.json`` beside its output: what its input folder carried, plus its own
section. The LMDB store keeps the chain in its metadata and a trained model folder in
``mmcn.json``, so that :mod:`mmcn.infer` rebuilds the very chain a model was trained and
evaluated on from the model folder alone, wherever it is copied (no params.yaml needed).
"""
from __future__ import annotations

import json
from pathlib import Path

CHAIN_FILE = "_chain.json"


def read_chain(folder: Path | str | None) -> dict:
    """The chain recorded in ``folder`` (``{}`` when there is none, e.g. data from elsewhere)."""
    path = Path(folder) / CHAIN_FILE if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        chain = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); rerun the stage that wrote {path.parent}") from None
    if not isinstance(chain, dict):
        raise ValueError(f"{path}: expected a JSON object of chain sections; rerun the stage that wrote it")
    return chain


def write_chain(folder: Path | str, upstream: dict, section: str, settings: dict) -> dict:
    """Record ``upstream`` plus this stage's ``section`` in ``folder``; returns the chain."""
    chain = {**upstream, section: settings}
    (Path(folder) / CHAIN_FILE).write_text(json.dumps(chain, indent=2, ensure_ascii=False, sort_keys=True) + "\n",
                                           encoding="utf-8")
    return chain
