"""DVC stage `features`: run models/detector/ over data/tsv/ with Ray Data -> data/features/,
or, when ``features.source`` holds released Oscar/VinVL feature and label TSVs, import those."""
from pathlib import Path

from common import execution_params, ray_settings, run, stage_params, start, start_ray

from mmcn.data.oscar_import import ImportConfig, find_files, import_features
from mmcn.settings import build, expect
from mmcn.vision.extract import ExtractConfig, extract_features

TSV, OUT = Path("data/tsv"), Path("data/features")


def read_params() -> tuple[Path, ExtractConfig]:
    """``(features.source: a folder of released features, or one without: extract; the extraction settings)``."""
    p = stage_params("features")
    expect(p, "features", "source", path="any")
    source = Path(p["source"])
    cfg = build(ExtractConfig, ("features", p), ("execution.features", execution_params("features")), own=("source",))
    ray_settings()
    return source, cfg


def main() -> None:
    start("features")
    source, cfg = read_params()
    if find_files(source)[0]:
        import_features(source, TSV, OUT, ImportConfig(shard_size=cfg.shard_size))
        return
    start_ray()
    extract_features(Path("models/detector"), TSV, OUT, cfg)


if __name__ == "__main__":
    run(main)
