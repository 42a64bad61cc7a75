"""DVC stage `report`: a self-contained HTML page (reports/index.html) of the test split: detected boxes with
Chinese tags, generated vs reference captions with per-image scores, retrieval examples, metrics, curves."""
from pathlib import Path

from common import run, stage_params, start

from mmcn.data.manifest import manifest_path
from mmcn.eval.report import ReportConfig, build_report, image_names
from mmcn.settings import build

METRICS = ("detector", "translate", "train_caption", "train_retrieval", "caption", "retrieval", "train_clipcap",
           "clipcap", "train_clip", "clip")
MANIFEST = manifest_path(Path("data/tsv"), "test")  # the test images' file names
PLOTS = ("detector_loss", "train_caption", "valid_caption", "train_retrieval", "valid_retrieval", "train_clipcap",
         "valid_clipcap", "train_clip", "valid_clip")
SIDE_CAPTIONS = {"ClipCap": Path("reports/clipcap/per_image.jsonl")}  # shown beside the Oscar-style caption


def read_params() -> ReportConfig:
    return build(ReportConfig, ("report", stage_params("report")))


def main() -> None:
    start("report")
    cfg = read_params()
    build_report(Path("reports/index.html"), Path("data/lmdb/test"), Path("reports/caption"),
                 Path("reports/retrieval"), {name: Path(f"metrics/{name}.json") for name in METRICS},
                 [Path(f"plots/{name}.csv") for name in PLOTS], cfg, image_names(MANIFEST), SIDE_CAPTIONS)


if __name__ == "__main__":
    run(main)
