"""DVC stage `train@{task}`: Ray Train on data/lmdb/ -> models/{task}/ (HF layout), training
curves in plots/train_{task}.csv + plots/valid_{task}.csv, summary in metrics/train_{task}.json."""
import csv
import json
import os
import sys
from pathlib import Path

from common import execution_params, stage_params, start, start_ray

from mmcn.train.loop import ModelSpec, TrainConfig, train


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def init_dir(task: str, folder: Path) -> str:
    """``{task}.model.init``: a model folder to start from, or one without ``config.json`` (the
    repository's data/init/{task}: train from scratch). It is a dep of the stage in dvc.yaml."""
    if not folder.is_dir():
        raise SystemExit(f"{task}.model.init: {folder}: no such folder (a Mengzi-Oscar/Oscar or BERT model folder, "
                         f"or data/init/{task} with none in it to train from scratch)")
    if not (folder / "config.json").is_file():
        return ""
    return str(folder)


if __name__ == "__main__":
    task = sys.argv[1]
    log = start(f"train.{task}")
    model = dict(stage_params(f"{task}.model"))
    spec = ModelSpec(task, size=model.pop("size"), init=init_dir(task, Path(model.pop("init") or "")), settings=model)
    cfg = TrainConfig(**stage_params(f"{task}.train"), **stage_params("train"), **execution_params("train"))
    # Ray's own loggers at ERROR in every process of the local Ray this stage starts: Ray
    # Train's placement-group cleaner warns every second when the dashboard (State API) is off
    os.environ.setdefault("RAY_LOGGER_LEVEL", "error")
    start_ray()
    summary = train(spec, Path("data/lmdb"), Path(f"models/{task}"), cfg, Path(stage_params("ray")["storage_path"]))
    Path("plots").mkdir(exist_ok=True)
    Path("metrics").mkdir(exist_ok=True)
    write_csv(Path(f"plots/train_{task}.csv"), summary["train"])
    write_csv(Path(f"plots/valid_{task}.csv"), summary["valid"])
    first, last = summary["train"][0]["loss"], summary["train"][-1]["loss"]
    metrics = {"steps": summary["steps"], "seconds": summary["seconds"], "first_loss": first, "final_loss": last,
               **{k: v for k, v in summary["valid"][-1].items() if k.startswith("valid_")}}
    Path(f"metrics/train_{task}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("%s: loss %.3f -> %.3f over %d steps; %s", task, first, last, summary["steps"], summary["valid"][-1])
