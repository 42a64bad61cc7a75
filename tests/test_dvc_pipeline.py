"""The DVC contract: a real git + DVC repo in a temp dir, `dvc repro` on tiny demo params.

The pipeline reproduces end to end; a second `dvc repro` runs nothing; changing one
stage's param reruns exactly that stage and its descendants.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {"demo": {"train": 12, "valid": 4, "test": 4}, "ingest": {"workers": 1},
        "detector": {"epochs": 1, "batch_size": 4, "warmup_steps": 1, "max_images": 8},
        "features": {"min_boxes": 2, "max_boxes": 4, "shard_size": 8}}
ALL_STAGES = {"demo", "ingest", "detector", "features", "translate", "lmdb"}
AFTER_FEATURES = {"features", "translate", "lmdb"}


def run(repo: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def set_params(repo: Path, changes: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("pipeline")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    (repo / "data").mkdir()
    shutil.copy(ROOT / "data/labels_zh_overrides.tsv", repo / "data/labels_zh_overrides.tsv")
    for tree in ("stages", "mmcn"):
        shutil.copytree(ROOT / tree, repo / tree, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    set_params(repo, TINY)
    run(repo, "git", "init", "-q")
    run(repo, sys.executable, "-m", "dvc", "init", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "pipeline")
    return repo


@pytest.mark.slow
def test_repro_end_to_end_then_nothing_then_only_what_changed(repo):
    dvc = (sys.executable, "-m", "dvc")
    assert ran(run(repo, *dvc, "repro")) == ALL_STAGES
    assert (repo / "data/tsv/train_imgs.tsv").stat().st_size > 0
    assert (repo / "data/tsv/ingest_report.json").is_file()
    assert (repo / "models/detector/model.safetensors").is_file()
    assert "mAP50" in json.loads((repo / "metrics/detector.json").read_text())
    assert len(list((repo / "data/features/train").glob("part-*.parquet"))) == 2
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == ALL_STAGES
    translate = json.loads((repo / "metrics/translate.json").read_text(encoding="utf-8"))
    assert translate["coverage"] == 100.0 and translate["images"]["train"] == 12
    assert (repo / "data/lmdb/train/data.mdb").is_file() and (repo / "data/lmdb/lmdb_report.json").is_file()
    shown = run(repo, *dvc, "metrics", "show")
    assert "detector.json" in shown and "translate.json" in shown

    assert ran(run(repo, *dvc, "repro")) == set()
    assert "up to date" in run(repo, *dvc, "status")

    set_params(repo, {"features": {"score_thresh": 0.3}})
    assert ran(run(repo, *dvc, "repro")) == AFTER_FEATURES

    overrides = repo / "data/labels_zh_overrides.tsv"  # rename every demo shape: some box must change
    renamed = {"circle": "圆片", "square": "方片", "triangle": "三角片", "star": "星片", "heart": "心片", "cross": "叉片"}
    overrides.write_text(overrides.read_text(encoding="utf-8") +
                         "".join(f"{en}\t{zh}\tobject\n" for en, zh in renamed.items()), encoding="utf-8")
    assert ran(run(repo, *dvc, "repro")) == {"translate", "lmdb"}
    assert json.loads((repo / "metrics/translate.json").read_text(encoding="utf-8"))["overrides"] == 12
    assert any(zh in (repo / "data/labels_zh/train.jsonl").read_text(encoding="utf-8") for zh in renamed.values())

    set_params(repo, {"lmdb": {"shards": 2}})
    assert ran(run(repo, *dvc, "repro")) == {"lmdb"}

    set_params(repo, {"detector": {"lr": 0.01}})
    assert ran(run(repo, *dvc, "repro")) == {"detector"} | AFTER_FEATURES

    set_params(repo, {"ingest": {"max_side": 64}})
    assert ran(run(repo, *dvc, "repro")) == {"ingest", "detector"} | AFTER_FEATURES

    set_params(repo, {"demo": {"seed": 1}})
    assert ran(run(repo, *dvc, "repro")) == ALL_STAGES
    assert ran(run(repo, *dvc, "repro")) == set()
