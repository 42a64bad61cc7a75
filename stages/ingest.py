"""DVC stage `ingest`: raw layout (or a Chinese-CLIP folder) at `ingest.src` -> data/tsv/."""
from pathlib import Path

from common import execution_params, run, stage_params, start

from mmcn.data.ingest import IngestConfig, IngestError, ingest
from mmcn.settings import build, expect

OUT = Path("data/tsv")


def read_params() -> tuple[Path, IngestConfig]:
    p = stage_params("ingest")
    expect(p, "ingest", "src", path="dir")
    return Path(p["src"]), build(IngestConfig, ("ingest", p), ("execution.ingest", execution_params("ingest")),
                                 own=("src",))


def main() -> None:
    start("ingest")
    src, cfg = read_params()
    ingest(src, OUT, cfg)


if __name__ == "__main__":
    run(main, IngestError)  # a split left empty, strict mode's skips: one line naming the report, exit 2
