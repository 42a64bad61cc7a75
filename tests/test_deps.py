"""dvc.yaml cannot drift from the code: for every stage instance (``foreach`` expanded), the
code deps derived from its script by :func:`mmcn.provenance.code_files` (the script,
stages/common.py, the mmcn modules they import transitively, the package data those declare)
against its ``deps:`` both ways (a missing one: a change reruns nothing; an excess one: a
needless rerun), the params paths its script opens against its ``deps:``, and the
params.yaml sections its script reads (``stage_params``) against its ``params:``, both ways.
``execution`` and ``ray`` are read through their own helpers and declared by no stage.
A stage whose code imports :mod:`mmcn.models.factory` and whose foreach item is a task also
runs that task's family package, which the factory imports by name (``family_code``).
"""
from __future__ import annotations

import ast
import copy
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mmcn.models.factory import FAMILIES, family_code
from mmcn.provenance import PACKAGE_DIR, code_files

ROOT = Path(__file__).resolve().parents[1]
UNTRACKED = ("ray", "execution")   # params.yaml sections no stage declares: how fast and where, not what
CODE = ("mmcn/", "stages/")        # deps under these are code deps: checked both ways
EXECUTION_KEYS = {"ingest": {"workers"}, "features": {"workers"}, "lmdb": {"workers"},
                  "train": {"cpus_per_worker"}, "caption.eval": {"workers"}, "retrieval.eval": {"workers"}}


@dataclass
class Stage:
    name: str              # as DVC names it: "train@caption"
    script: str            # the .py file of its cmd, relative to the repo
    item: str | None       # the foreach item
    deps: list[str]
    params: list[str]


def lookup(params: dict, dotted: str):
    value = params
    for part in dotted.split("."):
        value = value[part]
    return value


def interpolate(value, item, params: dict, key: str | None = None):
    """``${item}`` (``${item.x}`` of a dict item), ``${key}`` (a dict foreach's key) and
    ``${section.key}`` (from params.yaml) as DVC resolves them."""
    if isinstance(value, dict):
        return {interpolate(k, item, params, key): interpolate(v, item, params, key) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, item, params, key) for v in value]
    if not isinstance(value, str):
        return value

    def resolve(name: str):
        if name == "item":
            return item
        if name == "key":
            return key
        if name.startswith("item."):
            return lookup(item, name[len("item."):])
        return lookup(params, name)

    return re.sub(r"\$\{\s*([^}\s]+)\s*\}", lambda m: str(resolve(m[1])), value)


def stages(dvc_yaml: dict, params: dict) -> list[Stage]:
    out = []
    for name, spec in dvc_yaml["stages"].items():
        items = spec["foreach"] if "foreach" in spec else [None]
        if isinstance(items, str):
            items = interpolate(items, None, params)
        if isinstance(items, dict):  # key -> value: ${key} is the instance name, ${item.x} the value's fields
            pairs = [(k, lookup(params, v[2:-1]) if isinstance(v, str) and v.startswith("${") else
                      interpolate(v, None, params)) for k, v in items.items()]
        else:
            assert isinstance(items, list), f"{name}: foreach over a {type(items).__name__} is not handled here"
            pairs = [(item, item) for item in items]
        for item_name, item in pairs:
            body = interpolate(spec["do"] if item is not None else spec, item, params,
                               item_name if isinstance(items, dict) else None)
            item = item_name
            scripts = [w for w in shlex.split(body["cmd"]) if w.endswith(".py")]
            assert len(scripts) == 1, f"{name}: cmd {body['cmd']!r} should run one Python script"
            declared = []
            for entry in body.get("params") or []:  # "section" or {"params.yaml": [keys]}
                declared += [entry] if isinstance(entry, str) else entry.get("params.yaml", [])
            deps = [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps") or []]
            out.append(Stage(name if item is None else f"{name}@{item}", scripts[0], item, deps, declared))
    return out


def section_name(node: ast.expr, stage: Stage, script: str) -> str:
    """The literal section of a ``stage_params(...)`` call (f-strings and names: the foreach item)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if stage.item is not None and isinstance(node, ast.Name):
        return stage.item
    if stage.item is not None and isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else stage.item for v in node.values)
    raise AssertionError(f"{script}:{node.lineno}: stage_params() needs a literal section (or the foreach item) "
                         f"for its params to be checked against dvc.yaml")


def read_params(stage: Stage, root: Path) -> tuple[set[str], set[str]]:
    """The params sections the stage's script reads (``stage_params``), and the dotted params
    whose value it opens as a path (``Path(p["key"])``, ``p.get``/``p.pop``, with
    ``p = stage_params(...)``)."""
    tree = ast.parse((root / stage.script).read_text(encoding="utf-8"))
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("stage_params",
                                                                                              "stage_param"):
            assert len(node.args) == 1, f"{stage.script}:{node.lineno}: {node.func.id} takes one section"
            calls[node] = section_name(node.args[0], stage, stage.script)
    bound = {}  # variable -> section, for `p = stage_params(...)` (or `a, b = stage_params(...), ...`)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = zip(target.elts, node.value.elts) if isinstance(target, ast.Tuple) and isinstance(
                    node.value, ast.Tuple) else [(target, node.value)]
                bound.update({t.id: calls[v] for t, v in pairs if isinstance(t, ast.Name) and v in calls})
    paths = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Path" and node.args:
            arg = node.args[0]
            if arg in calls and arg.func.id == "stage_param":  # Path(stage_param("a.b"))
                paths.add(calls[arg])
                continue
            if isinstance(arg, ast.Subscript) and isinstance(arg.value, ast.Name):
                var, key = arg.value.id, arg.slice
            elif isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr in (
                    "get", "pop") and isinstance(arg.func.value, ast.Name) and arg.args:
                var, key = arg.func.value.id, arg.args[0]
            else:
                continue
            if var in bound and isinstance(key, ast.Constant):
                paths.add(f"{bound[var]}.{key.value}")
    return set(calls.values()), paths


def relative(path: Path, root: Path) -> str:
    """A derived file as dvc.yaml names it (mmcn's files relative to the folder holding mmcn)."""
    return path.relative_to(root if root in path.parents else PACKAGE_DIR.parent).as_posix()


def covers(dep: str, path: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


def stage_code(stage: Stage, root: Path = ROOT) -> list[Path]:
    """The files a stage runs: its script's imports, and the family package of its task."""
    files = code_files(root / stage.script)
    if stage.item in FAMILIES and any(p.name == "factory.py" and p.parent.name == "models" for p in files):
        files = sorted(set(files) | set(family_code(stage.item)))
    return files


def check(stage_list: list[Stage], params: dict, root: Path = ROOT) -> list[str]:
    """Every problem of the stages' deps and params, one line each naming the stage."""
    problems = []
    for stage in stage_list:
        derived = sorted(relative(p, root) for p in stage_code(stage, root))
        for path in derived:
            if not any(covers(d, path) for d in stage.deps):
                problems.append(f"{stage.name}: missing dep {path} (run by {stage.script}; a change to it "
                                f"would rerun nothing)")
        for dep in stage.deps:
            if not dep.startswith(CODE):
                continue
            inside = [p.relative_to(root).as_posix() for p in sorted((root / dep).rglob("*"))
                      if p.is_file() and "__pycache__" not in p.parts] if (root / dep).is_dir() else [dep]
            unused = [p for p in inside if not any(covers(d, p) for d in derived)]
            if unused or not (root / dep).exists():
                what = "does not exist" if not (root / dep).exists() else (
                    "is not run or read by the stage" if unused == [dep] else f"covers files the stage does not "
                                                                            f"use: {', '.join(unused)}")
                problems.append(f"{stage.name}: excess dep {dep}: {what} (a change to it would rerun the stage "
                                f"for nothing)")
        read, path_params = read_params(stage, root)
        tracked = {s for s in read if s.split(".")[0] not in UNTRACKED}
        for section in sorted(tracked - set(stage.params)):
            problems.append(f"{stage.name}: params section {section} is read by {stage.script} but not in its "
                            f"params: in dvc.yaml (a change to it would rerun nothing)")
        for section in sorted(set(stage.params) - tracked):
            kind = "an execution setting (see params.yaml)" if section.split(".")[0] in UNTRACKED else \
                f"not read by {stage.script}"
            problems.append(f"{stage.name}: params: lists {section}, {kind} (a change to it would rerun the stage "
                            f"for nothing)")
        for dotted in sorted(path_params):
            value = lookup(params, dotted)
            if value and not any(covers(d, str(value)) for d in stage.deps):
                problems.append(f"{stage.name}: missing dep {value} (params {dotted}, a path {stage.script} reads; "
                                f"list it as ${{{dotted}}})")
    return problems


def load(root: Path = ROOT) -> tuple[dict, dict]:
    return (yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")),
            yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")))


def test_dvc_yaml_deps_and_params_match_the_code():
    dvc_yaml, params = load()
    found = stages(dvc_yaml, params)
    assert {"detector", "features", "train@caption", "evaluate@retrieval"} <= {s.name for s in found}
    problems = check(found, params)
    assert not problems, "dvc.yaml does not match the code:\n" + "\n".join(problems)


def test_the_check_names_the_stage_and_the_missing_or_excess_dep():
    dvc_yaml, params = load()
    broken = copy.deepcopy(dvc_yaml)
    broken["stages"]["translate"]["deps"].remove("mmcn/data/tags.py")
    broken["stages"]["train"]["do"]["deps"].remove("mmcn/eval/retrieval_metrics.py")
    broken["stages"]["demo"]["deps"].append("mmcn/data/tsv.py")
    broken["stages"]["evaluate"]["do"]["params"].append("train")
    problems = check(stages(broken, params), params)
    print("\n".join(problems))
    assert any(p.startswith("translate: missing dep mmcn/data/tags.py") for p in problems)
    trains = {f"train@{k}" for k in dvc_yaml["stages"]["train"]["foreach"]}
    assert {p.split(":")[0] for p in problems if "mmcn/eval/retrieval_metrics.py" in p} == trains
    assert any(p.startswith("demo: excess dep mmcn/data/tsv.py") for p in problems)
    assert any(p.startswith("evaluate@caption: params: lists train") for p in problems)
    assert len(problems) == 2 + len(trains) + len(dvc_yaml["stages"]["evaluate"]["foreach"])  # every train@, evaluate@


def test_the_check_sees_params_read_and_paths_opened(tmp_path):
    dvc_yaml, params = load()
    broken = copy.deepcopy(dvc_yaml)
    broken["stages"]["detector"]["deps"].remove("${detector.weights}")
    broken["stages"]["train"]["do"]["params"].remove("${key}.model")
    broken["stages"]["features"]["params"].append("execution")
    problems = check(stages(broken, params), params)
    assert any(p.startswith(f"detector: missing dep {params['detector']['weights']} (params detector.weights")
               for p in problems)
    assert any(p.startswith("train@retrieval: params section retrieval.model is read by stages/train.py")
               for p in problems)
    assert any(p.startswith("features: params: lists execution, an execution setting") for p in problems)
    assert len(problems) == 2 + len(dvc_yaml["stages"]["train"]["foreach"])  # every train@


def test_stage_params_must_be_literal(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages/x.py").write_text("from common import stage_params\nstage_params(name)\n")
    (tmp_path / "stages/common.py").write_text("def stage_params(section): ...\n")
    with pytest.raises(AssertionError, match=r"stages/x.py:2: stage_params\(\) needs a literal section"):
        check([Stage("x", "stages/x.py", None, ["stages/x.py", "stages/common.py"], [])], {}, tmp_path)


def test_execution_settings_are_out_of_the_tracked_sections():
    _, params = load()
    execution = params["execution"]
    for section, keys in EXECUTION_KEYS.items():
        assert keys <= set(lookup(execution, section)), f"execution.{section} should hold {sorted(keys)}"
        assert not keys & set(lookup(params, section)), f"{section} (tracked) holds execution settings {keys}"


if __name__ == "__main__":  # print each stage's code deps as derived (to write dvc.yaml's lists)
    dvc_yaml, params = load()
    for stage in stages(dvc_yaml, params):
        derived = [relative(p, ROOT) for p in stage_code(stage)]
        print(f"{stage.name}:\n" + "".join(f"  - {path}\n" for path in sorted(derived, key=lambda p: (
            p != stage.script, p != "stages/common.py", p))))
