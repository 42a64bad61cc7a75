"""DVC stage `translate`: data/features/ labels -> Chinese tags in data/labels_zh/ + metrics/translate.json."""
import json
import sys
from pathlib import Path

from common import stage_params, start

from mmcn.text.translate import LabelTable, TranslateConfig, UnknownLabelError, translate_features

FEATURES = Path("data/features")
OUT = Path("data/labels_zh")
METRICS = Path("metrics/translate.json")

if __name__ == "__main__":
    log = start("translate")
    p = stage_params("translate")
    table = LabelTable.load(Path(p["overrides"]) if p.get("overrides") else None)
    try:
        summary = translate_features(FEATURES, OUT, table, TranslateConfig(unknown=p["unknown"],
                                                                           max_attributes=p["max_attributes"]))
    except UnknownLabelError as e:
        log.error("%s", e)
        sys.exit(1)
    METRICS.parent.mkdir(exist_ok=True)
    METRICS.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
