"""Region-feature extraction over Chinese-CLIP TSVs with Ray Data: detector actors, one
Parquet shard per task, resumable.

Each split's images (in TSV order) are cut into shards of ``shard_size`` images. A shard
is one Ray Data row; an actor pool of ``workers`` detectors (one GPU each when asked
for, CPU otherwise) turns it into a Parquet shard written atomically through
:mod:`mmcn.data.features`. Shards already on disk are skipped, so a killed run restarted
on the same inputs continues where it stopped and ends with the same bytes. Shards are
reused only when ``_fingerprint.json`` (see :func:`fingerprint`: detector files, the code
that extracts, the input TSVs' content, the settings that change results) matches this
run's; on a mismatch the folder is cleared first and every shard is extracted again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from mmcn import provenance
from mmcn.data import features as region_features
from mmcn.data import tsv
from mmcn.data.chain import read_chain, write_chain
from mmcn.data.image import decode_rgb

log = logging.getLogger(__name__)

FINGERPRINT = "_fingerprint.json"
REPORT = "features_report.json"


@dataclass(frozen=True)
class ExtractConfig:
    min_boxes: int = 10
    max_boxes: int = 100
    score_thresh: float = 0.2
    nms_thresh: float = 0.3
    batch_size: int = 8          # images per detector forward (grouped by similar size)
    shard_size: int = 256        # images per Parquet shard (the unit of resumption)
    workers: int = 1             # detector actors
    use_gpu: bool = False        # one GPU per actor (when the cluster has GPUs)
    cpus_per_worker: float = 1.0
    min_side: int = 8            # smaller images are skipped ("too_small")
    max_pixels: int = 89_478_485


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    start: int   # first TSV line (0-based)
    stop: int


def plan(tsv_dir: Path, shard_size: int) -> list[ShardTask]:
    """Every split's shards, in a deterministic order."""
    tasks = []
    for split in tsv.splits_in(tsv_dir):
        n = len(tsv.TsvReader(tsv.imgs_path(tsv_dir, split)))
        tasks += [ShardTask(split, k, s, min(s + shard_size, n)) for k, s in enumerate(range(0, n, shard_size))]
    return tasks


def fingerprint(detector_dir: Path, tsv_dir: Path, cfg: ExtractConfig) -> dict:
    """What the shards of a run are made from: the detector folder's files (SHA-256), the code
    that extracts (XXH3-128 of every mmcn file this module runs, from
    :func:`mmcn.provenance.code_files`, the same walk that checks dvc.yaml's deps), the
    content of each ``{split}_imgs.tsv`` (XXH3-128 and size) and the settings, less those that
    change only speed (``workers``, ``cpus_per_worker``) or the device (``use_gpu``)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(detector_dir)):
        path = Path(detector_dir) / name
        if path.is_file():
            digest.update(name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    inputs = {path.name: provenance.checksum(path)
              for path in (tsv.imgs_path(tsv_dir, split) for split in tsv.splits_in(tsv_dir))}
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("workers", "use_gpu", "cpus_per_worker")}
    return {"detector_sha256": digest.hexdigest(), "code": provenance.digests(provenance.code_files(__name__)),
            "inputs": inputs, "settings": settings}


def decode(data: bytes, cfg: ExtractConfig):
    """Bytes -> uint8 RGB tensor (3, H, W); raises ValueError(reason) for unusable images."""
    return decode_rgb(data, cfg.max_pixels, cfg.min_side)


class ShardExtractor:
    """A Ray Data actor: loads the detector once, turns shard tasks into Parquet shards."""

    def __init__(self, detector_dir: str, tsv_dir: str, out_dir: str, cfg: dict):
        import torch

        from mmcn.vision.detector import load_detector

        self.cfg = ExtractConfig(**cfg)
        self.device = torch.device("cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_detector(detector_dir).to(self.device).eval()
        self.tsv_dir, self.out_dir = Path(tsv_dir), Path(out_dir)

    def __call__(self, batch: dict) -> dict:
        stats = []
        for split, index, start, stop in zip(batch["split"], batch["index"], batch["start"], batch["stop"]):
            stats.append(json.dumps(self.run(ShardTask(str(split), int(index), int(start), int(stop)))))
        return {"stats": np.array(stats, dtype=object)}

    def run(self, task: ShardTask) -> dict:
        reader = tsv.TsvReader(tsv.imgs_path(self.tsv_dir, task.split))
        images, skipped = [], []
        for line in range(task.start, task.stop):
            image_id, data = reader[line]
            try:
                images.append((image_id, decode(data, self.cfg)))
            except ValueError as e:
                skipped.append({"split": task.split, "image_id": image_id, "line": line + 1, "reason": str(e)})
        records = dict(detect_regions(self.model, images, self.cfg, self.device))
        region_features.write_shard(region_features.shard_path(self.out_dir, task.split, task.index),
                      [records[image_id] for image_id, _ in images])
        return {"split": task.split, "index": task.index, "images": len(images), "skipped": skipped,
                "boxes": int(sum(r.num_boxes for r in records.values()))}


def detect_regions(model, images: list[tuple[int, torch.Tensor]], cfg: ExtractConfig,
                   device=None) -> list[tuple[int, region_features.RegionFeatures]]:
    """``(image_id, uint8 RGB tensor)`` pairs -> ``(image_id, region features)``, detected in
    batches of similar size (sorted by height, width) to limit padding; output in that order."""
    device = device or next(model.parameters()).device
    order = sorted(range(len(images)), key=lambda i: tuple(images[i][1].shape[1:]))
    out = []
    for first in range(0, len(order), cfg.batch_size):
        chunk = [images[i] for i in order[first:first + cfg.batch_size]]
        dets = model.detect([img.to(device) for _, img in chunk], min_boxes=cfg.min_boxes, max_boxes=cfg.max_boxes,
                            score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh)
        for (image_id, img), det in zip(chunk, dets):
            out.append((image_id, to_record(model.config, image_id, img, det)))
    return out


def to_record(config, image_id: int, img, det) -> region_features.RegionFeatures:
    """One image's detections (``config``: the detector's, for its label vocabularies) as region features."""
    height, width = int(img.shape[1]), int(img.shape[2])
    boxes = det.boxes.float().cpu().numpy()
    attr_ids, attr_scores = det.attr_ids.cpu().tolist(), det.attr_scores.float().cpu().tolist()
    return region_features.RegionFeatures(
        image_id=image_id, width=width, height=height, boxes=boxes,
        classes=[config.classes[int(i)] for i in det.labels.cpu()],
        class_conf=det.scores.float().cpu().numpy(),
        features=region_features.region_features(det.features.float().cpu().numpy(), boxes, width, height),
        attributes=[[config.attributes[a] for a in ids if a >= 0] for ids in attr_ids],
        attr_conf=[[s for a, s in zip(ids, scores) if a >= 0] for ids, scores in zip(attr_ids, attr_scores)])


def extract_features(detector_dir: Path, tsv_dir: Path, out_dir: Path, cfg: ExtractConfig = ExtractConfig()) -> dict:
    """Write every split's feature shards into ``out_dir`` (resuming), plus a report; returns it.

    Ray must be initialised by the caller (``ray.init``) or is started locally by Ray Data.
    """
    import ray

    detector_dir, tsv_dir, out_dir = Path(detector_dir).resolve(), Path(tsv_dir).resolve(), Path(out_dir).resolve()
    start = time.perf_counter()
    mark = fingerprint(detector_dir, tsv_dir, cfg)
    previous = out_dir / FINGERPRINT
    if out_dir.exists() and (not previous.is_file() or json.loads(previous.read_text()) != mark):
        log.info("%s holds shards from other inputs, code or settings: starting afresh", out_dir)
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(mark, indent=2) + "\n")
    write_chain(out_dir, read_chain(tsv_dir), "features",
                {k: v for k, v in mark["settings"].items() if k != "shard_size"})

    tasks = plan(tsv_dir, cfg.shard_size)
    todo = [t for t in tasks if not region_features.shard_path(out_dir, t.split, t.index).is_file()]
    log.info("features: %d shards, %d already done, %d to extract with %d worker(s)", len(tasks),
             len(tasks) - len(todo), len(todo), cfg.workers)
    stats = []
    if todo:
        ds = ray.data.from_items([asdict(t) for t in todo])
        ds = ds.map_batches(ShardExtractor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.workers),
                            num_gpus=1 if cfg.use_gpu else 0, num_cpus=cfg.cpus_per_worker,
                            fn_constructor_kwargs={"detector_dir": str(detector_dir), "tsv_dir": str(tsv_dir),
                                                   "out_dir": str(out_dir), "cfg": asdict(cfg)})
        stats = [json.loads(row["stats"]) for row in ds.iter_rows()]
    report = _report(out_dir, tasks, stats)
    log.info("features done in %.0fs: %s", time.perf_counter() - start,
             {s: (c["images"], c["skipped"]) for s, c in report["splits"].items()})
    return report


def _report(out_dir: Path, tasks: list[ShardTask], new_stats: list[dict]) -> dict:
    """Merge this run's shard stats with those of earlier (resumed) runs into the report."""
    path = out_dir / REPORT
    done = {f"{s['split']}/{s['index']}": s for s in (json.loads(path.read_text())["shards"] if path.is_file() else [])}
    done.update({f"{s['split']}/{s['index']}": s for s in new_stats})
    shards = [done[f"{t.split}/{t.index}"] for t in tasks if f"{t.split}/{t.index}" in done]
    splits: dict[str, dict] = {}
    for s in shards:
        c = splits.setdefault(s["split"], {"images": 0, "boxes": 0, "skipped": 0})
        c["images"] += s["images"]
        c["boxes"] += s["boxes"]
        c["skipped"] += len(s["skipped"])
    report = {"splits": splits, "skipped": [k for s in shards for k in s["skipped"]], "shards": shards}
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report
