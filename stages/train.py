"""DVC stage `train@{task}`: Ray Train on data/lmdb/ -> models/{task}/ (HF layout), training
curves in plots/train_{task}.csv + plots/valid_{task}.csv, summary in metrics/train_{task}.json."""
import csv
import json
import os
import sys
from pathlib import Path

from common import execution_params, ray_settings, run, stage_params, start, start_ray

from mmcn.models.factory import SIZES, family
from mmcn.settings import build, expect
from mmcn.train.loop import ModelSpec, TrainConfig, train


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def init_dir(folder: Path | None, task: str) -> str:
    """``{task}.model.init``: a model folder to start from (``config.json``; for clip also a folder
    holding a Chinese-CLIP ``.pt`` and its vocab.txt, converted on load), or one with neither (the
    repository's data/init/{task}: train from scratch). It is a dep of the stage in dvc.yaml."""
    if folder is None:
        return ""
    if (folder / "config.json").is_file():
        return str(folder)
    if task == "clip" and any(folder.glob("*.pt")):
        if not (folder / "vocab.txt").is_file():
            raise FileNotFoundError(f"clip.model.init: {folder} holds a Chinese-CLIP checkpoint but no vocab.txt; put "
                                    "Chinese-CLIP's vocab.txt (cn_clip/clip/vocab.txt of its code) next to it")
        return str(folder)
    return ""


def read_params(task: str) -> tuple[ModelSpec, TrainConfig, Path]:
    """``{task}.model``, ``{task}.train``, ``train`` (+ ``execution.train``) and ``ray``, checked."""
    model = stage_params(f"{task}.model")
    section = f"{task}.model"
    expect(model, section, "size", choices=tuple(SIZES))
    expect(model, section, "init", path="dir", optional=True)  # a model folder, or data/init/{task} (scratch)
    if task == "clipcap":  # the CLIP folder whose embeddings it maps (models/clip: train@clip's model, a dep)
        expect(model, section, "clip", path="dir")
    # the task config's checks (types, ranges, choices)
    build(family(task).CONFIGS[task], (section, model), own=("size", "init"))
    init = init_dir(Path(model["init"]) if model["init"] else None, task)
    settings = {k: v for k, v in model.items() if k not in ("size", "init")}
    cfg = build(TrainConfig, (f"{task}.train", stage_params(f"{task}.train")), ("train", stage_params("train")),
                ("execution.train", execution_params("train")))
    return ModelSpec(task, size=model["size"], init=init, settings=settings), cfg, Path(ray_settings().storage_path)


def main() -> None:
    task = sys.argv[1]
    log = start(f"train.{task}")
    spec, cfg, storage_path = read_params(task)
    # Ray's own loggers at ERROR in every process of the local Ray this stage starts: Ray
    # Train's placement-group cleaner warns every second when the dashboard (State API) is off
    os.environ.setdefault("RAY_LOGGER_LEVEL", "error")
    start_ray()
    summary = train(spec, Path("data/lmdb"), Path(f"models/{task}"), cfg, storage_path)
    Path("plots").mkdir(exist_ok=True)
    Path("metrics").mkdir(exist_ok=True)
    write_csv(Path(f"plots/train_{task}.csv"), summary["train"])
    write_csv(Path(f"plots/valid_{task}.csv"), summary["valid"])
    first, last = summary["train"][0]["loss"], summary["train"][-1]["loss"]
    metrics = {"steps": summary["steps"], "seconds": summary["seconds"], "first_loss": first, "final_loss": last,
               **{k: v for k, v in summary["valid"][-1].items() if k.startswith("valid_")}, **summary["oov"]}
    Path(f"metrics/train_{task}.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    log.info("%s: loss %.3f -> %.3f over %d steps; %s", task, first, last, summary["steps"], summary["valid"][-1])


if __name__ == "__main__":
    run(main)
