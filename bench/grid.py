"""Benchmark: seconds per image and peak RSS of the grid-feature fallback (mmcn.vision.grid) on CPU.

    python bench/grid.py [--arch resnet101] [--images 3] [--threads 2] [--weights FILE]

A torchvision ImageNet classifier (``--weights``, else ``--arch`` with random weights: speed
does not depend on the values) converted like the detector stage does, then ``detect`` on
random 4:3 photos of 1600x1200 (resized to 600x800 inside, as every photo of that shape).
The first image is a warm-up and is not timed; CPU seconds (all threads) are printed too, as
wall time on a shared machine says more about the neighbours than about the model.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from mmcn.vision.grid import convert_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet101", help="torchvision builder for random weights")
    ap.add_argument("--weights", type=Path, help="a torchvision checkpoint instead of random weights")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            weights = Path(tmp) / f"{args.arch}.pth"
            torch.save(getattr(torchvision.models, args.arch)().state_dict(), weights)
        model = convert_grid(weights)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 1200, 1600), generator=g, dtype=torch.uint8) for _ in range(args.images + 1)]
    model.detect(images[:1])
    start, cpu = time.perf_counter(), time.process_time()
    for image in images[1:]:
        model.detect([image])
    per_image = (time.perf_counter() - start) / args.images
    cpu_per_image = (time.process_time() - cpu) / args.images  # robust to other processes sharing the cores
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{model.config.arch}: {per_image:.1f} s/image at 600x800 ({model.config.boxes_per_image} boxes), "
          f"{cpu_per_image:.1f} CPU s/image, {args.threads} thread(s); peak RSS {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
