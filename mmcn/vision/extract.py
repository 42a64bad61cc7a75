"""Region-feature extraction over Chinese-CLIP TSVs with Ray Data: detector actors, one
Parquet shard per task, resumable.

Each split's images (in TSV order) are cut into shards of ``shard_size`` images. A shard
is one Ray Data row; an actor pool of ``workers`` detectors (one GPU each when asked
for, CPU otherwise) turns it into a Parquet shard written atomically through
:mod:`mmcn.data.features`, with its stats (images, boxes, skipped inputs and why) inside.
Whole shards already on disk are kept (a truncated or inconsistent one is extracted again)
and the report is rebuilt from all shards' stats, so a killed run restarted on the same
inputs continues where it stopped and ends with the same bytes, report included. Shards
are reused only when ``_fingerprint.json`` (see :func:`fingerprint`: detector files, the
code that extracts, the input TSVs' content, the settings that change results) matches
this run's; on a mismatch the folder is cleared first and every shard is extracted again.
Settings are checked by :class:`ExtractConfig` and inputs before anything is cleared.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
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
    """Extraction settings; checked when made (see :meth:`__post_init__`)."""

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

    def __post_init__(self) -> None:
        """Refuse settings that cannot work (wrong type, out of range, contradicting another)
        with a ValueError whose message starts with the field's name: ``"workers: 0 is below 1 ..."``."""
        for f in fields(self):
            value, kind = getattr(self, f.name), f.type  # a string: annotations are postponed
            if kind == "bool" and not isinstance(value, bool):
                raise ValueError(f"{f.name}: {value!r} is not true or false")
            if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{f.name}: {value!r} is not a whole number")
            if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{f.name}: {value!r} is not a number"
                                 + (" (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) else ""))
        for name, meaning in (("min_boxes", "boxes kept per image, at least"),
                              ("batch_size", "images per detector forward"), ("shard_size", "images per shard"),
                              ("workers", "detector actors"), ("min_side", "pixels; smaller images are skipped")):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} is below 1 ({meaning}): set 1 or more")
        if self.max_boxes < self.min_boxes:
            raise ValueError(f"max_boxes: {self.max_boxes} is below min_boxes ({self.min_boxes}): raise max_boxes "
                             "or lower min_boxes (VinVL: 10 to 100)")
        if not 0 < self.score_thresh < 1:
            raise ValueError(f"score_thresh: {self.score_thresh} is not between 0 and 1 (exclusive): the confidence "
                             "a box needs beyond the first min_boxes (VinVL: 0.2)")
        if not 0 < self.nms_thresh <= 1:
            raise ValueError(f"nms_thresh: {self.nms_thresh} is not in (0, 1]: the overlap (IoU) above which the "
                             "less confident of two boxes of a class is dropped (VinVL: 0.3)")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker: {self.cpus_per_worker} is not above 0: the CPUs Ray reserves "
                             "per detector actor")
        if self.max_pixels < self.min_side ** 2:
            raise ValueError(f"max_pixels: {self.max_pixels} is below min_side squared ({self.min_side ** 2}): "
                             "every image would be skipped; raise max_pixels")


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
        for split, index, start, stop in zip(batch["split"], batch["index"], batch["start"], batch["stop"]):
            self.run(ShardTask(str(split), int(index), int(start), int(stop)))
        return {"done": np.ones(len(batch["split"]), dtype=bool)}

    def run(self, task: ShardTask) -> dict:
        """Extract one shard; its stats (images, boxes, skipped inputs with reasons) are written
        inside it (read back by :func:`shard_stats`) and returned."""
        reader = tsv.TsvReader(tsv.imgs_path(self.tsv_dir, task.split))
        images, skipped = [], []
        for line in range(task.start, task.stop):
            image_id, data = reader[line]
            try:
                images.append((image_id, decode(data, self.cfg)))
            except ValueError as e:
                skipped.append({"split": task.split, "image_id": image_id, "line": line + 1, "reason": str(e)})
        records = dict(detect_regions(self.model, images, self.cfg, self.device))
        stats = {"split": task.split, "index": task.index, "images": len(images), "skipped": skipped,
                 "boxes": int(sum(r.num_boxes for r in records.values()))}
        region_features.write_shard(region_features.shard_path(self.out_dir, task.split, task.index),
                                    [records[image_id] for image_id, _ in images], stats=stats)
        return stats


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

    The inputs are checked before anything in ``out_dir`` is touched. Shards already there
    are kept when :func:`shard_stats` finds nothing wrong, extracted again otherwise (logged);
    the report is rebuilt from the stats inside all shards, so a killed and resumed run ends
    with the same bytes as an uninterrupted one. Ray must be initialised by the caller
    (``ray.init``) or is started locally by Ray Data.
    """
    import ray

    from mmcn.vision.detector import CONFIG_FILE, WEIGHTS_FILE

    detector_dir, tsv_dir, out_dir = Path(detector_dir).resolve(), Path(tsv_dir).resolve(), Path(out_dir).resolve()
    start = time.perf_counter()
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (detector_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{detector_dir}: no detector ({', '.join(missing)} missing): train or convert "
                                "one first (the detector stage, or save_detector)")
    tsv.check_complete(tsv_dir)
    tasks = plan(tsv_dir, cfg.shard_size)
    mark = fingerprint(detector_dir, tsv_dir, cfg)
    previous = out_dir / FINGERPRINT
    if out_dir.exists() and (not previous.is_file() or json.loads(previous.read_text()) != mark):
        log.info("%s holds shards from other inputs, code or settings: starting afresh", out_dir)
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(mark, indent=2) + "\n")
    write_chain(out_dir, read_chain(tsv_dir), "features",
                {k: v for k, v in mark["settings"].items() if k != "shard_size"})
    for path in region_features.remove_stale_temps(out_dir):
        log.info("features: removed %s, left by a writer that was killed", path)

    todo = []
    for task in tasks:
        path = region_features.shard_path(out_dir, task.split, task.index)
        if path.exists():
            try:
                shard_stats(path, task)
                continue
            except ValueError as e:
                log.warning("features: %s: extracting it again", e)
        todo.append(task)
    log.info("features: %d shards, %d already done, %d to extract with %d worker(s)", len(tasks),
             len(tasks) - len(todo), len(todo), cfg.workers)
    if todo:
        ds = ray.data.from_items([asdict(t) for t in todo])
        ds = ds.map_batches(ShardExtractor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.workers),
                            num_gpus=1 if cfg.use_gpu else 0, num_cpus=cfg.cpus_per_worker,
                            fn_constructor_kwargs={"detector_dir": str(detector_dir), "tsv_dir": str(tsv_dir),
                                                   "out_dir": str(out_dir), "cfg": asdict(cfg)})
        ds.materialize()  # runs the actors: their output is the shards on disk
    report = _report(out_dir, tasks)
    log.info("features done in %.0fs: %s", time.perf_counter() - start,
             {s: (c["images"], c["skipped"]) for s, c in report["splits"].items()})
    return report


def shard_stats(path: Path, task: ShardTask) -> dict:
    """The stats stored in the shard of ``task`` at ``path``, once its Parquet footer (row count)
    agrees with them and with the task's TSV lines (images written + images skipped). Raises
    ValueError("<path> <what is wrong>") for a missing, truncated or foreign shard."""
    try:
        rows, stats = region_features.read_footer(path)
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(stats, dict) or not isinstance(stats.get("skipped"), list) \
            or not isinstance(stats.get("boxes"), int):
        raise ValueError(f"{path} has no extraction stats in its metadata (not written by this extraction)")
    if (stats.get("split"), stats.get("index")) != (task.split, task.index):
        raise ValueError(f"{path} holds the stats of shard {stats.get('split')}/{stats.get('index')}")
    skipped, lines = len(stats["skipped"]), task.stop - task.start
    if stats.get("images") != rows or rows + skipped != lines:
        raise ValueError(f"{path} has {rows} rows, stats of {stats.get('images')} images and {skipped} skipped, "
                         f"for {lines} TSV lines")
    return stats


def _report(out_dir: Path, tasks: list[ShardTask]) -> dict:
    """The report of all shards, from the stats stored in each, written to ``out_dir/{REPORT}``."""
    shards = []
    for task in tasks:
        try:
            shards.append(shard_stats(region_features.shard_path(out_dir, task.split, task.index), task))
        except ValueError as e:
            raise RuntimeError(f"features: {e} after extraction: run it again to redo that shard") from e
    splits: dict[str, dict] = {}
    for s in shards:
        c = splits.setdefault(s["split"], {"images": 0, "boxes": 0, "skipped": 0})
        c["images"] += s["images"]
        c["boxes"] += s["boxes"]
        c["skipped"] += len(s["skipped"])
    report = {"splits": splits, "skipped": [k for s in shards for k in s["skipped"]], "shards": shards}
    (out_dir / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report
