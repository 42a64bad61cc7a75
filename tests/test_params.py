"""Every param of params.yaml is checked before a stage touches anything: a table of bad
values, at least one for every leaf of params.yaml (a test fails when a new param has no
row), each run through its stage's own ``read_params`` in a temporary project folder; the
error must be one line naming the param. Subprocess runs prove the whole path: exit code 2,
one line on stderr, no traceback (unless MMCN_DEBUG=1), outputs untouched. The ``mmcn`` CLI
ends user errors the same way."""
from __future__ import annotations

import copy
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmcn.settings import SettingsError, build, run_main

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages"
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
DELETE = object()  # a row's value: remove the key

# params.yaml section -> the stage script (and its foreach item) whose read_params checks it
CHECKED_BY = {
    "demo": ("demo",), "ingest": ("ingest",), "execution.ingest": ("ingest",), "detector": ("detector",),
    "features": ("features",), "execution.features": ("features",), "ray": ("features",),
    "translate": ("translate",), "lmdb": ("build_lmdb",), "execution.lmdb": ("build_lmdb",),
    "train": ("train", "caption"), "execution.train": ("train", "caption"),
    "caption.model": ("train", "caption"), "caption.train": ("train", "caption"),
    "retrieval.model": ("train", "retrieval"), "retrieval.train": ("train", "retrieval"),
    "pretrain.model": ("train", "pretrain"), "pretrain.train": ("train", "pretrain"),
    "caption.eval": ("evaluate", "caption"), "execution.caption.eval": ("evaluate", "caption"),
    "retrieval.eval": ("evaluate", "retrieval"), "execution.retrieval.eval": ("evaluate", "retrieval"),
    "report": ("report",),
    "clip.model": ("train", "clip"), "clip.train": ("train", "clip"),
    "clip.eval": ("evaluate", "clip"), "execution.clip.eval": ("evaluate", "clip"),
    "clipcap.model": ("train", "clipcap"), "clipcap.train": ("train", "clipcap"),
    "clipcap.eval": ("evaluate", "clipcap"), "execution.clipcap.eval": ("evaluate", "clipcap"),
}

# (param, bad value, text the one-line error must hold: default "params.yaml: <param>")
ROWS = [
    ("demo.seed", "zero"), ("demo.train", -1), ("demo.valid", "100"), ("demo.test", 1.5),
    ("demo.image_size", 16), ("demo.min_objects", 0), ("demo.max_objects", 0), ("demo.captions_per_image", 99),
    ("ingest.src", "no/such/folder"), ("ingest.src", DELETE, "params.yaml: ingest.src: missing"),
    ("ingest.max_side", -1), ("ingest.max_side", "big"), ("ingest.strict", "yes"), ("ingest.full_decode", 1),
    ("ingest.max_pixels", 0), ("ingest.max_pixels", "many"),
    ("ingest.unlisted", "skipp"), ("ingest", None, "params.yaml: ingest: expected a mapping"),
    ("ingest.srcs", "data/raw", "params.yaml: ingest.srcs: unknown setting; did you mean ingest.src?"),
    ("detector.weights", "no/such/weights.pth"), ("detector.arch", "smal", "did you mean small?"),
    ("detector.epochs", -1), ("detector.epochs", 0), ("detector.batch_size", 0), ("detector.lr", "fast"),
    ("detector.lr", float("nan")), ("detector.warmup_steps", -1), ("detector.seed", "0"), ("detector.max_images", -5),
    ("detector.epoch", 3, "params.yaml: detector.epoch: unknown setting; did you mean detector.epochs?"),
    ("features.source", "no/such/features"), ("features.min_boxes", 0),
    ("features.max_boxes", 5), ("features.min_boxes", "10"),
    ("features.score_thresh", 2), ("features.score_thresh", "0.2"),
    ("features.nms_thresh", 0), ("features.nms_thresh", None),
    ("features.batch_size", 0), ("features.batch_size", 8.0),
    ("features.max_memory_mb", -1), ("features.max_memory_mb", "6GB"),
    ("features.shard_size", "big"), ("features.use_gpu", "no"), ("features.workers", 2, "also set under"),
    ("translate.overrides", "no/such/overrides.tsv"), ("translate.unknown", "ignore"),
    ("translate.max_attributes", -1),
    ("lmdb.shards", 0), ("lmdb.strict", "yes"), ("lmdb.map_size_mb", 0), ("lmdb.commit_bytes_mb", "4MB"),
    ("train.workers", "two"), ("train.use_gpu", "yes"), ("train.epochs", 3, "also set as caption.train.epochs"),
    ("caption.model.size", "huge"), ("caption.model.init", "no/such/model"), ("caption.model.max_text_len", "forty"),
    ("caption.model.max_tag_len", 30.5), ("caption.model.max_regions", None), ("caption.model.add_od_labels", "yes"),
    ("caption.model.copy_tags", 1), ("caption.model.label_smoothing", 1.5), ("caption.model.drop_worst_ratio", 1),
    ("caption.model.drop_worst_after", -1), ("caption.model.loss_form", "bert"),
    ("caption.train.epochs", 0), ("caption.train.batch_size", "32"), ("caption.train.lr", "fast"),
    ("caption.train.weight_decay", -0.1), ("caption.train.warmup_ratio", 1.5), ("caption.train.schedule", "step"),
    ("caption.train.grad_accum", 0), ("caption.train.max_grad_norm", 0), ("caption.train.seed", 1.5),
    ("caption.train.checkpoint_every", 0), ("caption.train.freeze_embedding", "no"),
    ("caption.train.freeze_visual", 0), ("caption.train.mask_prob", 0), ("caption.train.max_masked", 0),
    ("caption.train.mask_type", "bert"),
    ("caption.eval.num_beams", 0), ("caption.eval.max_length", 0), ("caption.eval.length_penalty", "long"),
    ("caption.eval.no_repeat_ngram_size", -1), ("caption.eval.decoding", "beam"), ("caption.eval.tokenize", "word"),
    ("caption.eval.batch_size", 0), ("caption.eval.use_gpu", "false"),
    ("retrieval.model.size", 7), ("retrieval.model.init", "no/such/model"), ("retrieval.model.max_text_len", -1.0),
    ("retrieval.model.max_tag_len", "30"), ("retrieval.model.max_regions", "20"),
    ("retrieval.model.add_od_labels", 0), ("retrieval.model.embed_dim", 0), ("retrieval.model.match_weight", -1),
    ("retrieval.model.negatives", "hard"),
    ("retrieval.train.epochs", -4), ("retrieval.train.batch_size", 0), ("retrieval.train.lr", 0),
    ("retrieval.train.weight_decay", "none"), ("retrieval.train.warmup_ratio", -0.1),
    ("retrieval.train.schedule", "constant"), ("retrieval.train.grad_accum", 1.5),
    ("retrieval.train.max_grad_norm", -1), ("retrieval.train.seed", None), ("retrieval.train.checkpoint_every", -1),
    ("retrieval.train.freeze_embedding", "false"), ("retrieval.train.freeze_visual", None),
    ("retrieval.train.train_fraction", 0), ("caption.train.train_fraction", 1.5),
    ("pretrain.model.size", "giant"), ("pretrain.model.init", "no/such/model"), ("pretrain.model.max_text_len", 4),
    ("pretrain.model.max_regions", "20"), ("pretrain.model.texta_false_prob", 1.5),
    ("pretrain.model.textb_sample_mode", 2), ("pretrain.model.mask_loss_for_unmatched", "no"),
    ("pretrain.train.epochs", 0), ("pretrain.train.batch_size", "32"), ("pretrain.train.lr", -1),
    ("pretrain.train.weight_decay", "none"), ("pretrain.train.warmup_ratio", 1), ("pretrain.train.schedule", "step"),
    ("pretrain.train.grad_accum", 0), ("pretrain.train.max_grad_norm", 0), ("pretrain.train.seed", "0"),
    ("pretrain.train.checkpoint_every", 0), ("pretrain.train.mask_prob", 0),
    ("retrieval.eval.rerank_k", -1), ("retrieval.eval.batch_size", "64"), ("retrieval.eval.use_gpu", 1),
    ("report.max_images", -1), ("report.queries", "20"), ("report.top_k", 0), ("report.max_boxes", -1),
    ("report.thumb_side", -1),
    ("ray.address", 5), ("ray.num_cpus", 0), ("ray.storage_path", None),
    ("execution.ingest.workers", "two"), ("execution.ingest.workers", 0),
    ("execution.features.workers", 0), ("execution.features.workers", "1"),
    ("execution.lmdb.workers", -1), ("execution.train.cpus_per_worker", 0),
    ("execution.caption.eval.workers", 0), ("execution.retrieval.eval.workers", "one"),
    ("clipcap.model.clip", "no/such/clip"), ("clipcap.model.init", "no/such/gpt2"), ("clipcap.model.size", "huge"),
    ("clipcap.model.mapping", "lstm"), ("clipcap.model.prefix_len", 0), ("clipcap.model.constant_len", "10"),
    ("clipcap.model.num_layers", 0), ("clipcap.model.finetune_gpt2", "yes"), ("clipcap.model.max_text_len", 1),
    ("clipcap.train.epochs", 0), ("clipcap.train.batch_size", -1), ("clipcap.train.lr", 0),
    ("clipcap.train.weight_decay", -1), ("clipcap.train.warmup_ratio", 1), ("clipcap.train.schedule", "step"),
    ("clipcap.train.grad_accum", 0), ("clipcap.train.max_grad_norm", 0), ("clipcap.train.seed", "0"),
    ("clipcap.train.checkpoint_every", 0), ("clipcap.train.train_fraction", 0),
    ("clipcap.eval.decoding", "mmcn"), ("clipcap.eval.num_beams", 0), ("clipcap.eval.top_k", 0),
    ("clipcap.eval.top_p", 1.5), ("clipcap.eval.max_length", 0), ("clipcap.eval.length_penalty", "long"),
    ("clipcap.eval.seed", 1.5), ("clipcap.eval.tokenize", "word"), ("clipcap.eval.batch_size", 0),
    ("clipcap.eval.use_gpu", "no"), ("execution.clipcap.eval.workers", 0),
    ("clip.model.size", "large"), ("clip.model.init", "no/such/clip"), ("clip.model.image_size", 100),
    ("clip.model.embed_dim", 0), ("clip.model.max_text_len", 2), ("clip.model.gather_with_grad", "yes"),
    ("clip.train.epochs", 0), ("clip.train.batch_size", 0), ("clip.train.lr", -1e-3),
    ("clip.train.weight_decay", -0.1), ("clip.train.warmup_ratio", 1.0), ("clip.train.schedule", "constant"),
    ("clip.train.grad_accum", 0), ("clip.train.max_grad_norm", 0), ("clip.train.seed", 0.5),
    ("clip.train.checkpoint_every", 0), ("clip.train.freeze_vision", "true"), ("clip.train.train_fraction", 2),
    ("clip.eval.batch_size", 0), ("clip.eval.use_gpu", "yes"), ("execution.clip.eval.workers", 0),
]


def leaves(params: dict, prefix: str = "") -> set[str]:
    found = set()
    for key, value in params.items():
        found |= leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return found


def row_values(row) -> tuple:
    return row.values[0] if hasattr(row, "values") else row  # a pytest.param holds the row tuple


def row_param(row) -> str:
    return row_values(row)[0]


def test_every_param_of_params_yaml_has_a_bad_value_in_the_table():
    covered = {row_param(row) for row in ROWS}
    missing = sorted(leaves(PARAMS) - covered)
    assert not missing, f"params without a row in tests/test_params.py ROWS: {', '.join(missing)}"


FOLDER_PARAMS = ("ingest.src", "detector.weights", "features.source", "caption.model.init", "retrieval.model.init",
                 "pretrain.model.init", "clipcap.model.init", "clipcap.model.clip", "clip.model.init")
FILE_PARAMS = ("translate.overrides",)


def value_of(param: str):
    value = PARAMS
    for part in param.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with params.yaml and the paths it names (none of the outputs)."""
    for param in FOLDER_PARAMS:
        if value_of(param):
            (tmp_path / value_of(param)).mkdir(parents=True, exist_ok=True)
    for param in FILE_PARAMS:
        if value_of(param):
            (tmp_path / value_of(param)).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / value_of(param)).write_text("", encoding="utf-8")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


_modules: dict = {}


def stage(name: str):
    """The stage script as a module (its ``main`` not run)."""
    if name not in _modules:
        if str(STAGES) not in sys.path:
            sys.path.insert(0, str(STAGES))
        spec = importlib.util.spec_from_file_location(f"_stage_{name}", STAGES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[name] = module
    return _modules[name]


def checker(param: str) -> tuple[str, ...]:
    parts = param.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in CHECKED_BY:
            return CHECKED_BY[".".join(parts[:n])]
    raise AssertionError(f"{param}: no stage in CHECKED_BY checks it")


def with_value(params: dict, param: str, value) -> dict:
    params = copy.deepcopy(params)
    *path, key = param.split(".")
    section = params
    for part in path:
        section = section[part]
    if value is DELETE:
        del section[key]
    else:
        section[key] = value
    return params


def test_the_params_as_shipped_pass_every_stage(project):
    for script, *item in set(CHECKED_BY.values()):
        stage(script).read_params(*item)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r[0]}={r[1]!r}")
def test_a_bad_value_is_refused_naming_the_param(project, row):
    param, value, *expected = row
    (project / "params.yaml").write_text(yaml.safe_dump(with_value(PARAMS, param, value)), encoding="utf-8")
    script, *item = checker(param)
    with pytest.raises(SettingsError) as caught:
        stage(script).read_params(*item)
    message = str(caught.value)
    assert "\n" not in message
    assert (expected[0] if expected else f"params.yaml: {param}") in message, message


def test_the_issue_cases_say_what_to_do(project):
    """The silent or opaque cases of the issue: the message names the param and a remedy."""
    cases = {("detector.batch_size", 0): "must be >= 1", ("train.workers", "two"): "set an integer (default 1)",
             ("features.score_thresh", 2): "between 0 and 1", ("detector.epochs", -1): "must be >= 1",
             ("caption.train.lr", "fast"): "set a number"}
    for (param, value), remedy in cases.items():
        (project / "params.yaml").write_text(yaml.safe_dump(with_value(PARAMS, param, value)), encoding="utf-8")
        script, *item = checker(param)
        with pytest.raises(SettingsError, match=re.escape(remedy)):
            stage(script).read_params(*item)


def test_build_types_follow_the_annotations():
    from mmcn.vision.train import DetectorTrainConfig

    assert build(DetectorTrainConfig, ("detector", {"lr": 1, "epochs": 2})).lr == 1  # a float field takes an int
    with pytest.raises(SettingsError, match=r"detector.epochs: True is not an integer"):
        build(DetectorTrainConfig, ("detector", {"epochs": True}))
    with pytest.raises(SettingsError, match=r"params.yaml: a.epochs: also set as b.epochs; keep one"):
        build(DetectorTrainConfig, ("b", {"epochs": 1}), ("a", {"epochs": 2}))


def test_run_main_turns_user_errors_into_exit_2_and_lets_bugs_through(capsys, monkeypatch):
    monkeypatch.delenv("MMCN_DEBUG", raising=False)

    def bad_file():
        raise FileNotFoundError("x.tsv: no such file;\nrun ingest first")

    assert run_main(bad_file) == 2
    assert capsys.readouterr().err == "error: x.tsv: no such file; run ingest first\n"
    assert run_main(bad_file, debug=True) == 2
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(KeyError):
        run_main(lambda: {}["bug"])


def run_stage(project: Path, script: str, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MMCN_DEBUG"} | ({"MMCN_DEBUG": "1"} if debug else {})
    return subprocess.run([sys.executable, str(STAGES / script), *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_stage_run_ends_with_one_line_and_exit_2_before_touching_outputs(project):
    (project / "params.yaml").write_text(yaml.safe_dump(with_value(PARAMS, "detector.batch_size", 0)),
                                         encoding="utf-8")
    done = run_stage(project, "detector.py")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[0].startswith("error: params.yaml: detector.batch_size: must be >= 1"), \
        done.stderr
    assert not any((project / out).exists() for out in ("metrics", "models/detector", "plots"))
    debug = run_stage(project, "detector.py", debug=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and debug.stderr.strip().splitlines()[-1] == lines[0]


def test_a_null_section_ends_with_one_line_and_exit_2(project):
    params = dict(PARAMS, ingest=None)
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    done = run_stage(project, "ingest.py")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: params.yaml: ingest: expected a mapping"), done.stderr
    assert not (project / "data/tsv").exists()


def test_the_cli_ends_a_user_error_with_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from mmcn.cli import main

    monkeypatch.delenv("MMCN_DEBUG", raising=False)
    assert main(["demo", "--out", str(tmp_path / "raw"), "--min-objects", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: min_objects: must be in 1..") and err.count("\n") == 1, err
    assert not (tmp_path / "raw").exists()
    assert main(["--debug", "demo", "--out", str(tmp_path / "raw"), "--min-objects", "0"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_the_cli_names_the_param_of_a_params_file(tmp_path, capsys):
    from mmcn.cli import main

    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(with_value(PARAMS, "features.max_boxes", "many")), encoding="utf-8")
    image = tmp_path / "a.jpg"
    image.write_bytes(b"")
    assert main(["caption", str(image), "--params", str(params), "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert f"error: {params}: features.max_boxes: 'many' is not an integer" in err and "Traceback" not in err, err
