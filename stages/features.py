"""DVC stage `features`: run models/detector/ over data/tsv/ with Ray Data -> data/features/."""
from pathlib import Path

from common import execution_params, ray_settings, run, stage_params, start, start_ray

from mmcn.settings import build
from mmcn.vision.extract import ExtractConfig, extract_features


def read_params() -> ExtractConfig:
    cfg = build(ExtractConfig, ("features", stage_params("features")),
                ("execution.features", execution_params("features")))
    ray_settings()
    return cfg


def main() -> None:
    start("features")
    cfg = read_params()
    start_ray()
    extract_features(Path("models/detector"), Path("data/tsv"), Path("data/features"), cfg)


if __name__ == "__main__":
    run(main)
