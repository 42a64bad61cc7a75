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

Memory is bounded per actor, whatever the shard size and the photos' size (:class:`Batches`):
each image is decoded and at once resized to the network input (``Detector.prepare``), the
full-size original dropped; images wait in a small window for others of the same padded
network shape and go through the detector in batches of one shape, so no padding beyond the
detector's own: on CPU a batch gives each image the bytes it gets alone (tested; only an
image left with 3 boxes or fewer can differ, in the last bit, as BLAS takes another kernel
for so few rows). A batch holds at most ``batch_size`` images and as many as
``max_memory_mb`` allows by an estimate (input bytes x a per-architecture activation factor,
:data:`ACTIVATION_FACTOR`); when a forward's measured peak RSS still passes ``max_memory_mb``
the batches are halved. Records stream into the shard (:class:`mmcn.data.features.ShardWriter`)
in TSV order.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import resource
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

if TYPE_CHECKING:
    import torch

from mmcn import provenance
from mmcn.data import features as region_features
from mmcn.data import tsv
from mmcn.data.chain import read_chain, write_chain
from mmcn.data.image import decode_rgb
from mmcn.logs import Progress, setup_logging

log = logging.getLogger(__name__)

FINGERPRINT = "_fingerprint.json"
REPORT = "features_report.json"
# Peak activation memory of one image's detector forward on CPU, in bytes per byte of network
# input (padded pixels x 3 channels x 4 bytes), per DetectorConfig.name: measured by
# bench/features.py --photos (peak RSS of a batch-1 forward less the RSS before it, at 600x800
# for the real detectors: BUTD 389-410, VinVL 307-310, small 49-53 at 192x256 over runs; the
# RoI head on 300 proposals dominates the real detectors). Other architectures get the largest.
ACTIVATION_FACTOR = {"small": 50.0, "butd_r101_c4": 410.0, "vinvl_x152_c4": 310.0}
WINDOW = 2   # images wait for others of their network shape: at most WINDOW x the batch cap pending
# the settings that change only speed, memory or the device, not the features (left out of fingerprint)
SPEED_SETTINGS = ("workers", "use_gpu", "cpus_per_worker", "batch_size", "max_memory_mb")


@dataclass(frozen=True)
class ExtractConfig:
    """Extraction settings; checked when made (see :meth:`__post_init__`)."""

    min_boxes: int = 10
    max_boxes: int | None = None  # None: the detector's own (DetectorConfig.max_boxes: 100 for BUTD/VinVL)
    score_thresh: float = 0.2
    nms_thresh: float = 0.3
    batch_size: int = 8          # images per detector forward, at most (all of one network shape)
    max_memory_mb: int = 6144    # per actor: batches shrink to fit, by estimate and by measured peak RSS (0: off)
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
        if self.max_boxes is not None and (isinstance(self.max_boxes, bool) or not isinstance(self.max_boxes, int)):
            raise ValueError(f"max_boxes: {self.max_boxes!r} is not a whole number (or null: the detector's own)")
        if self.max_boxes is not None and self.max_boxes < self.min_boxes:
            raise ValueError(f"max_boxes: {self.max_boxes} is below min_boxes ({self.min_boxes}): raise max_boxes "
                             "or lower min_boxes (VinVL: 10 to 100)")
        if not 0 < self.score_thresh < 1:
            raise ValueError(f"score_thresh: {self.score_thresh} is not between 0 and 1 (exclusive): the confidence "
                             "a box needs beyond the first min_boxes (VinVL: 0.2)")
        if not 0 < self.nms_thresh <= 1:
            raise ValueError(f"nms_thresh: {self.nms_thresh} is not in (0, 1]: the overlap (IoU) above which the "
                             "less confident of two boxes of a class is dropped (VinVL: 0.3)")
        if self.max_memory_mb < 0:
            raise ValueError(f"max_memory_mb: {self.max_memory_mb} is below 0: the memory (MB) a detector actor "
                             "may use, batches shrink to fit it (0: no limit)")
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
    change only speed or memory (:data:`SPEED_SETTINGS`: ``workers``, ``cpus_per_worker``,
    ``batch_size``, ``max_memory_mb``; batches hold images of one network shape, so a batch's
    size does not change any image's features) or the device (``use_gpu``)."""
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
    settings = {k: v for k, v in asdict(cfg).items() if k not in SPEED_SETTINGS}
    return {"detector_sha256": digest.hexdigest(), "code": provenance.digests(provenance.code_files(__name__)),
            "inputs": inputs, "settings": settings}


def decode(data: bytes, cfg: ExtractConfig):
    """Bytes -> uint8 RGB tensor (3, H, W); raises ValueError(reason) for unusable images."""
    return decode_rgb(data, cfg.max_pixels, cfg.min_side)


class MemoryBudgetError(ValueError):
    """One image's detector forward alone does not fit ``features.max_memory_mb``."""


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MB; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _lifetime_peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2 ** 20 if os.uname().sysname == "Darwin" else peak / 1024


def rss_mb() -> float:
    """This process's resident memory now (MB; its peak where /proc is missing)."""
    now = _status_mb("VmRSS")
    return _lifetime_peak_mb() if now is None else now


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB) since :func:`reset_peak_rss` (or since it started)."""
    peak = _status_mb("VmHWM")
    return _lifetime_peak_mb() if peak is None else peak


def reset_peak_rss() -> None:
    """Start :func:`peak_rss_mb` afresh from the memory in use now (Linux; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


@dataclass
class _Pending:
    key: int         # the caller's (a TSV line, a list index), in arrival order: records come back with it
    image_id: int
    x: object        # the detector's NetInput: the image at network size, its original size and scale


class Batches:
    """Images in, region records out, with bounded memory (see the module docstring).

    :meth:`add` prepares an image for the network at once (the caller drops the original),
    keeps it until a batch of its padded network shape is full (``batch_size``, or fewer as
    ``max_memory_mb`` allows) or the window of pending images is, runs that batch and returns
    its ``(key, record)`` pairs; :meth:`finish` runs the rest. ``base_mb`` is the memory the
    process holds besides (the loaded detector: measured when the actor starts).
    """

    def __init__(self, model, cfg: ExtractConfig, device=None, base_mb: float | None = None):
        import torch

        self.model, self.cfg = model, cfg
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        name = model.config.name
        # on a GPU the activations are in device memory: the host holds the inputs only
        self.factor = (ACTIVATION_FACTOR.get(name, max(ACTIVATION_FACTOR.values()))
                       if self.device.type == "cpu" else 0.0)
        self.base_mb = rss_mb() if base_mb is None else base_mb
        self.max_batch = cfg.batch_size   # halved when the measured peak RSS passes max_memory_mb
        self.pending: dict[tuple[int, int], list[_Pending]] = {}
        self._told: set = set()  # what was logged already

    # ---- sizes and the memory estimate

    def shape(self, x) -> tuple[int, int]:
        """The padded network shape of a prepared image: images of one shape batch without padding."""
        h, w = int(x.tensor.shape[1]), int(x.tensor.shape[2])
        d = self.model.config.size_divisibility
        return ((h + d - 1) // d * d, (w + d - 1) // d * d) if d > 1 else (h, w)

    def estimate_mb(self, shape: tuple[int, int]) -> float:
        """Memory of one image of ``shape`` in a forward: its input plus the activations."""
        return shape[0] * shape[1] * 3 * 4 * (1 + self.factor) / 2 ** 20

    def held_mb(self, but: tuple[int, int] | None = None) -> float:
        """The pending images' inputs (MB), less those of shape ``but``."""
        return sum(p.x.tensor.nelement() * p.x.tensor.element_size()
                   for shape, group in self.pending.items() if shape != but for p in group) / 2 ** 20

    def cap(self, shape: tuple[int, int]) -> int:
        """Images of ``shape`` per forward: ``batch_size`` (halved after a peak over the limit), and
        no more than ``max_memory_mb`` leaves room for beyond the detector and the pending images."""
        if not self.cfg.max_memory_mb:
            return self.max_batch
        room = self.cfg.max_memory_mb - self.base_mb - self.held_mb(but=shape)
        fits = max(1, math.floor(room / self.estimate_mb(shape)))  # 1 always fits alone (checked by add)
        if fits < self.max_batch and (shape, fits) not in self._told:
            self._told.add((shape, fits))
            log.info("features: batches of %dx%d network input held to %d image(s) (about %.0f MB each; "
                     "features.max_memory_mb=%d, %.0f MB in use before detecting); batch_size is %d",
                     shape[1], shape[0], fits, self.estimate_mb(shape), self.cfg.max_memory_mb, self.base_mb,
                     self.cfg.batch_size)
        return min(self.max_batch, fits)

    # ---- streaming

    def add(self, key: int, image_id: int, image, name: str = "") -> list[tuple[int, region_features.RegionFeatures]]:
        """Take one image (uint8 RGB tensor or NetInput; ``name`` says where it came from, for
        errors); returns the records of the batches this completed."""
        x = self.model.prepare(image.to(self.device) if hasattr(image, "to") else image)
        shape = self.shape(x)
        if self.cfg.max_memory_mb and self.base_mb + self.estimate_mb(shape) > self.cfg.max_memory_mb:
            need = math.ceil((self.base_mb + self.estimate_mb(shape)) / 256) * 256
            raise MemoryBudgetError(
                f"image {image_id}{f' ({name})' if name else ''}: detecting it at {shape[1]}x{shape[0]} network input "
                f"needs about {self.estimate_mb(shape):.0f} MB ({self.model.config.name}) besides the "
                f"{self.base_mb:.0f} MB the detector actor holds, more than features.max_memory_mb="
                f"{self.cfg.max_memory_mb}: set features.max_memory_mb to {need} or more (0: no limit)")
        group = self.pending.setdefault(shape, [])
        group.append(_Pending(key, image_id, x))
        out = []
        if len(group) >= self.cap(shape):
            out += self._run(shape)
        while sum(len(g) for g in self.pending.values()) > WINDOW * self.max_batch:
            out += self._run(self._oldest())
        return out

    def finish(self) -> list[tuple[int, region_features.RegionFeatures]]:
        """Run every pending image; returns their records."""
        out = []
        while self.pending:
            out += self._run(self._oldest())
        return out

    def _oldest(self) -> tuple[int, int]:
        return min(self.pending, key=lambda shape: self.pending[shape][0].key)

    def _run(self, shape: tuple[int, int]) -> list[tuple[int, region_features.RegionFeatures]]:
        group = self.pending.pop(shape)
        n = min(len(group), self.cap(shape))
        chunk, rest = group[:n], group[n:]
        if rest:
            self.pending[shape] = rest
        cfg = self.cfg
        reset_peak_rss()
        dets = self.model.detect([p.x for p in chunk], min_boxes=cfg.min_boxes, max_boxes=cfg.max_boxes,
                                 score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh)
        peak = peak_rss_mb()  # of this forward
        if cfg.max_memory_mb and peak > cfg.max_memory_mb:
            if n > 1:
                self.max_batch = max(1, n // 2)
                log.warning("features: peak memory %.0f MB passed features.max_memory_mb=%d in a batch of %d "
                            "image(s) of %dx%d: batches of at most %d from now on", peak, cfg.max_memory_mb, n,
                            shape[1], shape[0], self.max_batch)
            elif "over at 1" not in self._told:
                self._told.add("over at 1")
                log.warning("features: peak memory %.0f MB passed features.max_memory_mb=%d with one image of %dx%d "
                            "per batch: raise features.max_memory_mb or run fewer workers", peak,
                            cfg.max_memory_mb, shape[1], shape[0])
        return [(p.key, to_record(self.model.config, p.image_id, det)) for p, det in zip(chunk, dets)]


class ShardExtractor:
    """A Ray Data actor: loads the detector once, turns shard tasks into Parquet shards."""

    def __init__(self, detector_dir: str, tsv_dir: str, out_dir: str, cfg: dict):
        import torch

        from mmcn.vision.detector import load_detector

        self.cfg = ExtractConfig(**cfg)
        self.device = torch.device("cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_detector(detector_dir).to(self.device).eval()
        self.tsv_dir, self.out_dir = Path(tsv_dir), Path(out_dir)
        setup_logging()  # this actor's progress lines (Progress) reach the driver's log through Ray
        self.base_mb = rss_mb()  # the detector loaded: what the actor holds besides a shard's work

    def __call__(self, batch: dict) -> dict:
        for split, index, start, stop in zip(batch["split"], batch["index"], batch["start"], batch["stop"]):
            self.run(ShardTask(str(split), int(index), int(start), int(stop)))
        return {"images": np.asarray(batch["stop"]) - np.asarray(batch["start"])}  # TSV lines done, for the driver

    def run(self, task: ShardTask) -> dict:
        """Extract one shard; its stats (images, boxes, skipped inputs with reasons) are written
        inside it (read back by :func:`shard_stats`) and returned. Images are decoded one at a
        time and dropped once prepared (:class:`Batches`); records reach the shard in TSV order."""
        import torch

        reader = tsv.TsvReader(tsv.imgs_path(self.tsv_dir, task.split))
        batches = Batches(self.model, self.cfg, self.device, self.base_mb)
        skipped, done, images, boxes = [], {}, 0, 0
        next_line = task.start
        path = region_features.shard_path(self.out_dir, task.split, task.index)
        bar = Progress(task.stop - task.start, f"features {task.split} shard {task.index}", "img", log,
                       tenths=False, final=False)  # a line every 30 s: slow shards (big photos on CPU)
        with torch.no_grad(), region_features.ShardWriter(path) as shard, bar:
            def put(results: Iterable[tuple[int, region_features.RegionFeatures | None]]) -> None:
                nonlocal next_line, images, boxes
                done.update(results)
                while next_line in done:  # write what is complete up to the first line still pending
                    record = done.pop(next_line)
                    if record is not None:
                        shard.write([record])
                        images, boxes = images + 1, boxes + record.num_boxes
                    next_line += 1
                    bar.update()

            for line in range(task.start, task.stop):
                image_id, data = reader[line]
                try:
                    image = decode(data, self.cfg)
                except ValueError as e:
                    skipped.append({"split": task.split, "image_id": image_id, "line": line + 1, "reason": str(e)})
                    put([(line, None)])
                    continue
                del data
                put(batches.add(line, image_id, image, name=f"{task.split} line {line + 1}"))
                del image  # only the network-size copy stays (in batches)
            put(batches.finish())
            stats = {"split": task.split, "index": task.index, "images": images, "skipped": skipped,
                     "boxes": int(boxes)}
            shard.finish(stats)
        return stats


def detect_regions(model, images: list[tuple[int, torch.Tensor]], cfg: ExtractConfig,
                   device=None) -> list[tuple[int, region_features.RegionFeatures]]:
    """``(image_id, uint8 RGB tensor or NetInput)`` pairs -> ``(image_id, region features)``,
    detected in batches of one network shape (:class:`Batches`); output in completion order."""
    batches = Batches(model, cfg, device)
    out = []
    for k, (image_id, img) in enumerate(images):
        out += [(images[i][0], rec) for i, rec in batches.add(k, image_id, img)]
    return out + [(images[i][0], rec) for i, rec in batches.finish()]


def to_record(config, image_id: int, det) -> region_features.RegionFeatures:
    """One image's detections (``config``: the detector's, for its label vocabularies) as region features."""
    height, width = (int(v) for v in det.image_size)
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
        try:
            with Progress(sum(t.stop - t.start for t in todo), "features", "img", log, warmup=len(todo) > 1) as bar:
                for done in ds.iter_batches(batch_size=None, batch_format="numpy"):  # the actors write the shards
                    bar.update(int(done["images"].sum()))  # per finished shard; the actors log within a shard
        except Exception as e:  # Ray wraps an actor's error in its own, the actor's traceback in its text
            found = re.search(rf"{MemoryBudgetError.__name__}: (.+)", str(e))
            if found:
                raise MemoryBudgetError(found.group(1)) from None
            raise
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
