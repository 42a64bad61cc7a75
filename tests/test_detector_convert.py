"""Inspecting and converting published detector checkpoints: what a file says about itself,
label maps checked against it, `mmcn inspect-detector` / `mmcn convert-detector`, the detector
stage's early errors, and the weights file as a DVC dependency.

Checkpoints are random weights in each source's exact naming and shapes (tests/test_checkpoint.py),
small in depth and vocabulary, with classifier biases set by the test: the background row gets
the outlier bias a trained detector has (most proposals it sees are background).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint import (_butd_small, detectron2_shapes,  # noqa: E402
                             maskrcnn_shapes, meta_state, real_state)

from mmcn.cli import main as cli  # noqa: E402
from mmcn.settings import SettingsError  # noqa: E402
from mmcn.vision.checkpoint import CheckpointError  # noqa: E402
from mmcn.vision.convert import (convert_detector, inspect_state_dict, read_label_files,  # noqa: E402
                                 resolve_labels)
from mmcn.vision.detector import load_detector  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K, A = 12, 40  # object classes and attributes of the small checkpoints


def biased(n: int, outlier: int, value: float = 6.0, seed: int = 0) -> torch.Tensor:
    """Biases around 0 (sd 0.1) with row ``outlier`` at ``value``: a trained classifier's background."""
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.1
    b[outlier] = value
    return b


@functools.lru_cache(maxsize=1)
def _butd_weights() -> dict:
    return real_state(detectron2_shapes((1, 1, 1, 1), classes=K, attributes=A))


def butd_state(background: int = -1, real: bool = True) -> dict:
    """detectron2 names (BUTD): cls_score K+1 rows and attr_score A+1 rows, background / none LAST.
    ``real=False``: only the biases hold values (enough to inspect; the rest on the meta device)."""
    state = dict(_butd_weights()) if real else meta_state(detectron2_shapes((1, 1, 1, 1), classes=K, attributes=A))
    state["roi_heads.box_predictor.cls_score.bias"] = biased(K + 1, background)
    state["roi_heads.box_predictor.attr_score.bias"] = biased(A + 1, background, 4.0, seed=1)
    return state


def vinvl_state() -> dict:
    """maskrcnn_benchmark names (VinVL): background / none FIRST, box regression (K+1)*4 rows; biases only."""
    state = meta_state(maskrcnn_shapes((1, 1, 1, 1), classes=K + 1, attributes=A + 1))
    state["module.roi_heads.box.predictor.cls_score.bias"] = biased(K + 1, 0)
    state["module.attribute.predictor.attr_score.bias"] = biased(A + 1, 0, 4.0, seed=1)
    return state


def write_pkl(path: Path, state: dict) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}}, f, protocol=2)
    return path


def write_vocab(path: Path, names) -> Path:
    path.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return path


def vinvl_dicts(path: Path, classes, attributes, objects: dict | None = None) -> Path:
    """VG-SGG-dicts-vgoi6-clipped.json's layout: name -> index and index -> name, from 1 (0: background).
    ``objects``: the object part as given (a broken one)."""
    data = objects or {"label_to_idx": {c: i + 1 for i, c in enumerate(classes)},
                       "idx_to_label": {str(i + 1): c for i, c in enumerate(classes)}}
    data.update({"attribute_to_idx": {a: i + 1 for i, a in enumerate(attributes)},
                 "idx_to_attribute": {str(i + 1): a for i, a in enumerate(attributes)}})
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- inspection


def test_inspection_of_full_size_butd_and_vinvl_shapes():
    butd = inspect_state_dict(meta_state(detectron2_shapes()), origin="faster_rcnn_from_caffe_attr.pkl")
    assert (butd.source, butd.backbone, butd.blocks, butd.num_classes, butd.num_attributes) == (
        "detectron2", "ResNet-101", (3, 4, 23, 3), 1600, 400)
    assert butd.head.startswith("C4") and not butd.class_agnostic and butd.anchors_per_location == 12
    assert butd.presets == ["butd_r101_c4"] and butd.label_presets == ["butd_r101_c4"]
    assert butd.background.position == "unclear"  # shapes only: no bias values to judge
    vinvl = inspect_state_dict(meta_state(maskrcnn_shapes()), origin="vinvl_vg_x152c4.pth")
    assert (vinvl.source, vinvl.backbone, vinvl.num_classes, vinvl.num_attributes) == (
        "maskrcnn_benchmark", "ResNeXt-152 32x8d", 1594, 524)
    assert vinvl.presets == ["vinvl_x152_c4"] and vinvl.label_presets == ["vinvl_x152_c4"]
    text = vinvl.summary()
    assert "1594 + background (cls_score 1595 rows)" in text and "background row first" in text
    assert "6380 rows = 1595 x 4, background included" in text and "detector.arch: vinvl_x152_c4" in text
    # a VinVL file with another vocabulary: the architecture still matches, the packaged label map does not
    other = inspect_state_dict(meta_state(maskrcnn_shapes(classes=1601, attributes=401)))
    assert other.presets == ["vinvl_x152_c4"] and other.label_presets == []


def test_background_row_judged_from_the_biases():
    butd = inspect_state_dict(butd_state(real=False), origin="butd.pkl", match_presets=False)
    assert butd.num_classes == K and butd.num_attributes == A and butd.assumed_background == "last"
    # rule: the outlier row is at least 6 robust spreads above the median of the rows between
    assert (butd.background.position, butd.background.confidence) == ("last", "high")
    assert (butd.no_attribute.position, butd.no_attribute.confidence) == ("last", "high")
    assert "last too (high confidence)" in butd.summary() and "bias[12] = 6.000" in butd.summary()
    assert not butd.notes
    vinvl = inspect_state_dict(vinvl_state(), origin="vinvl.pth", match_presets=False)
    assert vinvl.source == "maskrcnn_benchmark" and vinvl.num_classes == K and vinvl.num_attributes == A
    assert (vinvl.background.position, vinvl.assumed_background) == ("first", "first")
    assert vinvl.box_regression.startswith(f"per class ({(K + 1) * 4} rows")
    # "no attribute" never a target (pushed far below the rest): still the outlier, first
    low = vinvl_state()
    low["module.attribute.predictor.attr_score.bias"] = biased(A + 1, 0, -8.0, seed=1)
    none_row = inspect_state_dict(low, match_presets=False).no_attribute
    assert (none_row.position, none_row.confidence) == ("first", "high") and "spreads below" in none_row.evidence
    # a detectron2 file whose biases say background is first: reported against the convention
    flipped = inspect_state_dict(butd_state(background=0, real=False), origin="reexported.pkl",
                                 match_presets=False)
    assert flipped.background.position == "first" and flipped.background.agrees("last") is False
    assert "AGAINST the convention" in flipped.summary() and any("background row looks first" in n
                                                                   for n in flipped.notes)
    # no outlier (untrained / zero biases): unclear, said so
    flat = butd_state(real=False)
    flat["roi_heads.box_predictor.cls_score.bias"] = torch.zeros(K + 1)
    assert inspect_state_dict(flat, match_presets=False).background.position == "unclear"
    # class-agnostic regression: detectron2 4 rows
    agnostic = butd_state(real=False)
    agnostic["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(4, 2048)
    agnostic["roi_heads.box_predictor.bbox_pred.bias"] = torch.zeros(4)
    assert inspect_state_dict(agnostic, match_presets=False).class_agnostic


# --------------------------------------------------------------------------- label maps


def test_label_maps_checked_against_the_checkpoint(tmp_path):
    config = _butd_small()
    info = inspect_state_dict(butd_state(real=False), origin="butd.pkl", match_presets=False)
    names = [f"object {i}" for i in range(K)]
    attrs = [f"attribute {i}" for i in range(A)]
    objects = write_vocab(tmp_path / "objects_vocab.txt", names)
    attributes = write_vocab(tmp_path / "attributes_vocab.txt", attrs)
    classes, attributes_found, assumed = resolve_labels(info, config, read_label_files([attributes, objects]))
    assert (classes, attributes_found) == (tuple(names), tuple(attrs))
    assert any(str(objects) in a for a in assumed)

    (tmp_path / "short").mkdir()
    short = write_vocab(tmp_path / "short" / "objects_vocab.txt", names[:-1])
    path = write_pkl(tmp_path / "butd.pkl", butd_state())  # the conversion refuses it, naming the file
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(short))}: {K - 1} object names, but .*butd.pkl "
                                              rf"has {K} \(cls_score has {K + 1} rows"):
        convert_detector(path, config, [short, attributes])
    # no label map given: the preset's packaged names (3 here) do not fit 12 classes: refused, named
    with pytest.raises(CheckpointError, match=r"detector.arch butd_r101_c4's object names\): 3 object names"):
        resolve_labels(info, config, read_label_files([]))

    # VinVL's dicts: index order 1..N, background 0 reserved
    good = vinvl_dicts(tmp_path / "good.json", names[::-1], attrs)
    assert read_label_files([good]).classes == tuple(names[::-1])
    written_out = vinvl_dicts(tmp_path / "zero_named.json", names, attrs,
                              {"label_to_idx": {"__background__": 0, **{n: i + 1 for i, n in enumerate(names)}}})
    assert read_label_files([written_out]).classes == tuple(names)  # the reserved row 0 spelled out: dropped
    in_order = {n: i + 1 for i, n in enumerate(names)}
    cases = {
        "gap.json": ({"label_to_idx": {n: i + 2 for i, n in enumerate(names)}}, r"indices are not 1\.\.12"),
        "zero.json": ({"label_to_idx": {n: i for i, n in enumerate(names)}}, r"index 0 is 'object 0'"),
        "twice.json": ({"label_to_idx": {**in_order, "extra": 3}}, r"gives index 3 to both 'object 2' and 'extra'"),
        "disagree.json": ({"label_to_idx": in_order, "idx_to_label": {str(i + 1): n for i, n in enumerate(names[::-1])}},
                          r"the two directions disagree at index 1"),
    }
    for name, (objects, message) in cases.items():
        broken = vinvl_dicts(tmp_path / name, names, attrs, objects)
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(broken))}: label_to_idx.*{message}"):
            read_label_files([broken])


def test_a_checkpoint_given_to_the_wrong_preset_names_the_right_one(tmp_path):
    path = tmp_path / "vinvl_vg_x152c4.pth"
    torch.save(meta_state(maskrcnn_shapes()), path)  # read back on the meta device: shapes only, no bytes
    with pytest.raises(CheckpointError, match=r"a ResNeXt-152 32x8d maskrcnn_benchmark checkpoint, which fits "
                                              r"detector.arch vinvl_x152_c4, not butd_r101_c4; set detector.arch"):
        convert_detector(path, "butd_r101_c4")


def test_classification_checkpoint_is_named_as_such(tmp_path):
    state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
             "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "layer4.2.conv3.weight": torch.zeros(2048, 512, 1, 1),
             "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "resnet101.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as caught:
        convert_detector(path, "butd_r101_c4")
    message = str(caught.value)
    assert "image classification checkpoint" in message and "1000 classes" in message
    assert "grid-feature fallback" in message and "source=" not in message


# --------------------------------------------------------------------------- CLI


def test_convert_detector_cli_round_trip_and_inspect(tmp_path, capsys):
    path = write_pkl(tmp_path / "faster_rcnn_from_caffe_attr.pkl", butd_state())
    names, attrs = [f"o{i}" for i in range(K)], [f"a{i}" for i in range(A)]
    objects = write_vocab(tmp_path / "objects_vocab.txt", names)
    attributes = write_vocab(tmp_path / "attributes_vocab.txt", attrs)
    arch = tmp_path / "arch.json"  # an architecture no preset has (R-C4 with one block per stage)
    arch.write_text(json.dumps(_butd_small().to_dict()), encoding="utf-8")
    out = tmp_path / "detector"

    assert cli(["inspect-detector", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "format: detectron2" in printed and f"object classes: {K} + background" in printed
    assert "biases say: last too (high confidence)" in printed and "detector.arch: no preset matches" in printed
    assert cli(["inspect-detector", str(path), "--labels", str(objects), str(attributes)]) == 0
    assert f"label map fits ({K} object, {A} attribute names)" in capsys.readouterr().out
    five = write_vocab(tmp_path / "five_objects_vocab.txt", names[:5])
    assert cli(["inspect-detector", str(path), "--labels", str(five)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {five}: 5 object names, but {path} has {K}")
    assert cli(["inspect-detector", str(path), "--arch", "butd_r101_c4"]) == 2
    assert "does not fit detector.arch butd_r101_c4 (fits: none)" in capsys.readouterr().err

    assert cli(["convert-detector", str(path), "--arch", str(arch), "--out", str(out),
                "--labels", str(objects), str(attributes)]) == 0
    report = json.loads(capsys.readouterr().out)
    facts = report["checkpoint"]
    assert facts["format"] == "detectron2" and (facts["classes"], facts["attributes"]) == (K, A)
    assert facts["background_row"] == {"assumed": "last", "biases": "last", "confidence": "high"}
    assert any("background row last" in a for a in report["assumed"])
    model = load_detector(out)
    assert model.config.classes == tuple(names) and model.config.stage_blocks == (1, 1, 1, 1)
    assert model.roi_heads.box_predictor.cls_score.bias[0].item() == pytest.approx(6.0)
    image = torch.randint(0, 255, (3, 60, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert model.detect([image])[0].features.shape[1] == 2048

    # an existing folder is not overwritten without --force; a label map that does not fit: exit 2, named
    assert cli(["convert-detector", str(path), "--arch", str(arch), "--out", str(out),
                "--labels", str(objects), str(attributes)]) == 2
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_code:  # a checkpoint where a detector folder belongs: the command to run
        cli(["caption", str(tmp_path / "photo.jpg"), "--detector", str(path)])
    assert exit_code.value.code == 2 and f"mmcn convert-detector {path} --arch" in capsys.readouterr().err
    wrong = write_vocab(tmp_path / "wrong_objects_vocab.txt", names + ["extra"])
    assert cli(["convert-detector", str(path), "--arch", str(arch), "--out", str(out), "--force",
                "--labels", str(wrong), str(attributes)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {wrong}: {K + 1} object names") and err.count("\n") == 1


# --------------------------------------------------------------------------- the detector stage


def _stage():
    stages = ROOT / "stages"
    if str(stages) not in sys.path:
        sys.path.insert(0, str(stages))
    spec = importlib.util.spec_from_file_location("_stage_detector_convert", stages / "detector.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def project(tmp_path, monkeypatch):
    """params.yaml as shipped; data/tsv with a train manifest whose images have no boxes."""
    from mmcn.data.manifest import ManifestEntry, manifest_path, write_manifest

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text(encoding="utf-8"))
    for folder in (params["detector"]["weights"], params["features"]["source"], "data/tsv"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    write_manifest(manifest_path(tmp_path / "data/tsv", "train"),
                   [ManifestEntry(i, f"{i}.jpg", "0" * 64, 64, 48, "JPEG", "RGB") for i in range(3)])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stage_without_boxes_or_weights_stops_first_with_the_options(project):
    from mmcn.settings import run_main

    stage = _stage()
    with pytest.raises(SettingsError) as caught:
        stage.main()
    message = str(caught.value)
    assert message.startswith("data/tsv/train_manifest.jsonl: no ground-truth boxes")
    for option in ("README, 'Region features from published detectors'", "detector.arch: butd_r101_c4",
                   "vinvl_vg_x152c4.pth", "grid-feature fallback", "features.source"):
        assert option in message
    assert not (project / "metrics").exists() and not (project / "models").exists()  # nothing done before it
    assert run_main(stage.main) == 2  # the stage's error path: one line, exit 2
    from mmcn.data.manifest import ManifestEntry, manifest_path, write_manifest
    from mmcn.data.raw import RawObject

    write_manifest(manifest_path(project / "data/tsv", "train"), [ManifestEntry(
        0, "0.jpg", "0" * 64, 64, 48, "JPEG", "RGB", [RawObject((1.0, 1.0, 9.0, 9.0), "cat", ())])])
    stage.require_boxes(project / "data/detector_weights")  # one box is enough to train on


def test_stage_refuses_a_classification_checkpoint_as_detector_weights(project):
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(8, 8, 1, 1),
                "fc.weight": torch.zeros(1000, 8)}, project / "data/detector_weights/resnet101.pth")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["detector"]["arch"] = "butd_r101_c4"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(CheckpointError, match=r"resnet101\.pth: an image classification checkpoint.*grid-feature"):
        _stage().main()


def test_stage_converts_with_the_label_map_beside_the_checkpoint(project, monkeypatch):
    weights = project / "data/detector_weights"
    write_pkl(weights / "faster_rcnn_from_caffe_attr.pkl", butd_state())
    names, attrs = [f"o{i}" for i in range(K)], [f"a{i}" for i in range(A)]
    write_vocab(weights / "objects_vocab.txt", names)
    write_vocab(weights / "attributes_vocab.txt", attrs)
    stage = _stage()
    small = _butd_small()  # the preset at test size (one block per stage)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["detector"]["arch"] = "butd_r101_c4"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr("mmcn.vision.convert.detector_config", lambda name, **kw: small.replace(**kw))
    stage.main()
    metrics = json.loads((project / "metrics/detector.json").read_text())
    assert metrics["source"] == "converted" and metrics["checkpoint"]["background_row"]["biases"] == "last"
    assert load_detector(project / "models/detector").config.classes == tuple(names)


# --------------------------------------------------------------------------- DVC


def test_replacing_the_weights_reruns_the_detector_stage(tmp_path):
    """The real dvc.yaml's detector stage (its deps as they are; its command replaced by a stub
    that writes the outs) in a real git + DVC repo: new weights in the default folder, the same
    file rewritten with the same size, and a file outside the repo named by detector.weights."""
    repo = tmp_path / "repo"
    repo.mkdir()
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["detector"]
    stage["cmd"] = ("python -c \"import pathlib; [pathlib.Path(p).parent.mkdir(parents=True, exist_ok=True) or "
                    "pathlib.Path(p).write_text('x') for p in ['models/detector/x', 'metrics/detector.json', "
                    "'plots/detector_loss.csv']]\"")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"detector": stage}}, sort_keys=False))
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    for dep in stage["deps"]:
        if not dep.startswith("${") and (ROOT / dep).exists():
            target = repo / dep
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (ROOT / dep).is_dir() else shutil.copy)(ROOT / dep, target)
    (repo / "data/tsv").mkdir(parents=True, exist_ok=True)
    (repo / "data/tsv/train_imgs.tsv").write_text("1\tx\n")
    shutil.copytree(ROOT / "data/detector_weights", repo / "data/detector_weights")
    (repo / "data/released_features").mkdir()
    (repo / "data/released_features/README.md").write_text("none\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}

    def dvc(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    def replace(path: Path, data: bytes) -> None:
        """New content at the same path, same size, one second newer (as a copy over it makes)."""
        mtime = path.stat().st_mtime_ns
        path.write_bytes(data)
        os.utime(path, ns=(mtime + 10**9, mtime + 10**9))

    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc("init", "-q")
    checkpoint = repo / "data/detector_weights/vinvl_vg_x152c4.pth"  # in the default folder
    checkpoint.write_bytes(b"A" * 64)
    assert "Running stage 'detector'" in dvc("repro")
    replace(checkpoint, b"B" * 64)
    assert re.search(r"detector:\s+changed deps:\s+modified:\s+data/detector_weights\n", dvc("status"))
    outside = tmp_path / "downloads" / "faster_rcnn_from_caffe_attr.pkl"  # a file outside the repo
    outside.parent.mkdir()
    outside.write_bytes(b"C" * 64)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["detector"]["weights"] = str(outside)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "Running stage 'detector'" in dvc("repro")
    replace(outside, b"D" * 64)
    assert re.search(rf"detector:\s+changed deps:\s+modified:\s+{re.escape(str(outside))}\n", dvc("status"))
