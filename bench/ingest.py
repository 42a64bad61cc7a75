"""Benchmark: images/s of `mmcn ingest` against, side by side in one run,
(a) the recipe in Chinese-CLIP's README (PIL open -> save to a buffer -> b64encode, one
process) and (b) the bound "read bytes + base64 encode" (one process, the standard
library's base64). mmcn encodes with pybase64 (SIMD, identical output), so (b') shows the
same bound with pybase64 too.

    python bench/ingest.py [--images 3000] [--workers 2] [--repeat 3]

Generates a dataset of realistic photo-sized JPEG/PNG images once, then times each method
`--repeat` times, interleaved, and reports the best run of each. Inputs and outputs live
in `--dir` (default: RAM-backed /dev/shm when present, else bench/out/), so that every
method is measured on the same footing and disk write-back does not decide the result.
Goal (issue 2): mmcn >= 5x (a) and >= 50% of (b).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pybase64
from PIL import Image

from mmcn.data.ingest import IngestConfig, ingest
from timing import timed  # bench/timing.py

DEFAULT_DIR = Path("/dev/shm/mmcn-bench") if Path("/dev/shm").is_dir() else Path(__file__).parent / "out" / "ingest"


def make_dataset(root: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` images, 80% JPEG / 20% PNG, 480-800 px on the long side, photo-like content."""
    images = root / "train" / "images"
    marker = root / f".complete-{n}-{seed}"
    if marker.exists():
        return sorted(images.iterdir())
    shutil.rmtree(root, ignore_errors=True)
    images.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        w = int(rng.integers(480, 801))
        h = int(w * rng.uniform(0.6, 0.9))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = rng.uniform(0, 255, 3).astype(np.float32)
        grad = np.stack([(xx / w) * rng.uniform(-120, 120) + (yy / h) * rng.uniform(-120, 120)] * 3, -1)
        noise = rng.normal(0, 12, (h, w, 3)).astype(np.float32)
        arr = np.clip(base + grad + noise, 0, 255).astype(np.uint8)
        for _ in range(int(rng.integers(2, 6))):  # a few blocks for edges
            x, y = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
            arr[y:y + int(rng.integers(30, 200)), x:x + int(rng.integers(30, 200))] = rng.integers(0, 255, 3)
        img = Image.fromarray(arr)
        name = f"{i:06d}.png" if i % 5 == 4 else f"{i:06d}.jpg"
        img.save(images / name, quality=90) if name.endswith(".jpg") else img.save(images / name, compress_level=6)
        lines.append(json.dumps({"image": name, "captions": [f"第{i}张图片"]}, ensure_ascii=False))
    (root / "train" / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    marker.touch()
    return sorted(p for p in images.iterdir())


def chinese_clip_recipe(paths: list[Path], out: Path) -> None:
    """(a) Chinese-CLIP README: open with PIL, save in its own format to a buffer, base64."""
    with open(out, "w") as f:
        for i, path in enumerate(paths):
            img = Image.open(path)
            img_buffer = io.BytesIO()
            img.save(img_buffer, format=img.format)
            base64_str = base64.b64encode(img_buffer.getvalue()).decode("utf-8")
            f.write(f"{i}\t{base64_str}\n")


def read_b64_bound(paths: list[Path], out: Path, encode=base64.b64encode) -> None:
    """(b) the bound: read the file bytes and base64-encode them, nothing else."""
    with open(out, "wb") as f:
        for i, path in enumerate(paths):
            f.write(str(i).encode() + b"\t" + encode(path.read_bytes()) + b"\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the dataset and outputs go")
    ap.add_argument("--keep", action="store_true", help="keep the generated dataset for the next run")
    args = ap.parse_args()

    src = args.dir / "raw"
    print(f"generating/reusing {args.images} images in {src} ...", flush=True)
    paths = make_dataset(src, args.images)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"{len(paths)} images, {mb:.0f} MB, {os.cpu_count()} CPUs", flush=True)
    work = args.dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    methods = {
        "(a) Chinese-CLIP recipe": lambda: chinese_clip_recipe(paths, work / "a.tsv"),
        "(b) read + base64 bound": lambda: read_b64_bound(paths, work / "b.tsv"),
        "(b') read + pybase64 bound": lambda: read_b64_bound(paths, work / "b2.tsv", pybase64.b64encode),
        f"mmcn ingest ({args.workers} workers)": lambda: ingest(src, work / "mmcn",
                                                               IngestConfig(workers=args.workers)),
    }
    best = {name: float("inf") for name in methods}
    for r in range(args.repeat):
        for name, fn in methods.items():
            seconds = timed(fn)
            best[name] = min(best[name], seconds)
            print(f"  run {r + 1}: {name}: {seconds:.2f}s", flush=True)
            shutil.rmtree(work)  # every method writes into fresh, equally empty space
            work.mkdir()
    rate = {name: len(paths) / t for name, t in best.items()}
    print("\nimages/s (best of", args.repeat, "runs):")
    for name, r in rate.items():
        print(f"  {name:32s} {r:9.0f}")
    a, b, b2, m = rate.values()
    print(f"\nmmcn / (a)  = {m / a:.1f}x   (goal >= 5x)")
    print(f"mmcn / (b)  = {m / b:.0%}   (goal >= 50%)")
    print(f"mmcn / (b') = {m / b2:.0%}")
    shutil.rmtree(work, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
