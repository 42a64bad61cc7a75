"""The DVC contract: a real git + DVC repo in a temp dir, `dvc repro` on tiny demo params.

The pipeline reproduces end to end; a second `dvc repro` runs nothing; `mmcn caption`
captions a raw test image as the evaluation did; the experiment workflow of the README
(`dvc exp run -S`, `dvc exp show`, `dvc metrics/params/plots diff` between commits,
`dvc repro -s`); changing one stage's param reruns exactly that stage and its descendants
(upstream changes are checked with `dvc repro lmdb`, so that the model stages do not train
again for each of them). The tests share one repo and run in file order.
"""
from __future__ import annotations

import csv
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
TINY_MODEL = {"size": "tiny", "max_text_len": 24, "max_tag_len": 12, "max_regions": 4}
TINY_TRAIN = {"epochs": 1, "batch_size": 8, "checkpoint_every": 1000}
TINY_EVAL = {"caption": {"num_beams": 1, "max_length": 6, "batch_size": 8},
             "retrieval": {"rerank_k": 2, "batch_size": 8}}
TINY = {"demo": {"train": 12, "valid": 4, "test": 4},
        "detector": {"epochs": 1, "batch_size": 4, "warmup_steps": 1, "max_images": 8},
        "features": {"min_boxes": 2, "max_boxes": 4, "shard_size": 8},
        "train": {"workers": 0},  # in-process: Ray Train workers are tested in test_train
        "pretrain": {"model": {"size": "tiny", "max_text_len": 24, "max_regions": 4}, "train": TINY_TRAIN},
        # the fine-tunes start from the pretrain stage's model here (the demo's default is from scratch: README)
        "caption": {"model": {**TINY_MODEL, "init": "models/pretrain"}, "train": TINY_TRAIN, "eval": TINY_EVAL["caption"]},
        "retrieval": {"model": {**TINY_MODEL, "match_weight": 1.0, "init": "models/pretrain"}, "train": TINY_TRAIN,
                      "eval": TINY_EVAL["retrieval"]},
        "clip": {"model": {"size": "tiny", "image_size": 32, "embed_dim": 32, "max_text_len": 24},
                 "train": TINY_TRAIN, "eval": {"batch_size": 8}},
        "clipcap": {"model": {"size": "tiny", "prefix_len": 2, "max_text_len": 24}, "train": TINY_TRAIN,
                    "eval": {"num_beams": 1, "max_length": 6, "batch_size": 8}},
        "execution": {"ingest": {"workers": 1}, "train": {"cpus_per_worker": 1}}}
FINE_TUNE_STAGES = {"train@caption", "train@retrieval", "evaluate@caption", "evaluate@retrieval", "report"}
CLIP_STAGES = {"train@clip", "evaluate@clip", "report"}  # Chinese-CLIP on pixels: no pretrain, no detector features
MODEL_STAGES = {"train@pretrain"} | FINE_TUNE_STAGES
CAPTION_STAGES = {"train@caption", "evaluate@caption", "report"}
DATA_STAGES = {"demo", "ingest", "detector", "features", "translate", "lmdb"}
CLIPCAP_STAGES = {"train@clipcap", "evaluate@clipcap", "report"}  # ClipCap on train@clip's model (models/clip)
ALL_STAGES = DATA_STAGES | MODEL_STAGES | CLIP_STAGES | CLIPCAP_STAGES


DVC = (sys.executable, "-m", "dvc")


def run(repo: Path, *cmd: str, stdout_only: bool = False) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def set_params(repo: Path, changes: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section, values in changes.items():
        for key, value in values.items():
            if isinstance(value, dict):
                params[section][key].update(value)
            else:
                params[section][key] = value
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")


def restore(repo: Path) -> None:
    """Back to the committed run: params and lock from git, cached outputs by `dvc checkout`, and
    the uncached ones (metrics/, plots/: `cache: false`, which DVC cannot restore) from git too;
    left changed, they would make their stages rerun in the next test."""
    run(repo, "git", "checkout", "--", "params.yaml", "dvc.lock", "metrics", "plots")
    run(repo, *DVC, "checkout", "-q")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("pipeline")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    (repo / "data").mkdir()
    shutil.copy(ROOT / "data/labels_zh_overrides.tsv", repo / "data/labels_zh_overrides.tsv")
    shutil.copytree(ROOT / "data/detector_weights", repo / "data/detector_weights")  # detector.weights: none there
    shutil.copytree(ROOT / "data/init", repo / "data/init")  # {task}.model.init: none there
    shutil.copytree(ROOT / "data/released_features", repo / "data/released_features")  # features.source: none there
    for tree in ("stages", "mmcn"):
        shutil.copytree(ROOT / tree, repo / tree, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    set_params(repo, TINY)
    run(repo, "git", "init", "-q")
    run(repo, sys.executable, "-m", "dvc", "init", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "pipeline")
    return repo


@pytest.mark.slow
def test_repro_end_to_end_then_nothing(repo):
    assert ran(run(repo, *DVC, "repro")) == ALL_STAGES
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
    for task in ("caption", "retrieval"):
        assert (repo / f"models/{task}/model.safetensors").is_file()
        assert json.loads((repo / f"metrics/train_{task}.json").read_text())["steps"] > 0
    assert (repo / "plots/train_caption.csv").read_text().startswith("step,epoch,loss,lr")
    assert list(repo.glob(".ray_results/caption-*/tokenizer")) and not list(repo.glob("models/*/state.pt"))
    caption = json.loads((repo / "metrics/caption.json").read_text(encoding="utf-8"))
    assert {"Bleu_4", "CIDEr", "baseline_most_frequent_caption"} <= set(caption) and caption["n_images"] == 4
    clipcap = json.loads((repo / "metrics/clipcap.json").read_text(encoding="utf-8"))  # the same keys: metrics show
    scores = lambda m: {k for k in m if k.startswith(("Bleu", "ROUGE", "CIDEr", "METEOR"))}  # noqa: E731
    assert scores(clipcap) == scores(caption) and clipcap["n_images"] == 4
    assert 'id="families"' in (repo / "reports/index.html").read_text(encoding="utf-8")
    retrieval = json.loads((repo / "metrics/retrieval.json").read_text(encoding="utf-8"))
    assert {"t2i", "i2t", "mean_recall", "baseline_chance"} <= set(retrieval)
    assert (repo / "reports/caption/predictions.jsonl").is_file()
    assert (repo / "reports/retrieval/t2i_predictions.jsonl").is_file()
    assert (repo / "reports/index.html").read_text(encoding="utf-8").count('class="card"') == 4
    shown = run(repo, *DVC, "metrics", "show")
    for name in ("detector.json", "translate.json", "train_caption.json", "caption.json", "retrieval.json",
                 "clipcap.json"):
        assert name in shown

    assert ran(run(repo, *DVC, "repro")) == set()
    assert "up to date" in run(repo, *DVC, "status")
    # execution settings (worker counts, threads) are no DVC params: changing them reruns nothing
    params = (repo / "params.yaml").read_text(encoding="utf-8")
    set_params(repo, {"execution": {"ingest": {"workers": 2}, "features": {"workers": 2}, "lmdb": {"workers": 2},
                                    "train": {"cpus_per_worker": 2}, "caption": {"eval": {"workers": 2}}}})
    assert "up to date" in run(repo, *DVC, "status")
    (repo / "params.yaml").write_text(params, encoding="utf-8")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline run")


@pytest.mark.slow
def test_mmcn_caption_on_a_raw_test_image_after_repro(repo):
    manifest = [json.loads(line) for line in (repo / "data/tsv/test_manifest.jsonl").read_text().splitlines()]
    predicted = {p["image_id"]: p["caption"] for p in map(json.loads, (repo / "reports/caption/predictions.jsonl")
                                                          .read_text(encoding="utf-8").splitlines())}
    image = f"data/raw/{manifest[0]['source']}"
    mmcn = str(Path(sys.executable).parent / "mmcn")
    path, caption, score = run(repo, mmcn, "caption", image, stdout_only=True).rstrip("\n").split("\t")
    assert (path, caption) == (image, predicted[manifest[0]["image_id"]]) and float(score) < 0
    # ClipCap on the raw file (its CLIP, no detector) says what evaluate@clipcap said of the stored bytes
    clipcap = {p["image_id"]: p["caption"] for p in map(json.loads, (repo / "reports/clipcap/predictions.jsonl")
                                                        .read_text(encoding="utf-8").splitlines())}
    path, caption, _ = run(repo, mmcn, "caption", "--model", "models/clipcap", image,
                           stdout_only=True).rstrip("\n").split("\t")
    assert (path, caption) == (image, clipcap[manifest[0]["image_id"]])
    hits = run(repo, mmcn, "search", "一个红色的圆形", "--lmdb", "data/lmdb/test", "--top-k", "2", stdout_only=True)
    assert [line.split("\t")[0] for line in hits.splitlines()] == ["1", "2"]


@pytest.mark.slow
def test_experiment_workflow(repo):
    # `dvc exp run -S` reruns caption training and what follows it, and `dvc exp show` lists it
    out = run(repo, *DVC, "exp", "run", "-n", "lr3e-3", "-S", "caption.train.lr=0.003")
    assert ran(out) == CAPTION_STAGES
    shown = run(repo, *DVC, "exp", "show", "--csv", stdout_only=True)
    header, *rows = list(csv.reader(shown.splitlines()))
    row = next(dict(zip(header, r)) for r in rows if r[header.index("Experiment")] == "lr3e-3")
    column = lambda name: next(v for k, v in row.items() if k.split(":")[-1] == name)  # noqa: E731  (file: when ambiguous)
    assert float(column("caption.train.lr")) == 0.003 and float(column("CIDEr")) >= 0
    assert float(row["metrics/train_caption.json:final_loss"]) > 0

    # the experiment's results are in the workspace: commit them, then compare the two commits
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "caption lr 0.003")
    diff = run(repo, *DVC, "metrics", "diff", "HEAD~1", "HEAD")
    assert "metrics/train_caption.json" in diff and "final_loss" in diff
    assert "caption.train.lr" in run(repo, *DVC, "params", "diff", "HEAD~1", "HEAD")
    plots = json.loads(run(repo, *DVC, "plots", "diff", "HEAD~1", "HEAD", "--json", stdout_only=True))["data"]
    train_curve = plots["plots/train_caption.csv"][0]
    assert train_curve["revisions"] == ["HEAD~1", "HEAD"]
    losses = {rev: [float(v["loss"]) for v in train_curve["content"]["data"]["values"] if v["rev"] == rev]
              for rev in ("HEAD~1", "HEAD")}
    assert len(losses["HEAD"]) == len(losses["HEAD~1"]) > 0 and losses["HEAD"] != losses["HEAD~1"]

    # `dvc repro -s` runs the one stage named and nothing before it, though its upstream changed
    set_params(repo, {"caption": {"train": {"lr": 0.002}}, "report": {"queries": 2}})
    assert ran(run(repo, *DVC, "repro", "-s", "report")) == {"report"}
    assert "train@caption" in run(repo, *DVC, "status")
    restore(repo)


@pytest.mark.slow
def test_a_pretrain_param_reruns_pretraining_and_the_fine_tunes_only(repo):
    assert json.loads((repo / "models/caption/mmcn.json").read_text())["model"]["init"] == "models/pretrain"
    pretrain = json.loads((repo / "metrics/train_pretrain.json").read_text())
    assert {"valid_mlm_accuracy", "valid_contrast_accuracy_0", "valid_contrast_accuracy_2"} <= set(pretrain)
    set_params(repo, {"pretrain": {"train": {"lr": 0.002}}})
    assert ran(run(repo, *DVC, "repro")) == MODEL_STAGES
    restore(repo)


@pytest.mark.slow
def test_a_clip_param_reruns_clip_its_dependants_and_the_report_only(repo):
    clip = json.loads((repo / "metrics/clip.json").read_text(encoding="utf-8"))
    assert {"t2i", "i2t", "mean_recall", "baseline_chance"} <= set(clip) and "zero_shot" not in clip  # from scratch
    assert (repo / "reports/clip/test_imgs.img_feat.jsonl").is_file()
    set_params(repo, {"clip": {"train": {"lr": 0.002}}})
    clipcap = {s for s in ALL_STAGES if s.endswith("@clipcap")}  # ClipCap maps train@clip's image embeddings
    assert ran(run(repo, *DVC, "repro")) == CLIP_STAGES | clipcap
    restore(repo)


@pytest.mark.slow
def test_a_model_family_code_change_touches_that_family_only(repo):
    """Each train@/evaluate@ stage lists its own family's package (mmcn.models.factory.FAMILIES):
    an edit to one family's code changes the deps of its stages and no other's; an edit to the
    shared factory, every model stage's."""
    def changed_after(edit: str) -> set[str]:
        path = repo / edit
        before = path.read_bytes()
        path.write_bytes(before + b"\n# edited\n")
        try:
            return set(json.loads(run(repo, *DVC, "status", "--json", stdout_only=True)))
        finally:
            path.write_bytes(before)

    pixels = {f"{stage}@{task}" for stage in ("train", "evaluate") for task in ("clip", "clipcap")}
    regions = {"train@pretrain", "train@caption", "train@retrieval", "evaluate@caption", "evaluate@retrieval"}
    assert changed_after("mmcn/models/pixels/clip.py") == pixels
    assert changed_after("mmcn/models/pixels/datasets.py") == pixels
    assert changed_after("mmcn/models/regions/caption.py") == regions
    assert changed_after("mmcn/models/regions/training.py") == regions
    assert changed_after("mmcn/models/factory.py") == pixels | regions
    assert changed_after("mmcn/data/image.py") >= pixels and not changed_after("mmcn/data/image.py") & regions
    assert not json.loads(run(repo, *DVC, "status", "--json", stdout_only=True))


@pytest.mark.slow
def test_upstream_changes_rerun_only_what_follows(repo):
    dvc = DVC
    # upstream changes rerun exactly the changed stage and what follows it (checked up to
    # lmdb, so that the model stages train once more at the end only)
    set_params(repo, {"features": {"score_thresh": 0.3}})
    assert ran(run(repo, *dvc, "repro", "lmdb")) == {"features", "translate", "lmdb"}

    overrides = repo / "data/labels_zh_overrides.tsv"  # rename every demo shape: some box must change
    renamed = {"circle": "圆片", "square": "方片", "triangle": "三角片", "star": "星片", "heart": "心片", "cross": "叉片"}
    overrides.write_text(overrides.read_text(encoding="utf-8") +
                         "".join(f"{en}\t{zh}\tobject\n" for en, zh in renamed.items()), encoding="utf-8")
    assert ran(run(repo, *dvc, "repro", "lmdb")) == {"translate", "lmdb"}
    assert json.loads((repo / "metrics/translate.json").read_text(encoding="utf-8"))["overrides"] == 12
    assert any(zh in (repo / "data/labels_zh/train.jsonl").read_text(encoding="utf-8") for zh in renamed.values())

    set_params(repo, {"lmdb": {"shards": 2}})
    assert ran(run(repo, *dvc, "repro", "lmdb")) == {"lmdb"}

    set_params(repo, {"detector": {"lr": 0.01}})
    assert ran(run(repo, *dvc, "repro", "lmdb")) == {"detector", "features", "translate", "lmdb"}

    assert "train@caption" in run(repo, *dvc, "status")  # the model stages are now out of date


@pytest.mark.slow
def test_released_features_replace_the_detector(repo):
    # a release in Oscar's retrieval layout (3-column features.tsv + predictions.tsv), made from
    # this repo's own features with English labels, as VinVL's releases come
    run(repo, sys.executable, "-m", "mmcn.cli", "export-oscar", "--features", "data/features", "--out", "release",
        "--tasks", "retrieval", "--labels", "en")
    before = {r["image_id"]: r for r in _features(repo)}
    released = repo / "data/released_features"
    for name in ("features.tsv", "predictions.tsv"):
        shutil.move(repo / "release/retrieval" / name, released / name)
    out = run(repo, *DVC, "repro", "lmdb")
    assert ran(out) == {"detector", "features", "translate", "lmdb"}
    assert json.loads((repo / "metrics/detector.json").read_text())["source"] == "none"
    assert not (repo / "models/detector/model.safetensors").exists()
    assert "imported from data/released_features" in (repo / "models/detector/no_detector.json").read_text()
    report = json.loads((repo / "data/features/features_report.json").read_text())
    assert report["source"] == "data/released_features" and report["skipped"] == []
    after = {r["image_id"]: r for r in _features(repo)}
    assert after.keys() == before.keys()
    for image_id, r in after.items():
        assert r["features"] == before[image_id]["features"] and r["classes"] == before[image_id]["classes"]
    assert json.loads((repo / "metrics/translate.json").read_text(encoding="utf-8"))["images"]["train"] == 12
    # back to the detector (the release removed): it runs again (DVC's run cache skips stages with
    # uncached outputs such as metrics/detector.json), and the features are extracted again
    for name in ("features.tsv", "predictions.tsv"):
        (released / name).unlink()
    out = run(repo, *DVC, "repro", "lmdb")
    assert ran(out) == {"detector", "features", "translate", "lmdb"}
    assert (repo / "models/detector/model.safetensors").is_file()
    assert "source" not in json.loads((repo / "data/features/features_report.json").read_text())


def _features(repo: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for path in sorted((repo / "data/features").glob("*/part-*.parquet"))
            for row in pq.read_table(path, columns=["image_id", "classes", "features"]).to_pylist()]

