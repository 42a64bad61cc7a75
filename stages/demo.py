"""DVC stage `demo`: generate the deterministic synthetic demo dataset into data/raw/."""
from pathlib import Path

from common import run, stage_params, start

from mmcn.data.demo import DemoConfig, generate
from mmcn.settings import build

OUT = Path("data/raw")


def read_params() -> DemoConfig:
    return build(DemoConfig, ("demo", stage_params("demo")))


def main() -> None:
    log = start("demo")
    summary = generate(OUT, read_params())
    log.info("demo data in %s: %s", OUT, summary)


if __name__ == "__main__":
    run(main)
