"""Benchmark: images/s of the features stage (Ray Data, decode, batching, NMS, Parquet) vs
the bare detector forward (`Detector.detect` on pre-decoded tensors) on the same images,
and Ray with 2 workers vs 1.

    python bench/features.py [--images 1600] [--detector models/detector]

Images come from the demo generator (128 px) through ingest. The detector is
`--detector` when it exists (the trained demo model), else a freshly initialised small
one (speed barely depends on the weights). The bare forward runs single-threaded, like
each Ray actor (num_cpus=1); stage overhead = stage time / bare time - 1 (goal <= 25%).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from mmcn.data import tsv
from mmcn.data.demo import DemoConfig, generate
from mmcn.data.ingest import IngestConfig, ingest
from mmcn.vision.detector import build_detector, load_detector, save_detector
from mmcn.vision.extract import ExtractConfig, decode, extract_features


def bare_forward(detector_dir: Path, tsv_dir: Path, cfg: ExtractConfig, threads: int) -> tuple[int, float]:
    torch.set_num_threads(threads)
    model = load_detector(detector_dir).eval()
    images = [decode(data, cfg) for split in tsv.splits_in(tsv_dir)
              for _, data in tsv.TsvReader(tsv.imgs_path(tsv_dir, split))]
    start = time.perf_counter()
    for first in range(0, len(images), cfg.batch_size):
        model.detect(images[first:first + cfg.batch_size], min_boxes=cfg.min_boxes, max_boxes=cfg.max_boxes,
                     score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh)
    return len(images), time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1600)
    ap.add_argument("--detector", type=Path, default=Path("models/detector"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmcn-bench-features-"))
    try:
        generate(work / "raw", DemoConfig(train=args.images, valid=0, test=0))
        ingest(work / "raw", work / "tsv", IngestConfig(workers=2))
        detector_dir = args.detector
        if not (detector_dir / "model.safetensors").is_file():
            torch.manual_seed(0)
            detector_dir = save_detector(build_detector("small"), work / "detector")
        cfg = ExtractConfig(min_boxes=10, max_boxes=50, shard_size=256)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        n, bare1 = bare_forward(detector_dir, work / "tsv", cfg, threads=1)
        _, bare2 = bare_forward(detector_dir, work / "tsv", cfg, threads=2)
        timings = {}
        for workers in (1, 2):
            start = time.perf_counter()
            extract_features(detector_dir, work / "tsv", work / f"features-{workers}", ExtractConfig(
                min_boxes=10, max_boxes=50, shard_size=256, workers=workers))
            timings[workers] = time.perf_counter() - start
        print(f"\n{n} images of 128 px, detector {detector_dir}")
        print(f"  bare detector forward, 1 thread   {n / bare1:8.1f} img/s")
        print(f"  bare detector forward, 2 threads  {n / bare2:8.1f} img/s")
        for workers, t in timings.items():
            print(f"  features stage, {workers} Ray worker(s)    {n / t:8.1f} img/s")
        print(f"\nstage overhead vs bare forward (1 worker vs 1 thread): {timings[1] / bare1 - 1:+.0%} (goal <= 25%)")
        print(f"Ray 2 workers vs 1: {timings[1] / timings[2]:.2f}x")
        print(f"2 workers vs bare forward with 2 threads: {bare2 / timings[2]:.2f}x")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
