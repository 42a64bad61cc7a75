"""Benchmark: training samples/s through Ray Train vs a plain PyTorch loop, same model and data.

    python bench/train.py [--task caption] [--size small] [--images 600] [--steps 60] [--gpu]

Builds a synthetic LMDB store (``--images`` images x 5 captions, 20 regions each, Chinese
tags) once, then, in one run:
  (a) a plain PyTorch loop (DataLoader, AdamW, backward) in this process, 2 torch threads;
  (b) mmcn's Ray Train loop, 1 worker with 2 CPU threads (the same work plus Ray Train's
      worker, DDP wrapper, sampler and reporting); goal (issue 5): overhead <= 10%;
  (c) Ray Train with 1 worker x 1 thread and with 2 workers x 1 thread (DDP over gloo).
Throughput is taken from each loop's own step timestamps, after ``--warmup`` steps, so
process and Ray start-up are not counted. ``--gpu`` adds (d): the model at ``--size``
(use ``base`` for BERT-base) with bf16 autocast on one GPU, samples/s and peak memory.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mmcn.data import features as region_features
from mmcn.data import tsv
from mmcn.data.lmdb_build import build_lmdb
from mmcn.data.lmdb_store import LmdbStore
from mmcn.data.tags import ImageTags, tags_path, write_tags
from mmcn.models.factory import build_model
from mmcn.models.tokenizer import build_tokenizer
from mmcn.models.factory import family
from mmcn.train.loop import ModelSpec, TrainConfig, train

LAYOUT = {"max_text_len": 40, "max_tag_len": 30, "max_regions": 20}
WORDS = "一个 两只 红色的 蓝色的 小狗 男人 女人 汽车 在 草地上 街道上 奔跑 站着 旁边 有 桌子 上面 放着 杯子".split()


def make_store(root: Path, n: int, boxes: int = 20, seed: int = 0) -> Path:
    """A train (and tiny valid) LMDB store of synthetic images, captions, features and tags."""
    lmdb_dir = root / "lmdb"
    if (root / f".complete-{n}-{boxes}").exists():
        return lmdb_dir
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("valid", 16)):
        src = root / "src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        ids = [1000 + i for i in range(count)]
        with tsv.TsvWriter(tsv.imgs_path(src, split)) as w:
            for i in ids:
                w.write(i, tsv.pybase64.b64encode(b"\xff\xd8 not decoded by training \xff\xd9"))
        tsv.write_texts(tsv.texts_path(src, split), [
            tsv.Text(10 * i + k, "".join(rng.choice(WORDS, int(rng.integers(6, 14)))), [i]) for i in ids for k in range(5)])
        records, tags = [], []
        for i in ids:
            b = np.tile(np.array([[4, 4, 60, 60]], np.float32), (boxes, 1))
            pooled = rng.standard_normal((boxes, region_features.POOLED_DIM)).astype(np.float32)
            records.append(region_features.RegionFeatures(i, 128, 128, b, ["dog"] * boxes, np.full(boxes, 0.5, np.float32),
                                            region_features.region_features(pooled, b, 128, 128), [["brown"]] * boxes,
                                            [[0.8]] * boxes))
            tags.append(ImageTags(i, ["狗"] * boxes, [["棕色"]] * boxes, ["棕色 狗"] * boxes))
        region_features.write_shard(region_features.shard_path(src / "features", split, 0), records)
        write_tags(tags_path(src / "tags", split), tags)
        build_lmdb(src, root / f"built-{split}", src / "features", src / "tags")
        lmdb_dir.mkdir(parents=True, exist_ok=True)
        (root / f"built-{split}" / split).rename(lmdb_dir / split)
    (root / f".complete-{n}-{boxes}").touch()
    return lmdb_dir


def rate(seconds: list[float], batch: int, warmup: int) -> float:
    """Samples/s over the steps after ``warmup`` from per-step end times."""
    t = seconds[warmup:]
    return batch * (len(t) - 1) / (t[-1] - t[0])


def plain_loop(task: str, size: str, lmdb_dir: Path, batch: int, steps: int, threads: int, device: str = "cpu",
               bf16: bool = False) -> tuple[list[float], float]:
    from torch.utils.data import DataLoader

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    store = LmdbStore(lmdb_dir / "train")
    tokenizer = build_tokenizer([t.text for t in store.texts()] + ["棕色 狗"])
    model = build_model(task, len(tokenizer), size, **LAYOUT).to(device).train()
    dataset, collate = family(task).task_data(task, lmdb_dir / "train", tokenizer, model.config, TrainConfig())
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, collate_fn=collate, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, start = [], time.perf_counter()
    while len(times) < steps:
        for b in loader:
            b = {k: v.to(device) for k, v in b.items()}
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if len(times) == steps:
                break
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return times, peak


def ray_loop(task: str, size: str, lmdb_dir: Path, batch: int, steps: int, workers: int, threads: int,
             storage: Path) -> list[float]:
    pairs = len(LmdbStore(lmdb_dir / "train").pairs)
    epochs = max(1, -(-steps * batch * workers // pairs))
    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=1e-4, checkpoint_every=10**9, workers=workers,
                      cpus_per_worker=threads, seed=len(list(storage.glob("*"))))
    summary = train(ModelSpec(task, size, settings=LAYOUT), lmdb_dir, storage / "model", cfg, storage)
    return [r["seconds"] for r in summary["train"]][:steps]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="caption", choices=("caption", "retrieval"))
    ap.add_argument("--size", default="small")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--gpu", action="store_true", help="also measure bf16 on one GPU (batch 128 by default)")
    ap.add_argument("--gpu-batch-size", type=int, default=128)
    ap.add_argument("--dir", type=Path, default=Path(__file__).parent / "out" / "train")
    args = ap.parse_args()

    import ray

    lmdb_dir = make_store(args.dir / "data", args.images)
    storage = args.dir / "ray"
    shutil.rmtree(storage, ignore_errors=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    b, w = args.batch_size, args.warmup
    plain, _ = plain_loop(args.task, args.size, lmdb_dir, b, args.steps, threads=2)
    one = ray_loop(args.task, args.size, lmdb_dir, b, args.steps, 1, 2, storage / "1x2")
    one_thread = ray_loop(args.task, args.size, lmdb_dir, b, args.steps, 1, 1, storage / "1x1")
    two = ray_loop(args.task, args.size, lmdb_dir, b, args.steps // 2, 2, 1, storage / "2x1")
    r_plain, r_one, r_one_thread, r_two = rate(plain, b, w), rate(one, b, w), rate(one_thread, b, w), \
        2 * rate(two, b, w)
    print(f"{args.task} model '{args.size}', batch {b}/worker, {args.steps} steps, CPU (2 cores):")
    print(f"  (a) plain PyTorch loop, 2 threads:      {r_plain:7.1f} samples/s")
    print(f"  (b) Ray Train, 1 worker x 2 threads:    {r_one:7.1f} samples/s  "
          f"overhead {100 * (1 - r_one / r_plain):+.1f}% (goal <= 10%)")
    print(f"  (c) Ray Train, 1 worker x 1 thread:     {r_one_thread:7.1f} samples/s")
    print(f"      Ray Train, 2 workers x 1 thread:    {r_two:7.1f} samples/s  "
          f"({r_two / r_one_thread:.2f}x one 1-thread worker, {r_two / r_one:.2f}x one 2-thread worker)")
    if args.gpu:
        if not torch.cuda.is_available():
            print("  (d) no GPU here")
        else:
            times, peak = plain_loop(args.task, args.size, lmdb_dir, args.gpu_batch_size, args.steps, 8, "cuda", True)
            print(f"  (d) {torch.cuda.get_device_name()}, bf16, batch {args.gpu_batch_size}: "
                  f"{rate(times, args.gpu_batch_size, w):7.1f} samples/s, peak memory {peak:.1f} GiB")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
