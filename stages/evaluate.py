"""DVC stage `evaluate@{task}`: score models/{task}/ on data/lmdb/test with Ray Data actors ->
metrics/{task}.json (with baselines) and reports/{task}/ (predictions, per-image scores)."""
import json
import os
import sys
from pathlib import Path

from common import execution_params, ray_settings, run, stage_params, start, start_ray

from mmcn.eval.evaluate import eval_config, evaluate_captions, evaluate_clip, evaluate_clipcap, evaluate_retrieval
from mmcn.settings import build


def read_params(task: str):
    """``{task}.eval`` (+ ``execution.{task}.eval``) as the task's settings class (clipcap: beam |
    top_k | top_p decoding; the others: mmcn.eval.evaluate.EvalConfig), checked."""
    cfg = build(eval_config(task), (f"{task}.eval", stage_params(f"{task}.eval")),
                (f"execution.{task}.eval", execution_params(f"{task}.eval")))
    ray_settings()
    return cfg


def main() -> None:
    task = sys.argv[1]
    start(f"evaluate.{task}")
    cfg = read_params(task)
    os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
    start_ray()
    run_task = {"caption": evaluate_captions, "retrieval": evaluate_retrieval, "clipcap": evaluate_clipcap,
                "clip": evaluate_clip}[task]  # clip: fine-tuned, and zero-shot of the folder it started from
    metrics = run_task(Path(f"models/{task}"), Path("data/lmdb"), Path(f"reports/{task}"), cfg)
    Path("metrics").mkdir(exist_ok=True)
    Path(f"metrics/{task}.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    run(main)
