"""DVC stage `features`: run models/detector/ over data/tsv/ with Ray Data -> data/features/."""
from pathlib import Path

from common import execution_params, stage_params, start, start_ray

from mmcn.vision.extract import ExtractConfig, extract_features

if __name__ == "__main__":
    log = start("features")
    start_ray()
    extract_features(Path("models/detector"), Path("data/tsv"), Path("data/features"),
                     ExtractConfig(**stage_params("features"), **execution_params("features")))
