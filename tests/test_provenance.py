"""mmcn.provenance: the import walk (on a small package the test writes), declared package data,
checksums, and the fingerprints built on them (feature extraction, the Ray Train run name)."""
from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import xxhash

from mmcn import provenance
from mmcn.provenance import checksum, code_files, digests

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package named mmcn in tmp_path (imports only: never imported), the walker pointed at it."""
    files = {
        "mmcn/__init__.py": '"""root"""\n',
        "mmcn/a/__init__.py": "from mmcn.a.side import X\n",
        "mmcn/a/side.py": "X = 1\n",
        "mmcn/a/b.py": "from . import c\nfrom .. import top\nfrom .c import helper\n\n"
                       "def lazy():\n    from mmcn.d import e\n",
        "mmcn/a/c.py": "import json\nhelper = 2\n",
        "mmcn/top.py": "import numpy\n",
        "mmcn/d/__init__.py": "",
        "mmcn/d/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mmcn import typing_only\n"
                       "else:\n    from mmcn import runtime_only\n",
        "mmcn/typing_only.py": "",
        "mmcn/runtime_only.py": 'TABLE = "resources/t.tsv"\nRESOURCES = (TABLE, "resources/dir")\n',
        "mmcn/resources/t.tsv": "a\tb\n",
        "mmcn/resources/dir/x.txt": "x\n",
        "mmcn/unused.py": "",
        "stages/common.py": "from mmcn.top import *\n",
        "stages/s.py": "from common import thing\nimport mmcn.a.b\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(provenance, "PACKAGE_DIR", (tmp_path / "mmcn").resolve())
    return tmp_path.resolve()


def names(paths, root):
    return [p.relative_to(root).as_posix() for p in paths]


def test_walk_follows_every_kind_of_import(package):
    assert names(code_files(package / "stages/s.py"), package) == [
        "mmcn/__init__.py", "mmcn/a/__init__.py", "mmcn/a/b.py", "mmcn/a/c.py", "mmcn/a/side.py", "mmcn/d/__init__.py",
        "mmcn/d/e.py", "mmcn/resources/dir", "mmcn/resources/t.tsv", "mmcn/runtime_only.py", "mmcn/top.py",
        "stages/common.py", "stages/s.py"]
    # a module name: its packages' __init__ files run too; `from pkg import sub` finds the submodule
    assert names(code_files("mmcn.a.c"), package) == ["mmcn/__init__.py", "mmcn/a/__init__.py", "mmcn/a/c.py",
                                                      "mmcn/a/side.py"]


def test_walk_errors_name_the_file_and_line(package):
    (package / "mmcn/top.py").write_text("import numpy\n\n\ndef f():\n    from mmcn.gone import x\n")
    with pytest.raises(ImportError, match=r"mmcn/top.py:5: imports mmcn.gone, which is not a module"):
        code_files("mmcn.top")
    with pytest.raises(ImportError, match="mmcn.nothing: no such module"):
        code_files("mmcn.nothing")
    (package / "mmcn/top.py").write_text('RESOURCES = ("resources/missing.tsv",)\n')
    with pytest.raises(ValueError, match=r"mmcn/top.py:1: RESOURCES entry 'resources/missing.tsv' is not a file"):
        code_files("mmcn.top")
    (package / "mmcn/top.py").write_text('RESOURCES = tuple(["resources/t.tsv"])\n')
    with pytest.raises(ValueError, match="RESOURCES must be a tuple of string literals"):
        code_files("mmcn.top")


def test_digests_see_content_names_and_folders(package):
    files = code_files("mmcn.runtime_only")
    before = digests(files)
    assert set(before) == {"mmcn/__init__.py", "mmcn/runtime_only.py", "mmcn/resources/t.tsv", "mmcn/resources/dir"}
    (package / "mmcn/resources/dir/y.txt").write_text("new file in a declared folder\n")
    after = digests(files)
    assert after["mmcn/resources/dir"] != before["mmcn/resources/dir"]
    assert {k: v for k, v in after.items() if k != "mmcn/resources/dir"} == \
           {k: v for k, v in before.items() if k != "mmcn/resources/dir"}


def test_checksum_of_a_file_and_of_a_view(tmp_path):
    (tmp_path / "f").write_bytes(b"abc" * 1000)
    (tmp_path / "empty").write_bytes(b"")
    assert checksum(tmp_path / "f") == {"xxh3_128": xxhash.xxh3_128_hexdigest(b"abc" * 1000), "bytes": 3000}
    assert checksum(tmp_path / "empty") == checksum(memoryview(b"")) == {"xxh3_128": xxhash.xxh3_128_hexdigest(b""),
                                                                        "bytes": 0}


def test_every_module_that_reads_package_data_declares_it():
    """A string naming a path under resources/ in a module means it reads package data there:
    its RESOURCES must cover it (that is how the walker, hence dvc.yaml and the fingerprints,
    know about it)."""
    undeclared = []
    for path in sorted((ROOT / "mmcn").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        declared = [f.relative_to(ROOT / "mmcn").as_posix() for f in provenance._declared_resources(path, tree)]
        for node in ast.walk(tree):
            text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else \
                node.values[0].value if isinstance(node, ast.JoinedStr) and node.values and isinstance(
                    node.values[0], ast.Constant) else ""
            if text.startswith("resources/") and not any(text == d or text.startswith(d + "/") for d in declared):
                undeclared.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text!r} not in its RESOURCES")
    assert not undeclared, "\n".join(undeclared)
    assert "mmcn/resources/detector" in names(code_files("mmcn.vision.vocab"), ROOT)
    assert "mmcn/resources/labels_zh.tsv" in names(code_files("mmcn.text.translate"), ROOT)


# --------------------------------------------------------------------------- fingerprints

@pytest.fixture
def edited_code(tmp_path, monkeypatch):
    """The walker's result plus a file standing for a code change (edit it to change the code)."""
    extra = tmp_path / "code.py"
    extra.write_text("version = 1\n")
    walk = provenance.code_files
    monkeypatch.setattr(provenance, "code_files", lambda target: [*walk(target), extra])
    return extra


def test_extract_fingerprint_sees_code_and_tsv_content_not_speed(tmp_path, edited_code):
    from mmcn.data import tsv
    from mmcn.vision.extract import ExtractConfig, fingerprint

    detector, tsv_dir = tmp_path / "detector", tmp_path / "tsv"
    detector.mkdir()
    tsv_dir.mkdir()
    (detector / "model.safetensors").write_bytes(b"weights")
    with tsv.TsvWriter(tsv.imgs_path(tsv_dir, "train")) as w:
        w.write(1, b"aGVsbG8=")
    cfg = ExtractConfig()
    mark = fingerprint(detector, tsv_dir, cfg)
    assert "mmcn/vision/extract.py" in mark["code"] and "mmcn/data/tsv.py" in mark["code"]
    assert json.loads(json.dumps(mark)) == mark  # what _fingerprint.json holds
    # speed settings are not in it
    assert fingerprint(detector, tsv_dir, replace(cfg, workers=4, cpus_per_worker=2.0, use_gpu=True)) == mark
    # a code change is
    edited_code.write_text("version = 2\n")
    assert fingerprint(detector, tsv_dir, cfg)["code"] != mark["code"]
    edited_code.write_text("version = 1\n")
    assert fingerprint(detector, tsv_dir, cfg) == mark
    # input content, not size: same size, other bytes
    path = tsv.imgs_path(tsv_dir, "train")
    path.write_bytes(path.read_bytes().replace(b"aGVsbG8=", b"aGVsbG9="))
    changed = fingerprint(detector, tsv_dir, cfg)
    assert changed["inputs"]["train_imgs.tsv"]["bytes"] == mark["inputs"]["train_imgs.tsv"]["bytes"]
    assert changed["inputs"] != mark["inputs"]


def test_train_run_name_sees_code_and_data_not_threads(tmp_path, edited_code):
    from mmcn.train.loop import ModelSpec, TrainConfig, _fingerprint

    store = SimpleNamespace(path=tmp_path / "lmdb/train", meta={"sources": {"train_imgs.tsv": {"xxh3_128": "1"}}})
    spec, cfg = ModelSpec("caption", size="tiny"), TrainConfig(epochs=1)
    name = _fingerprint(spec, cfg, store)
    assert _fingerprint(spec, replace(cfg, cpus_per_worker=8, max_failures=0), store) == name
    assert _fingerprint(spec, replace(cfg, lr=0.5), store) != name
    edited_code.write_text("version = 2\n")
    assert _fingerprint(spec, cfg, store) != name
    edited_code.write_text("version = 1\n")
    store.meta["sources"]["train_imgs.tsv"]["xxh3_128"] = "2"
    assert _fingerprint(spec, cfg, store) != name


def test_train_code_walk_covers_what_the_run_name_missed():
    from mmcn.models.factory import family_code

    loop = names(code_files("mmcn.train.loop"), ROOT)
    regions, pixels = (set(loop) | set(names(family_code(task), ROOT)) for task in ("caption", "clip"))
    for needed in ("mmcn/train/loop.py", "mmcn/data/tags.py", "mmcn/data/lmdb_store.py", "mmcn/models/factory.py",
                   "mmcn/eval/retrieval_metrics.py", "mmcn/data/datasets.py", "mmcn/models/regions/datasets.py",
                   "mmcn/models/regions/caption.py"):
        assert needed in regions
    for needed in ("mmcn/models/pixels/clip.py", "mmcn/models/pixels/datasets.py", "mmcn/data/image.py"):
        assert needed in pixels
    # the loop names no family: each task's run hashes its own family's code only
    assert not any(f.startswith("mmcn/models/") and f.count("/") > 2 for f in loop)
    assert not any(f.startswith("mmcn/models/pixels/") for f in regions)
    assert not any(f.startswith("mmcn/models/regions/") for f in pixels)
