"""DVC stage `ingest`: raw layout (or a Chinese-CLIP folder) at `ingest.src` -> data/tsv/."""
import sys
from pathlib import Path

from common import execution_params, stage_params, start

from mmcn.data.ingest import IngestConfig, IngestError, ingest

OUT = Path("data/tsv")

if __name__ == "__main__":
    log = start("ingest")
    params = stage_params("ingest")
    src = Path(params.pop("src"))
    try:
        ingest(src, OUT, IngestConfig(**params, **execution_params("ingest")))
    except IngestError as e:
        log.error("%s", e)
        sys.exit(1)
