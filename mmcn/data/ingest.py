"""Ingest: the raw layout, or an existing Chinese-CLIP dataset folder, into validated
Chinese-CLIP files (``{split}_imgs.tsv`` + ``{split}_imgs.lineidx``, ``{split}_texts.jsonl``), an image
manifest per split and ``ingest_report.json``.

Ids are derived from content, so the same input always gives the same ids and bytes:
an image's id is the first 48 bits of the sha256 of its original bytes (identical files
share one id, the duplicate is reported and its captions merged onto the kept image); a
text's id is the first 48 bits of the sha256 of its UTF-8 text (identical captions in a
split become one text whose ``image_ids`` lists every image it describes). Ids of a
Chinese-CLIP folder are kept as they are; an image id must be a signed 64-bit integer in
canonical decimal form (:func:`parse_image_id`), a text's ids signed 64-bit integers.

Bad input never aborts the run: every skipped file, line, caption or object is recorded in
the report with its file, line and reason (a file name that is not UTF-8 shown with
backslash escapes). After the outputs and report are written, a split that had input but
kept no image (or none of its captions), or a dataset with no image at all, is an error
naming the top skip reasons (:class:`IngestError`); ``strict`` turns any skip into one.

Boxes (raw layout ``objects``) are in pixels of the picture as displayed, EXIF orientation
applied (:mod:`mmcn.data.image`), and so is the width x height in the manifest.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import logging
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pybase64

from mmcn.data import image as imagelib
from mmcn.data import raw, tsv
from mmcn.data.manifest import ManifestEntry, manifest_path, write_manifest
from mmcn.data.chain import write_chain
from mmcn.data.ingest_report import IngestReport, Skip, printable
from mmcn.data.jsonl import loads
from mmcn.data.outputs import pid_alive, replace_folder
from mmcn.logs import Progress

log = logging.getLogger(__name__)

REPORT_FILE = "ingest_report.json"
UNLISTED_POLICIES = ("skip", "include")
_WINDOW = 1024  # tasks in flight at once: bounds memory when payloads are whole images


@dataclass(frozen=True)
class IngestConfig:
    """How to ingest. ``max_side`` None/0 keeps every file's bytes untouched; a number
    re-encodes every image as an RGB JPEG (EXIF orientation applied) no larger than that."""

    max_side: int | None = None
    strict: bool = False
    workers: int = 2
    full_decode: bool = False
    max_pixels: int = imagelib.DEFAULT_MAX_PIXELS
    unlisted: str = "skip"
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        """Ranges and choices; messages start with the field (``mmcn.settings`` names the param)."""
        if self.unlisted not in UNLISTED_POLICIES:
            raise ValueError(f"unlisted: must be one of {', '.join(UNLISTED_POLICIES)}, got {self.unlisted!r}")
        if self.max_side is not None and self.max_side < 0:
            raise ValueError(f"max_side: must be empty (keep the original bytes) or positive, got {self.max_side}")
        if not self.max_pixels >= 1:
            raise ValueError(f"max_pixels: must be >= 1 (0 would skip every image as a decompression bomb), "
                             f"got {self.max_pixels}; PIL's own limit is {imagelib.DEFAULT_MAX_PIXELS}")
        if not self.workers >= 1:
            raise ValueError(f"workers: must be >= 1 (decode processes), got {self.workers}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality: must be in [1, 100], got {self.jpeg_quality}")


class IngestError(RuntimeError):
    """The outputs and report are written but unusable: a split that had input kept no image
    (or none of its captions), no split holds an image, or (strict mode) anything was skipped.
    The message names the top skip reasons and the report; ``report`` is the report."""

    def __init__(self, message: str, report: IngestReport):
        super().__init__(message)
        self.report = report

    @classmethod
    def strict(cls, report: IngestReport, out: Path) -> "IngestError":
        lines = "\n".join(f"  {s}" for s in report.skips[:50])
        more = f"\n  … and {len(report.skips) - 50} more" if len(report.skips) > 50 else ""
        return cls(f"strict ingest: {len(report.skips)} input(s) skipped (full list in "
                   f"{printable(out / REPORT_FILE)}):\n{lines}{more}\n"
                   "Fix or remove these inputs, or run without strict to skip them.", report)

    @classmethod
    def unusable(cls, report: IngestReport, out: Path, problems: list[str]) -> "IngestError":
        lines = "\n".join(f"  {p}" for p in problems)
        return cls(f"ingest of {report.source} ({report.source_format}) gave no usable data:\n{lines}\n"
                   f"Every skipped input with its file, line and reason is in {printable(out / REPORT_FILE)}; fix "
                   "those inputs (or point ingest.src / --src at the right folder) and rerun.", report)


def content_id(data: bytes) -> int:
    """A stable 48-bit integer id (exact in JSON and JavaScript) from content bytes."""
    return int.from_bytes(hashlib.sha256(data).digest()[:6], "big")


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_CANONICAL_INT = re.compile(rb"(0|-?[1-9][0-9]*)")


def parse_image_id(key: bytes) -> int | str:
    """The image id of a ``{split}_imgs.tsv`` key, or why it is not one.

    Chinese-CLIP keeps the key as a string and finds an image by ``str(image_id)`` of the int in
    ``{split}_texts.jsonl``, so only the canonical decimal form can ever match: digits with an
    optional ``-``, and none of the ``+``, leading zeros, spaces or ``_`` that Python's ``int``
    also takes; and the id must fit a signed 64-bit integer (the LMDB and Arrow columns).
    """
    shown = _shorten(key.decode("utf-8", "backslashreplace"))
    if not _CANONICAL_INT.fullmatch(key):
        try:
            value = int(key)
        except ValueError:
            return f"image id {shown!r} is not an integer"
        return (f"image id {shown!r} is not in canonical form: write it {_shorten(str(value))} (Chinese-CLIP "
                "matches ids as text, so no '+', leading zeros, spaces or '_')")
    if len(key) > 20 or not INT64_MIN <= int(key) <= INT64_MAX:  # 20: "-" and int64's 19 digits
        return f"image id {shown} is outside the signed 64-bit range"
    return int(key)


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


# --------------------------------------------------------------------------- worker side
# Workers never send image bytes back: they append base64 payloads to a shard file of their
# own and return where it lies; the driver copies that byte range into the TSV inside the
# kernel. A Chinese-CLIP payload that needs no re-encoding is copied straight from its
# source TSV. Pickling whole images through pipes would cost more than the work itself.
@dataclass(frozen=True)
class _Task:
    path: str                   # an image file (raw layout) or the source TSV (Chinese-CLIP)
    offset: int = 0             # TSV only: the base64 payload's byte range in ``path``
    length: int = -1            # -1: ``path`` is an image file, read whole
    boxes: tuple = ()


@dataclass
class _Result:
    error: tuple[str, str] | None = None      # (reason, detail)
    sha256: str = ""
    payload: bytes | tuple[str, int, int] = b""  # base64 payload, or where it lies: (file, offset, length)
    info: imagelib.ImageInfo | None = None
    boxes: list = field(default_factory=list)


class _Shard:
    """An append-only file of base64 payloads written by one process."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, f"shard-{os.getpid()}-{id(self):x}.b64")
        self._f = open(self.path, "ab", buffering=0)
        self._pos = 0

    def put(self, payload: bytes) -> tuple[str, int, int]:
        offset = self._pos
        self._pos += self._f.write(payload)
        return self.path, offset, len(payload)


def _process(task: _Task, cfg: IngestConfig, shard: _Shard | None = None) -> _Result:
    """Read, hash, validate (or re-encode) one image; the payload goes to ``shard`` if given."""
    urlsafe = False  # a url-safe base64 payload is stored re-encoded in the standard alphabet
    try:
        if task.length < 0:
            data = Path(task.path).read_bytes()
        else:
            text = tsv.read_range(task.path, task.offset, task.length)
            data, urlsafe = tsv.decode_b64(text), tsv.is_urlsafe_b64(text)
    except OSError as e:
        return _Result(error=("unreadable", f"{type(e).__name__}: {e.strerror or e}"))
    except ValueError as e:
        return _Result(error=("bad_base64", str(e)))
    sha = hashlib.sha256(data).hexdigest()
    boxes = [list(b) for b in task.boxes]
    try:
        if cfg.max_side:
            data, info, boxes = imagelib.normalize(data, boxes, max_side=cfg.max_side, quality=cfg.jpeg_quality,
                                                   max_pixels=cfg.max_pixels)
            payload = pybase64.b64encode(data)
        else:
            info = imagelib.inspect(data, max_pixels=cfg.max_pixels, full_decode=cfg.full_decode)
            payload = (pybase64.b64encode(data) if task.length < 0 or urlsafe
                       else (task.path, task.offset, task.length))
    except imagelib.ImageError as e:
        return _Result(error=(e.reason, e.detail))
    if shard is not None and isinstance(payload, bytes):
        payload = shard.put(payload)
    return _Result(sha256=sha, payload=payload, info=info, boxes=boxes)


_worker: tuple[IngestConfig, _Shard] | None = None


def _init_worker(cfg: IngestConfig, shard_dir: str) -> None:
    global _worker
    _worker = (cfg, _Shard(shard_dir))


def _process_in_worker(task: _Task) -> _Result:
    return _process(task, *_worker)


def _pool_context():
    """``fork`` (starts in milliseconds) where it is safe: Linux, and no other thread alive
    that a child could inherit mid-operation (tqdm's idle monitor thread aside: children
    never touch tqdm); ``spawn`` otherwise (about 0.4 s per worker)."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and t.name != "tqdm_monitor"]
    if sys.platform.startswith("linux") and not others:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


class _Runner:
    """Runs tasks in input order: on a pool of ``workers`` processes, or in-process for 1."""

    def __init__(self, cfg: IngestConfig, shard_dir: Path):
        self.cfg = cfg
        shard_dir.mkdir(parents=True, exist_ok=True)
        self.pool = (_pool_context().Pool(cfg.workers, _init_worker, (cfg, str(shard_dir)))
                     if cfg.workers > 1 else None)

    def map(self, tasks: Iterable[_Task], total: int, desc: str) -> Iterator[_Result]:
        bar = Progress(total, desc, "img", log)  # a bar on a terminal, log lines otherwise
        it = iter(tasks)
        while window := list(itertools.islice(it, _WINDOW)):
            results = (self.pool.imap(_process_in_worker, window, chunksize=16) if self.pool is not None
                       else (_process(t, self.cfg) for t in window))
            for r in results:
                bar.update(1)
                yield r
        bar.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


# --------------------------------------------------------------------------- driver side
@dataclass
class _Image:
    entry: ManifestEntry
    captions: list[str]


class _SplitWriter:
    """Collects one split's images and texts, dedupes by content, writes the four files."""

    def __init__(self, out: Path, split: str, report: IngestReport, seen_elsewhere: dict[str, tuple[str, str]]):
        self.out, self.split, self.report = out, split, report
        self.counts = report.counts(split)
        self.tsv = tsv.TsvWriter(tsv.imgs_path(out, split))
        self.images: list[_Image] = []
        self.by_sha: dict[str, _Image] = {}
        self.ids: set[int] = set()
        self.seen_elsewhere = seen_elsewhere

    def add(self, result: _Result, file: str, line: int, objects: list[raw.RawObject],
            captions: list[str], image_id: int | None = None, source: str = "") -> int | None:
        """Add one processed image read from ``file`` (record at ``line``); returns the id it is
        stored under, None if skipped. ``source`` names it in the manifest (default ``file``)."""
        source = source or file
        if result.error:
            self.report.skip(Skip(self.split, result.error[0], file, line, result.error[1]))
            return None
        if image_id is not None and image_id in self.ids:
            self.report.skip(Skip(self.split, "duplicate_id", file, line, f"image_id {image_id} already used"))
            return None
        kept = self.by_sha.get(result.sha256)
        if kept is not None:
            kept.captions.extend(captions)
            self.report.skip(Skip(self.split, "duplicate", file, line,
                                  f"same bytes as {kept.entry.source}; its captions were merged onto that image"))
            return kept.entry.image_id
        first_split, first_source = self.seen_elsewhere.setdefault(result.sha256, (self.split, source))
        if first_split != self.split:
            self.report.notes.append(f"[{self.split}] {source} has the same bytes as {first_source} in split "
                                     f"{first_split} (kept in both; a leak between splits?)")
        if image_id is None:
            image_id = int(result.sha256[:12], 16)  # the first 48 bits of the content hash
            while image_id in self.ids:  # 48-bit collision of different content: next free id
                image_id += 1
        info = result.info
        entry = ManifestEntry(image_id, source, result.sha256, info.width, info.height, info.format, info.mode,
                              self._clip_objects(objects, result.boxes, info, file, line))
        self.ids.add(image_id)
        image = _Image(entry, list(captions))
        self.by_sha[result.sha256] = image
        self.images.append(image)
        if isinstance(result.payload, bytes):
            self.tsv.write(image_id, result.payload)
        else:
            self.tsv.write_range(image_id, *result.payload)
        return image_id

    def _clip_objects(self, objects, boxes, info, source, line) -> list[raw.RawObject]:
        kept = []
        for i, (obj, box) in enumerate(zip(objects, boxes)):
            x1, y1 = max(0.0, box[0]), max(0.0, box[1])
            x2, y2 = min(float(info.width), box[2]), min(float(info.height), box[3])
            if x2 - x1 < 1 or y2 - y1 < 1:
                self.report.skip(Skip(self.split, "bad_object", source, line,
                                      f"object {i} box {list(obj.box)} lies outside the {info.width}x{info.height} image"))
                continue
            kept.append(raw.RawObject((round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)), obj.label,
                                      obj.attributes))
        return kept

    def close(self, texts: list[tsv.Text]) -> None:
        self.tsv.close()
        tsv.write_texts(tsv.texts_path(self.out, self.split), texts)
        write_manifest(manifest_path(self.out, self.split), [im.entry for im in self.images])
        self.counts.images_written = len(self.images)
        self.counts.texts_written = len(texts)
        self.counts.pairs_written = sum(len(t.image_ids) for t in texts)


def _texts_from_captions(images: list[_Image]) -> list[tsv.Text]:
    """One text per distinct caption (content id), listing every image it describes."""
    by_text: dict[str, tsv.Text] = {}
    used: set[int] = set()
    for im in images:
        for cap in im.captions:
            text = by_text.get(cap)
            if text is None:
                text_id = content_id(cap.encode("utf-8"))
                while text_id in used:
                    text_id += 1
                used.add(text_id)
                text = by_text[cap] = tsv.Text(text_id, cap, [])
            if im.entry.image_id not in text.image_ids:
                text.image_ids.append(im.entry.image_id)
    return list(by_text.values())


def _ingest_raw_split(src: Path, split: str, writer: _SplitWriter, runner: _Runner) -> None:
    cfg = runner.cfg
    split_dir = src / split
    records, skips = raw.read_records(src, split)
    for s in skips:
        writer.report.skip(s)
    counts = writer.counts
    listed = {r.image for r in records}
    found, bad_names = raw.list_images(split_dir)
    unlisted = [f for f in found if f not in listed]
    for f in bad_names:
        writer.report.skip(Skip(split, "bad_file_name", f"{split}/{raw.IMAGES_DIR}/{f}", 0,
                                "the file name is not valid UTF-8 (shown with \\x escapes): rename it"))
    if not (split_dir / raw.CAPTIONS_FILE).is_file():
        writer.report.notes.append(f"[{split}] no {raw.CAPTIONS_FILE}: every image is unlisted")
    if cfg.unlisted == "include":
        records += [raw.RawRecord(f) for f in unlisted]
    else:
        for f in unlisted:
            writer.report.skip(Skip(split, "unlisted", f"{split}/{raw.IMAGES_DIR}/{f}", 0,
                                    f"not named in {raw.CAPTIONS_FILE}; add a line for it or set unlisted: include"))
    counts.images_seen = len(records) + len(unlisted) * (cfg.unlisted == "skip") + len(bad_names) + sum(
        s.reason in ("malformed_json", "bad_record", "outside_images", "missing_file") for s in skips)
    counts.captions_seen = sum(len(r.captions) for r in records) + sum(
        s.reason in ("empty_caption", "bad_caption") for s in skips)
    tasks = (_Task(str(split_dir / raw.IMAGES_DIR / r.image), boxes=tuple(o.box for o in r.objects)) for r in records)
    for record, result in zip(records, runner.map(tasks, len(records), f"ingest {split}")):
        writer.add(result, f"{split}/{raw.IMAGES_DIR}/{record.image}", record.line, record.objects, record.captions)
    writer.close(_texts_from_captions(writer.images))


def _ingest_clip_split(src: Path, split: str, writer: _SplitWriter, runner: _Runner) -> None:
    imgs = tsv.imgs_path(src, split)
    name = imgs.name
    keys: list[tuple[int, int | str]] = []   # (line, id, or why the key is not one)

    def tasks() -> Iterator[_Task]:
        for line_no, key, offset, length in tsv.iter_tsv(imgs):
            image_id = parse_image_id(key)
            keys.append((line_no, image_id))
            yield _Task(str(imgs), offset, length if isinstance(image_id, int) else 0)

    total = sum(1 for _ in open(imgs, "rb"))
    id_map: dict[int, int] = {}   # every accepted id (duplicates too) -> the id stored
    for i, result in enumerate(runner.map(tasks(), total, f"ingest {split}")):
        line_no, image_id = keys[i]
        writer.counts.images_seen += 1
        if isinstance(image_id, str):
            writer.report.skip(Skip(split, "bad_id", name, line_no, image_id))
            continue
        stored = writer.add(result, name, line_no, [], [], image_id=image_id, source=f"{name}:{line_no}")
        if stored is not None:
            id_map.setdefault(image_id, stored)
    writer.close(_read_clip_texts(src, split, id_map, writer))


def _read_clip_texts(src: Path, split: str, id_map: dict[int, int], writer: _SplitWriter) -> list[tsv.Text]:
    path = tsv.texts_path(src, split)
    texts: list[tsv.Text] = []
    if not path.is_file():
        writer.report.notes.append(f"[{split}] no {path.name}: images only")
        return texts
    seen: set[int] = set()

    def skip(line: int, reason: str, detail: str) -> None:
        writer.report.skip(Skip(split, reason, path.name, line, detail))

    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            writer.counts.captions_seen += 1
            try:
                obj = loads(line)
            except ValueError as e:
                skip(line_no, "malformed_json", str(e))
                continue
            ids = obj.get("image_ids", []) if isinstance(obj, dict) else None
            if (not isinstance(obj, dict) or not isinstance(obj.get("text_id"), int) or isinstance(obj["text_id"], bool)
                    or not isinstance(obj.get("text"), str) or not isinstance(ids, list)
                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
                skip(line_no, "bad_record", 'expected {"text_id": int, "text": str, "image_ids": [int]}')
                continue
            wide = [i for i in [obj["text_id"], *ids] if not INT64_MIN <= i <= INT64_MAX]
            if wide:
                skip(line_no, "bad_id", f"id {_shorten(str(wide[0]))} is outside the signed 64-bit range")
                continue
            if not obj["text"].strip():
                skip(line_no, "empty_caption", f"text_id {obj['text_id']} has an empty text")
                continue
            if obj["text_id"] in seen:
                skip(line_no, "duplicate_text_id", f"text_id {obj['text_id']} already used")
                continue
            kept = []
            for i in ids:
                if i not in id_map:
                    skip(line_no, "unknown_image_id", f"text_id {obj['text_id']}: image {i} is not in {split}_imgs.tsv "
                                                      "(or was skipped); pair dropped")
                elif id_map[i] not in kept:
                    kept.append(id_map[i])
            if ids and not kept:
                skip(line_no, "no_valid_image", f"text_id {obj['text_id']}: none of its images is usable")
                continue
            seen.add(obj["text_id"])
            texts.append(tsv.Text(obj["text_id"], obj["text"].strip(), kept))
    return texts


def ingest(src: Path, out: Path, config: IngestConfig = IngestConfig()) -> IngestReport:
    """Ingest ``src`` (raw layout or Chinese-CLIP folder) into ``out``; returns the report.

    Everything is written into a temp folder beside ``out`` (``.{out}.tmp-{pid}-*``, removed
    by the next ingest if this process dies), which then replaces ``out``: the old ``out`` is
    renamed aside, the new one renamed in, and only then the old one deleted. Raises
    :class:`IngestError` (outputs and report still written) when a split that had input kept
    no image or none of its captions, when no split holds an image, and in strict mode when
    anything was skipped.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"ingest source {printable(src)} is not a directory")
    if src.resolve() == out.resolve():
        raise ValueError(f"ingest output {printable(out)} must differ from the source folder")
    if raw.is_raw_layout(src):
        source_format, splits, run_split = "raw", raw.splits_in(src), _ingest_raw_split
    elif tsv.is_chinese_clip_layout(src):
        source_format, splits, run_split = "chinese-clip", tsv.splits_in(src), _ingest_clip_split
    else:
        raise ValueError(f"{printable(src)} holds neither the raw layout ({'/'.join(raw.SPLITS)}/"
                         f"{raw.CAPTIONS_FILE} + images/) nor a Chinese-CLIP dataset ({{split}}_imgs.tsv + "
                         "{split}_texts.jsonl)")
    start = time.perf_counter()
    report = IngestReport(source=printable(src), source_format=source_format)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    seen_elsewhere: dict[str, tuple[str, str]] = {}
    runner = _Runner(config, tmp / ".shards")
    try:
        for split in splits:
            if printable(split) != split:  # a Chinese-CLIP file name that is not UTF-8
                report.skip(Skip(printable(split), "bad_file_name", f"{printable(split)}_imgs.tsv", 0,
                                 "the file name is not valid UTF-8 (shown with \\x escapes): rename it"))
                continue
            run_split(src, split, _SplitWriter(tmp, split, report, seen_elsewhere), runner)
        runner.close()
        shutil.rmtree(tmp / ".shards")
        report.write(tmp / REPORT_FILE)
        write_chain(tmp, {}, "ingest", {"max_side": config.max_side or None, "jpeg_quality": config.jpeg_quality,
                                        "max_pixels": config.max_pixels})
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700: give it an ordinary new folder's mode
        replace_folder(out, tmp)
    finally:
        runner.close()
        shutil.rmtree(tmp, ignore_errors=True)
    _log_summary(report, time.perf_counter() - start)
    problems = report.unusable()
    if problems:
        raise IngestError.unusable(report, out, problems)
    if config.strict and report.skips:
        raise IngestError.strict(report, out)
    return report


def _temp_pid(out: Path, path: Path) -> int | None:
    """The pid in the name of ``out``'s temp folder ``path`` (``.{out}.tmp-{pid}-*``), if any."""
    match = re.fullmatch(r"\.tmp-([0-9]{1,9})-.+", path.name[len(out.name) + 1:])
    return int(match[1]) if match else None


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove the temp folders beside ``out`` that ingests killed mid-run left behind (their
    pid no longer alive); those of an ingest still running are left alone. Returns the removed."""
    removed = []
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.tmp-*")):
        pid = _temp_pid(out, path)
        if pid is None:
            log.warning("%s looks like the temp folder of an older mmcn's ingest: remove it by hand unless an "
                        "ingest into %s is running", printable(path), printable(out))
        elif not pid_alive(pid):
            log.info("removing %s, left behind by an ingest (pid %d) that was killed", printable(path), pid)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _umask() -> int:
    """The process umask (reading it means setting it: set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _log_summary(report: IngestReport, elapsed: float) -> None:
    for split, c in report.splits.items():
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(c.skipped.items())) or "none"
        log.info("%s: %d/%d images, %d texts (%d pairs) from %d captions; skipped: %s", split, c.images_written,
                 c.images_seen, c.texts_written, c.pairs_written, c.captions_seen, skipped)
    for note in report.notes:
        log.warning(note)
    log.info("ingest (%s) done in %.1fs, %d skip(s)", report.source_format, elapsed, len(report.skips))

