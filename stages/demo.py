"""DVC stage `demo`: generate the deterministic synthetic demo dataset into data/raw/."""
from pathlib import Path

from common import stage_params, start

from mmcn.data.demo import DemoConfig, generate

OUT = Path("data/raw")

if __name__ == "__main__":
    log = start("demo")
    summary = generate(OUT, DemoConfig(**stage_params("demo")))
    log.info("demo data in %s: %s", OUT, summary)
