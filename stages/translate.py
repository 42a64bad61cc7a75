"""DVC stage `translate`: data/features/ labels -> Chinese tags in data/labels_zh/ + metrics/translate.json."""
import json
from pathlib import Path

from common import run, stage_params, start

from mmcn.settings import build, expect
from mmcn.text.translate import LabelTable, TranslateConfig, translate_features

FEATURES = Path("data/features")
OUT = Path("data/labels_zh")
METRICS = Path("metrics/translate.json")


def read_params() -> tuple[Path | None, TranslateConfig]:
    p = stage_params("translate")
    expect(p, "translate", "overrides", path="file", optional=True)
    return Path(p["overrides"]) if p["overrides"] else None, build(TranslateConfig, ("translate", p),
                                                                  own=("overrides",))


def main() -> None:
    start("translate")
    overrides, cfg = read_params()
    summary = translate_features(FEATURES, OUT, LabelTable.load(overrides), cfg)  # UnknownLabelError: exit 2
    METRICS.parent.mkdir(exist_ok=True)
    METRICS.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    run(main)
