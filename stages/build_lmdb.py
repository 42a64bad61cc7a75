"""DVC stage `lmdb` (script named so that it does not shadow the lmdb package): data/tsv/ + data/features/ +
data/labels_zh/ -> one LMDB store per split in data/lmdb/."""
import sys
from pathlib import Path

from common import execution_params, stage_params, start

from mmcn.data.lmdb_build import LmdbBuildError, LmdbConfig, build_lmdb

if __name__ == "__main__":
    log = start("lmdb")
    try:
        build_lmdb(Path("data/tsv"), Path("data/lmdb"), features_dir=Path("data/features"),
                   tags_dir=Path("data/labels_zh"), cfg=LmdbConfig(**stage_params("lmdb"), **execution_params("lmdb")))
    except LmdbBuildError as e:
        log.error("%s", e)
        sys.exit(1)
