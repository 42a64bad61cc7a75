"""Benchmark: building and reading the LMDB store.

    python bench/lmdb_bench.py [--images 20000] [--texts-per-image 5] [--boxes 10] [--repeat 5]

1. Build, records/s (records = images + text-image pairs) and bytes, side by side in one
   run on the same Chinese-CLIP folder, interleaved, best of ``--repeat``, every build in
   a fresh process (so that no builder inherits another's heap):
   (a) Chinese-CLIP's ``build_lmdb_dataset.py`` as documented: one process, two envs
       (imgs, pairs) with a 1 TiB map, the image's base64 text as the value, a pickled
       ``(image_id, text_id, text)`` per pair, commit every 1000 images / 5000 pairs;
   (b) mmcn's ``build_lmdb`` with its defaults (one LMDB env per split) on the same images
       and texts (no features: like for like);
   (c) the same with ``shards`` = the cores of this machine, written in parallel.
   Goal (issue 4): mmcn >= 3x (a) records/s, and <= 0.8x its bytes.
2. mmcn's full store (features with ``--boxes`` boxes per image + Chinese tags): build
   records/s, and random reads in shuffled order in one fresh process of a whole training
   sample (image bytes + features, copied as the datasets do, + tags + text): the first pass and
   the best of ``--repeat``,
   with every record's XXH3 checksum checked (the default) and without (``verify=False``),
   the two interleaved pass by pass. Goal: >= 20k samples/s.

Data lives in ``--dir`` (default: RAM-backed /dev/shm) so that disk write-back does not
decide the result.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import pickle  # only to reproduce the baseline's documented format, never in mmcn
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import lmdb  # noqa: E402
import numpy as np  # noqa: E402
import pybase64  # noqa: E402
from PIL import Image  # noqa: E402

from mmcn.data import features as region_features  # noqa: E402
from mmcn.data import tsv  # noqa: E402
from mmcn.data.lmdb_build import LmdbConfig, build_lmdb  # noqa: E402
from mmcn.data.lmdb_store import LmdbStore  # noqa: E402
from mmcn.data.tags import ImageTags, tags_path, write_tags  # noqa: E402
from timing import timed  # noqa: E402  (bench/timing.py)

DEFAULT_DIR = Path("/dev/shm/mmcn-bench-lmdb") if Path("/dev/shm").is_dir() else Path(__file__).parent / "out" / "lmdb"
SPLIT = "train"


def make_dataset(root: Path, n: int, per_image: int, boxes: int, side: tuple[int, int], seed: int = 0) -> None:
    """A Chinese-CLIP folder (``n`` JPEGs, ``n * per_image`` texts), feature shards and tags."""
    marker = root / f".complete-{n}-{per_image}-{boxes}-{side[0]}-{side[1]}-{seed}"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    (root / "tsv").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    jpegs = []
    for k in range(200):  # distinct photo-like JPEGs, reused: the builders never look inside
        w, h = int(rng.integers(*side)), int(rng.integers(*side))
        arr = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        noise = rng.normal(0, 12, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(arr, np.float32) + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        jpegs.append(buf.getvalue())
    ids = [10_000_000 + 13 * i for i in range(n)]
    with tsv.TsvWriter(tsv.imgs_path(root / "tsv", SPLIT)) as w:
        for k, i in enumerate(ids):
            w.write(i, pybase64.b64encode(jpegs[k % len(jpegs)]))
    words = "一个 两只 红色的 蓝色的 小狗 男人 女人 汽车 在 草地上 街道上 奔跑 站着 旁边 有 桌子 上面 放着 杯子".split()
    texts = [tsv.Text(5_000_000 + t, "".join(rng.choice(words, int(rng.integers(6, 14)))), [ids[t // per_image]])
             for t in range(n * per_image)]
    tsv.write_texts(tsv.texts_path(root / "tsv", SPLIT), texts)
    shard, records, tags = 0, [], []
    pooled = rng.standard_normal((boxes, region_features.POOLED_DIM)).astype(np.float32)
    for k, i in enumerate(ids):
        b = np.tile(np.array([[4, 4, 60, 60]], np.float32), (boxes, 1))
        records.append(region_features.RegionFeatures(i, 128, 128, b, ["dog"] * boxes, np.full(boxes, 0.5, np.float32),
                                        region_features.region_features(pooled, b, 128, 128), [["brown"]] * boxes, [[0.8]] * boxes))
        tags.append(ImageTags(i, ["狗"] * boxes, [["棕色"]] * boxes, ["棕色 狗"] * boxes))
        if len(records) == 1024 or k == n - 1:
            region_features.write_shard(region_features.shard_path(root / "features", SPLIT, shard), records)
            shard, records = shard + 1, []
    write_tags(tags_path(root / "tags", SPLIT), tags)
    marker.touch()


def chinese_clip_build(tsv_dir: Path, out: Path) -> int:
    """Chinese-CLIP's build_lmdb_dataset.py, as its README and script document it."""
    env_img = lmdb.open(str(out / "imgs"), map_size=1024 ** 4)
    txn_img = env_img.begin(write=True)
    env_pairs = lmdb.open(str(out / "pairs"), map_size=1024 ** 4)
    txn_pairs = env_pairs.begin(write=True)
    pairs = []
    with open(tsv.texts_path(tsv_dir, SPLIT), encoding="utf-8") as fin:
        for line in fin:
            line = json.loads(line.strip())
            for image_id in line["image_ids"]:
                pairs.append((image_id, line["text_id"], line["text"]))
    write_idx = 0
    for pair in pairs:
        txn_pairs.put(key=f"{write_idx}".encode("utf-8"), value=pickle.dumps(pair))
        write_idx += 1
        if write_idx % 5000 == 0:
            txn_pairs.commit()
            txn_pairs = env_pairs.begin(write=True)
    txn_pairs.put(key=b"num_samples", value=f"{write_idx}".encode("utf-8"))
    txn_pairs.commit()
    env_pairs.close()
    write_idx = 0
    with open(tsv.imgs_path(tsv_dir, SPLIT), encoding="utf-8") as fin_imgs:
        for line in fin_imgs:
            image_id, b64 = line.strip().split("\t")
            txn_img.put(key=f"{image_id}".encode("utf-8"), value=b64.encode("utf-8"))
            write_idx += 1
            if write_idx % 1000 == 0:
                txn_img.commit()
                txn_img = env_img.begin(write=True)
    txn_img.put(key=b"num_images", value=f"{write_idx}".encode("utf-8"))
    txn_img.commit()
    env_img.close()
    return len(pairs) + write_idx


def size_of(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*.mdb"))


def build(builder: str, tsv_dir: Path, out: Path, shards: int = 1) -> float:
    """Seconds one build takes (run in a fresh process by :func:`in_fresh_process`)."""
    if builder == "chinese-clip":
        return timed(lambda: chinese_clip_build(tsv_dir, out))
    return timed(lambda: build_lmdb(tsv_dir, out / "lmdb", cfg=LmdbConfig(shards=shards)))


def random_reads(path: Path, reads: int, repeat: int) -> dict[bool, tuple[float, float]]:
    """``{verify: (first, best)}``: samples/s of shuffled whole-sample reads (image bytes,
    features, boxes, tags, text) with and without checksum checks, the first pass (the
    store's pages not yet mapped in this process; checked) and the best of ``repeat``
    passes (as in a later epoch), each pass in a new shuffled order, the two settings
    taking turns so that they meet the same machine state."""
    stores = {True: LmdbStore(path), False: LmdbStore(path, verify=False)}
    positions = stores[True].pair_positions  # (text position, image position) of every pair
    rng = np.random.default_rng(1)
    for i in rng.integers(0, len(positions), 1000).tolist():  # open the env, warm the interpreter
        stores[True].get(int(positions[i, 1]))
    rates = {True: [], False: []}
    for _ in range(repeat):
        for verify in (True, False):
            store = stores[verify]
            order = rng.integers(0, len(positions), reads).tolist()
            start = time.perf_counter()
            total = 0
            for i in order:
                text_pos, image_pos = positions[i].tolist()
                rec = store.get(image_pos)  # image bytes, features, boxes, classes, Chinese tags
                text = store.text_str(text_pos)
                features = np.array(rec.features)  # a copy, as the datasets' torch.tensor makes
                total += len(rec.image) + features.shape[0] + len(rec.tag_text) + len(text)
            rates[verify].append(reads / (time.perf_counter() - start))
    return {verify: (r[0], max(r)) for verify, r in rates.items()}


def in_fresh_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--texts-per-image", type=int, default=5)
    ap.add_argument("--boxes", type=int, default=10, help="boxes per image in the full store")
    ap.add_argument("--side", type=int, nargs=2, default=(256, 384), metavar=("MIN", "MAX"),
                    help="image sides in pixels (256-384: ~30 KB photo-like JPEGs; 96 160: ~6 KB thumbnails)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each build and read pass (the best counts)")
    ap.add_argument("--reads", type=int, default=50_000, help="random samples read")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args()

    root = args.dir
    t = timed(lambda: make_dataset(root, args.images, args.texts_per_image, args.boxes, tuple(args.side)))
    mb = tsv.imgs_path(root / "tsv", SPLIT).stat().st_size / 1e6
    print(f"dataset: {args.images} images of {args.side[0]}-{args.side[1]} px ({mb:.0f} MB of base64), {args.images * args.texts_per_image} texts, "
          f"{args.boxes} boxes/image in {root} (made in {t:.1f}s)")
    records = args.images + args.images * args.texts_per_image
    cores = len(os.sched_getaffinity(0))
    runs = {"(a) Chinese-CLIP build_lmdb_dataset": ("chinese-clip", 1),
            "(b) mmcn build_lmdb, 1 env per split": ("mmcn", 1),
            f"(c) mmcn build_lmdb, {cores} shards": ("mmcn", cores)}
    best = dict.fromkeys(runs, float("inf"))
    sizes = {}
    for _ in range(args.repeat):
        for name, (builder, shards) in runs.items():
            out = root / "out-build"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            best[name] = min(best[name], in_fresh_process(build, builder, root / "tsv", out, shards))
            sizes[name] = size_of(out)
    base = next(iter(runs))
    print(f"\n1. build, images + texts ({records} records = images + pairs), best of {args.repeat}, {cores} cores:")
    for name in runs:
        ratio = "" if name == base else (f"  {best[base] / best[name]:.2f}x faster, "
                                         f"{sizes[name] / sizes[base]:.2f}x the bytes")
        print(f"   {name:40s} {records / best[name]:9.0f} records/s, {sizes[name] / 1e6:7.1f} MB{ratio}")
    print("   goal: >= 3x faster, <= 0.8x the bytes")

    full = root / "out-full"
    shutil.rmtree(full, ignore_errors=True)
    seconds = timed(lambda: build_lmdb(root / "tsv", full, root / "features", root / "tags"))
    print(f"\n2. mmcn full store (+ features, {args.boxes} boxes, + tags): {records / seconds:.0f} records/s, "
          f"{size_of(full) / 1e6:.1f} MB, {seconds:.1f}s")
    rates = in_fresh_process(random_reads, full / SPLIT, args.reads, args.repeat)
    (first, best), (_, unchecked) = rates[True], rates[False]
    print(f"   random reads (image bytes + features + tags + text, shuffled, 1 process): first pass {first:,.0f}, "
          f"best of {args.repeat} {best:,.0f} samples/s (goal >= 20,000)")
    print(f"   without checksum checks (LmdbStore(verify=False)): best of {args.repeat} {unchecked:,.0f} samples/s; "
          f"the checks cost {100 * (1 - best / unchecked):.1f}% of the read rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
