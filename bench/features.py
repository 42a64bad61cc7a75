"""Benchmark: images/s of the features stage (Ray Data, decode, batching, NMS, Parquet) vs
the bare detector forward (`Detector.detect` on pre-decoded tensors) on the same images,
and Ray with 2 workers vs 1; with --photos, peak memory and time per image of one detector
actor on 12 MP photos, the old way against the new.

    python bench/features.py [--images 1600] [--detector models/detector]
    python bench/features.py --photos [--images 3] [--archs small,butd_r101_c4,vinvl_x152_c4] [--threads 1]

Images come from the demo generator (128 px) through ingest. The detector is
`--detector` when it exists (the trained demo model), else a freshly initialised small
one (speed barely depends on the weights). The bare forward runs single-threaded, like
each Ray actor (num_cpus=1); stage overhead = stage time / bare time - 1 (goal <= 25%).

--photos: ``--images`` synthetic 4000x3000 JPEGs (gradients and noise, about 4 MB each) in
one shard; for each architecture (random weights of the real shapes: speed and memory do not
depend on the values) one fresh process per run does what a detector actor does with a
shard (``ShardExtractor.run``) and reports its peak RSS (getrusage), wall and CPU seconds
per image: the new way (each image resized to the network input once decoded, batches of
one network shape under ``max_memory_mb``), and the old way (every image of the shard
decoded at full size first, then batches of ``batch_size`` sorted by size: the extractor
before bounded memory, kept here only as the baseline), each with batch_size 1 and 8 (the
new way then takes as many as ``max_memory_mb`` allows). It also measures each
architecture's activation factor (peak RSS of a batch-1 forward less the RSS before it, per
byte of network input: ``extract.ACTIVATION_FACTOR``) and whether the new way's shards are
byte-equal across batch sizes. fp32 on CPU (bf16 needs a GPU: bench/gpu.py).
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

import ray
import torch

from mmcn.data import tsv
from mmcn.data.demo import DemoConfig, generate
from mmcn.data.ingest import IngestConfig, ingest
from mmcn.vision.detector import build_detector, load_detector, save_detector
from mmcn.data import features as region_features
from mmcn.vision import extract
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


def photo_tsv(root: Path, n: int) -> Path:
    """``n`` 4000x3000 JPEGs (a colour gradient, shapes and noise: about 4 MB each) as one split."""
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:3000, 0:4000].astype(np.float32)
    with tsv.TsvWriter(tsv.imgs_path(root, "train")) as w:
        for k in range(n):
            base = np.stack([x / 16 + 40 * k, y / 12, (x + y) / 28], axis=2) % 256
            pixels = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            draw = ImageDraw.Draw(img)
            for _ in range(12):
                x0, y0 = int(rng.integers(0, 3500)), int(rng.integers(0, 2500))
                draw.ellipse([x0, y0, x0 + int(rng.integers(100, 500)), y0 + int(rng.integers(100, 500))],
                             fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            w.write(k + 1, __import__("base64").b64encode(buf.getvalue()))
    return root


def old_run(actor: extract.ShardExtractor, task: extract.ShardTask) -> None:
    """The extractor before bounded memory: decode the whole shard at full size, then detect in
    batches of ``batch_size`` sorted by size, write the shard at the end."""
    reader = tsv.TsvReader(tsv.imgs_path(actor.tsv_dir, task.split))
    images = [(image_id, decode(data, actor.cfg)) for image_id, data in
              (reader[line] for line in range(task.start, task.stop))]
    order = sorted(range(len(images)), key=lambda i: tuple(images[i][1].shape[1:]))
    records, cfg = {}, actor.cfg
    for first in range(0, len(order), cfg.batch_size):
        chunk = [images[i] for i in order[first:first + cfg.batch_size]]
        dets = actor.model.detect([img for _, img in chunk], min_boxes=cfg.min_boxes, max_boxes=cfg.max_boxes,
                                  score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh)
        records.update((image_id, extract.to_record(actor.model.config, image_id, det))
                       for (image_id, _), det in zip(chunk, dets))
    region_features.write_shard(region_features.shard_path(actor.out_dir, task.split, task.index),
                                [records[image_id] for image_id, _ in images])


def worker(job: dict) -> dict:
    """One measurement in this (fresh) process: ``job["way"]`` is new, old or activation."""
    torch.set_num_threads(job["threads"])
    actor = extract.ShardExtractor(job["detector"], job["tsv"], job["out"], job["cfg"])
    base = extract.rss_mb()
    batches = []
    detect = actor.model.detect
    actor.model.detect = lambda images, **kw: batches.append(len(images)) or detect(images, **kw)
    if job["way"] == "activation":  # one network-size input, no decoding: the forward alone
        c = actor.model.config
        x = actor.model.prepare(torch.randint(0, 256, (3, c.min_size, c.min_size * 4 // 3), dtype=torch.uint8))
        extract.reset_peak_rss()
        before = extract.rss_mb()
        actor.model.detect([x], min_boxes=10, max_boxes=100)
        grew = extract.peak_rss_mb() - before
        return {"factor": grew / (x.tensor.nelement() * 4 / 2 ** 20), "shape": list(x.tensor.shape[1:]),
                "forward_mb": grew}
    task = extract.ShardTask("train", 0, 0, job["images"])
    load_peak = extract.peak_rss_mb()
    extract.reset_peak_rss()  # the shard's peak from here on, not loading's
    usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with torch.no_grad():
        old_run(actor, task) if job["way"] == "old" else actor.run(task)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"base_mb": base, "load_peak_mb": load_peak, "peak_mb": extract.peak_rss_mb(), "wall_s": wall,
            "batches": batches,
            "cpu_s": after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime}


def photos(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="mmcn-bench-photos-"))
    try:
        t = time.perf_counter()
        photo_tsv(work / "tsv", args.images)
        print(f"{args.images} photos of 4000x3000 in {time.perf_counter() - t:.0f}s; load: "
              f"{Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
        for arch in args.archs.split(","):
            torch.manual_seed(0)
            detector = save_detector(build_detector(arch), work / arch)
            def run(way: str, batch_size: int = 1, out: str = "") -> dict:
                job = {"way": way, "detector": str(detector), "tsv": str(work / "tsv"), "images": args.images,
                       "out": str(work / (out or f"out-{arch}-{way}-{batch_size}")), "threads": args.threads,
                       "cfg": asdict(ExtractConfig(batch_size=batch_size, shard_size=args.images,
                                                   max_memory_mb=args.max_memory_mb))}
                done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                                      text=True, check=True)
                return json.loads(done.stdout.strip().splitlines()[-1])
            act = run("activation")
            print(f"{arch}: forward of one {act['shape'][1]}x{act['shape'][0]} input: +{act['forward_mb']:.0f} MB "
                  f"peak, activation factor {act['factor']:.0f}", flush=True)
            shards = {}
            for way, batch_size in ((w, int(b)) for w, b in (r.split(":") for r in args.runs.split(","))):
                r, n = run(way, batch_size), args.images
                print(f"  {way:3} batch_size {batch_size}: batches {r['batches']}, peak RSS {r['peak_mb']:6.0f} MB "
                      f"(detector loaded: {r['base_mb']:.0f} MB, loading peak {r['load_peak_mb']:.0f}), "
                      f"{r['wall_s'] / n:6.1f} s/image wall, {r['cpu_s'] / n:6.1f} s/image CPU, "
                      f"{n / r['wall_s']:.3f} images/s", flush=True)
                if way == "new":
                    shards[batch_size] = region_features.shard_path(
                        work / f"out-{arch}-new-{batch_size}", "train", 0).read_bytes()
            if len(shards) > 1:
                same = len(set(shards.values())) == 1
                print(f"  new way: shard bytes of batch_size {sorted(shards)} {'equal' if same else 'DIFFER'}")
            shutil.rmtree(detector)
        print(f"load after: {Path('/proc/loadavg').read_text().split()[:3]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=None, help="default: 1600 demo images, or 3 photos")
    ap.add_argument("--detector", type=Path, default=Path("models/detector"))
    ap.add_argument("--photos", action="store_true", help="12 MP photos: peak RSS and time per image, old vs new")
    ap.add_argument("--archs", default="small,butd_r101_c4,vinvl_x152_c4")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the actor (--photos)")
    ap.add_argument("--runs", default="new:1,new:8,old:1,old:8", help="way:batch_size runs (--photos)")
    ap.add_argument("--max-memory-mb", type=int, default=ExtractConfig().max_memory_mb)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.photos:
        args.images = args.images or 3
        return photos(args)
    args.images = args.images or 1600
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
