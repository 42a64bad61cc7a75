"""DVC stage `lmdb` (script named so that it does not shadow the lmdb package): data/tsv/ + data/features/ +
data/labels_zh/ -> one LMDB store per split in data/lmdb/."""
from pathlib import Path

from common import execution_params, run, stage_params, start

from mmcn.data.lmdb_build import LmdbConfig, build_lmdb
from mmcn.settings import build


def read_params() -> LmdbConfig:
    return build(LmdbConfig, ("lmdb", stage_params("lmdb")), ("execution.lmdb", execution_params("lmdb")))


def main() -> None:
    start("lmdb")
    cfg = read_params()
    build_lmdb(Path("data/tsv"), Path("data/lmdb"), features_dir=Path("data/features"),
               tags_dir=Path("data/labels_zh"), cfg=cfg)  # LmdbBuildError (a ValueError): one line, exit 2


if __name__ == "__main__":
    run(main)
