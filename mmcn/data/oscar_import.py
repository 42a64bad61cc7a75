"""Released Oscar / VinVL region features (TSV) read into mmcn's feature shards, matched to
the ingested images by id (``mmcn import-features``, or the features stage with
``features.source``), so a user who has them does not run a detector.

The source is a folder searched recursively for the files Oscar and VinVL release:

- feature rows, in ``*.feature.tsv`` (captioning layout: ``key\\t{"num_boxes": n, "features":
  base64}``) or ``features.tsv`` (retrieval / pretraining layout: ``key\\tnum_boxes\\tbase64``);
  both row styles are recognised in any file. ``base64`` is float32 little-endian, n x 2054:
  2048 pooled + ``[x1/W, y1/H, x2/W, y2/H, w/W, h/H]``;
- label rows, in ``*.label.tsv`` (``key\\t[{"class", "rect", "conf"}]``) or ``predictions.tsv`` /
  ``predictions_gt.tsv`` (``key\\t{"image_h", "image_w", "objects": [...]}``), the same boxes in
  the same order; per box optionally ``attributes`` and ``attr_scores`` (VinVL).

Rows are read in file order; ``.lineidx`` and ``imageid2idx.json`` files may be present and
are not needed.

**Key -> image id**: a key that is a decimal integer is that id (Oscar's COCO and Flickr30k
keys: ``"391895"``); otherwise the digits that end the key, leading zeros dropped
(``COCO_val2014_000000391895`` and ``coco_391895`` -> 391895, ``flickr30k_1000092795`` ->
1000092795). That is the image id of a Chinese-CLIP dataset built from the same photos
(COCO-CN, Flickr30k-CN use the source dataset's ids). A key with no such digits, or two keys
naming the same id (the first is kept), is reported.

**Validation**, per image: the feature bytes are n x 2054 float32, finite; the six geometry
columns are consistent (``x2/W - x1/W == w/W`` and ``y2/H - y1/H == h/H`` within 1e-3, all in
[0, 1] within 1e-2); the label row has n boxes; and when it gives rectangles, the image size
they imply (rect width / w/W, …; ``image_w`` / ``image_h`` when given) has the aspect ratio of
the ingested image within 2% — features of another photo (a wrong id mapping) fail that. An
image that fails is skipped with its reason; an ingested image without a feature row is
reported as such; a feature row without an ingested image too (counted, first keys listed).

The shards are written as the extraction writes them (:mod:`mmcn.data.features`: the split's
image order, ``shard_size`` images per shard), boxes in pixels of the ingested image
(geometry x its size), so every later stage treats imported and extracted features alike.
The folder is replaced as a whole (built aside, then swapped in).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pybase64

from mmcn.data import features as region_features
from mmcn.data import image
from mmcn.data import tsv
from mmcn.data.chain import read_chain, write_chain
from mmcn.data.outputs import replace_folder
from mmcn.logs import Progress

log = logging.getLogger(__name__)

REPORT = "features_report.json"
FEATURE_FILES = ("*.feature.tsv", "features.tsv")
LABEL_FILES = ("*.label.tsv", "predictions.tsv", "predictions_gt.tsv")
INT64 = (-(1 << 63), (1 << 63) - 1)
_TRAILING_DIGITS = re.compile(r"(\d+)$")
_DECIMAL = re.compile(r"-?\d+")
GEOMETRY_TOL = 1e-3
RANGE_TOL = 1e-2
ASPECT_TOL = 0.02


class FeatureImportError(ValueError):
    """A source folder that cannot be imported (no feature or label files, nothing matched)."""


class _Skip(ValueError):
    """One image that is not imported: why, and the source row it concerns (if any)."""

    def __init__(self, reason: str, row: str = ""):
        super().__init__(reason)
        self.reason, self.row = reason, row


@dataclass(frozen=True)
class ImportConfig:
    shard_size: int = 256        # images per Parquet shard, as the extraction
    check_geometry: bool = True  # the aspect check against the ingested image (rectangles needed)


def image_id_of(key: str) -> int | None:
    """The image id a released key names (see the module docstring); None when it names none."""
    if _DECIMAL.fullmatch(key):
        value = int(key)
    elif match := _TRAILING_DIGITS.search(key):
        value = int(match.group(1))
    else:
        return None
    return value if INT64[0] <= value <= INT64[1] else None


def find_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The feature and label TSVs under ``folder`` (sorted); ``([], [])`` when there are none, as
    in the repository's placeholder folder: then the detector makes the features."""
    folder = Path(folder)
    if not folder.is_dir():
        return ([folder], []) if folder.is_file() else ([], [])

    def matching(patterns) -> list[Path]:
        return sorted({p for pattern in patterns for p in folder.rglob(pattern) if p.is_file()})

    return matching(FEATURE_FILES), matching(LABEL_FILES)


class _Rows:
    """Byte offsets of every row of some TSVs by image id (rows are read again on demand)."""

    def __init__(self, files: list[Path], what: str):
        self.files = files
        self.where: dict[int, tuple[int, int]] = {}   # image id -> (file index, offset)
        self.keys: dict[int, str] = {}
        self.unnamed: list[str] = []       # keys with no image id
        self.duplicates: list[str] = []    # keys naming an id seen before
        for k, path in enumerate(files):
            with open(path, "rb") as f, Progress(None, f"index {path.name}", "row", log) as bar:
                offset = 0
                for line in f:
                    bar.update()
                    key = line.split(b"\t", 1)[0].decode("utf-8", "backslashreplace").strip()
                    image_id = image_id_of(key)
                    if image_id is None:
                        self.unnamed.append(key)
                    elif image_id in self.where:
                        self.duplicates.append(key)
                    else:
                        self.where[image_id] = (k, offset)
                        self.keys[image_id] = key
                    offset += len(line)
        log.info("%s: %d rows by id in %d file(s); %d keys without an id, %d duplicate ids", what, len(self.where),
                 len(files), len(self.unnamed), len(self.duplicates))
        self._open: dict[int, object] = {}

    def row(self, image_id: int) -> tuple[str, bytes] | None:
        """``(where, payload)`` of the image's row: ``file:line``-like location and the bytes after the key."""
        if image_id not in self.where:
            return None
        k, offset = self.where[image_id]
        f = self._open.get(k) or self._open.setdefault(k, open(self.files[k], "rb"))
        f.seek(offset)
        line = f.readline().rstrip(b"\r\n")
        return f"{self.files[k]} (key {self.keys[image_id]})", line.split(b"\t", 1)[1] if b"\t" in line else b""

    def close(self) -> None:
        for f in self._open.values():
            f.close()


def parse_features(payload: bytes) -> np.ndarray:
    """A feature row's payload (JSON or 3-column style) -> (n, 2054) float32; ValueError(reason)."""
    text = payload.strip()
    if text.startswith(b"{"):
        try:
            info = json.loads(text)
            n, data = int(info["num_boxes"]), info["features"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"feature row is not {{\"num_boxes\", \"features\"}} JSON: {type(e).__name__}: {e}")
    else:
        parts = text.split(b"\t")
        if len(parts) != 2 or not parts[0].strip().isdigit():
            raise ValueError(f"feature row has {len(parts) + 1} columns: expected key, num_boxes, base64 "
                             f"(or key and JSON)")
        n, data = int(parts[0]), parts[1]
    try:
        raw = pybase64.b64decode(data, validate=True)
    except ValueError as e:
        raise ValueError(f"feature row: bad base64 ({e})")
    if n < 1 or len(raw) != n * region_features.FEATURE_DIM * 4:
        dims = len(raw) / 4 / n if n > 0 else 0
        raise ValueError(f"feature row: {len(raw)} bytes for num_boxes={n}, i.e. {dims:g} floats per box; "
                         f"expected {region_features.FEATURE_DIM} (2048 pooled + 6 box values, float32)")
    features = np.frombuffer(raw, dtype="<f4").reshape(n, region_features.FEATURE_DIM).astype(np.float32)
    if not np.isfinite(features).all():
        raise ValueError("feature row: non-finite values (NaN or inf)")
    geo = features[:, region_features.POOLED_DIM:]
    if (np.abs(geo[:, 4] - (geo[:, 2] - geo[:, 0])).max() > GEOMETRY_TOL
            or np.abs(geo[:, 5] - (geo[:, 3] - geo[:, 1])).max() > GEOMETRY_TOL
            or geo.min() < -RANGE_TOL or geo.max() > 1 + RANGE_TOL):
        raise ValueError("feature row: the last 6 values are not [x1/W, y1/H, x2/W, y2/H, w/W, h/H] "
                         "(not Oscar/VinVL 2054-dim region features?)")
    return features


def parse_labels(payload: bytes) -> tuple[list[dict], tuple[int, int] | None]:
    """A label row's payload -> (boxes, (image_w, image_h) or None); ValueError(reason)."""
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"label row is not JSON: {type(e).__name__}: {e}") from None
    size = None
    if isinstance(value, dict):
        if "image_w" in value and "image_h" in value:
            size = (int(value["image_w"]), int(value["image_h"]))
        value = value.get("objects")
    if not isinstance(value, list) or not all(isinstance(b, dict) and isinstance(b.get("class"), str) for b in value):
        raise ValueError('label row: expected a list of {"class", "rect", "conf"} boxes (or {"objects": [...]})')
    return value, size


def to_record(image_id: int, width: int, height: int, features: np.ndarray, boxes: list[dict],
              size: tuple[int, int] | None, check_geometry: bool) -> region_features.RegionFeatures:
    """One image's released features and labels as mmcn's record (boxes in the ingested image's pixels)."""
    n = features.shape[0]
    if len(boxes) != n:
        raise ValueError(f"the label row has {len(boxes)} boxes, the feature row {n}: they must be the same boxes")
    geo = features[:, region_features.POOLED_DIM:]
    rects = [b.get("rect") for b in boxes]
    if check_geometry and all(isinstance(r, list) and len(r) == 4 for r in rects):
        rect = np.asarray(rects, dtype=np.float64)
        wide, tall = geo[:, 4] > 1e-3, geo[:, 5] > 1e-3
        if wide.any() and tall.any():
            src_w = float(np.median((rect[wide, 2] - rect[wide, 0]) / geo[wide, 4]))
            src_h = float(np.median((rect[tall, 3] - rect[tall, 1]) / geo[tall, 5]))
            if size and (abs(src_w - size[0]) > ASPECT_TOL * size[0] or abs(src_h - size[1]) > ASPECT_TOL * size[1]):
                raise ValueError(f"the rectangles imply a {src_w:.0f}x{src_h:.0f} image, the label row says "
                                 f"{size[0]}x{size[1]}: features and labels do not match")
            if src_h > 0 and abs((src_w / src_h) / (width / height) - 1) > ASPECT_TOL:
                raise ValueError(f"the features were computed on a {src_w:.0f}x{src_h:.0f} image (aspect "
                                 f"{src_w / src_h:.3f}), this image is {width}x{height} (aspect {width / height:.3f}): "
                                 f"another photo under this id? (see the key -> id rule in mmcn.data.oscar_import)")
    scale = np.array([width, height, width, height], dtype=np.float32)
    return region_features.RegionFeatures(
        image_id=image_id, width=width, height=height, boxes=(geo[:, :4] * scale).astype(np.float32),
        classes=[b["class"] for b in boxes],
        class_conf=np.array([float(b.get("conf", 1.0)) for b in boxes], dtype=np.float32),
        features=features,
        attributes=[[str(a) for a in b.get("attributes") or []] for b in boxes],
        attr_conf=[[float(s) for s in (b.get("attr_scores") or [1.0] * len(b.get("attributes") or []))]
                   for b in boxes])


def _image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the ingested image as displayed (EXIF orientation applied): the frame
    every mmcn decoder gives the detector and the report (:func:`mmcn.data.image.displayed`), and
    the one VinVL's OpenCV reader (which applies EXIF orientation) extracted from."""
    try:
        info = image.inspect(data, max_pixels=1 << 62)  # ingest applied its own limit already
    except image.ImageError as e:
        raise ValueError(f"the ingested image cannot be read ({e})") from None
    return info.width, info.height


def import_features(source: Path, tsv_dir: Path, out_dir: Path, cfg: ImportConfig = ImportConfig()) -> dict:
    """Write ``out_dir`` (feature shards, report, chain) from the released features under
    ``source`` for every image of ``tsv_dir``'s splits; returns the report.

    Raises :class:`FeatureImportError` when the source holds no feature or no label file, or
    when no ingested image has a usable feature row (nothing useful would come out).
    """
    source, tsv_dir, out_dir = Path(source), Path(tsv_dir), Path(out_dir)
    if cfg.shard_size < 1:
        raise ValueError(f"shard_size: {cfg.shard_size} must be at least 1")
    feature_files, label_files = find_files(source)
    if not feature_files:
        raise FeatureImportError(f"{source}: no feature file ({' or '.join(FEATURE_FILES)}) in it or below")
    if not label_files:
        raise FeatureImportError(f"{source}: no label file ({', '.join(LABEL_FILES)}) beside the features: the "
                                 f"object labels become the tags; copy the release's label TSV there too")
    splits = tsv.check_complete(tsv_dir)
    start = time.perf_counter()
    feats, labels = _Rows(feature_files, "features"), _Rows(label_files, "labels")
    tmp = out_dir.parent / f".{out_dir.name}.import-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    report: dict = {"source": str(source), "files": [str(p) for p in feature_files + label_files], "splits": {},
                    "skipped": []}
    used: set[int] = set()
    seen: set[int] = set()   # every ingested image id
    try:
        for split in splits:
            reader = tsv.TsvReader(tsv.imgs_path(tsv_dir, split))
            counts = {"images": 0, "boxes": 0, "skipped": 0}
            shard: list[region_features.RegionFeatures] = []
            index = 0
            bar = Progress(len(reader), f"import {split}", "img", log)
            for line in range(len(reader)):
                bar.update()
                image_id, data = reader[line]
                seen.add(image_id)
                try:
                    record = _one(image_id, data, feats, labels, cfg)
                except _Skip as e:
                    counts["skipped"] += 1
                    report["skipped"].append({"split": split, "image_id": image_id, "line": line + 1,
                                              "reason": e.reason, **({"row": e.row} if e.row else {})})
                    continue
                used.add(image_id)
                shard.append(record)
                counts["images"] += 1
                counts["boxes"] += record.num_boxes
                if len(shard) == cfg.shard_size:
                    region_features.write_shard(region_features.shard_path(tmp, split, index), shard)
                    shard, index = [], index + 1
            if shard:
                region_features.write_shard(region_features.shard_path(tmp, split, index), shard)
            bar.close()
            report["splits"][split] = counts
            log.info("import %s: %d images, %d boxes, %d skipped", split, counts["images"], counts["boxes"],
                     counts["skipped"])
        unmatched = sorted(set(feats.where) - seen)
        report["rows_without_image"] = {"count": len(unmatched),
                                        "first_keys": [feats.keys[i] for i in unmatched[:20]]}
        report["keys_without_id"] = {"count": len(feats.unnamed), "first_keys": feats.unnamed[:20]}
        report["duplicate_ids"] = {"count": len(feats.duplicates), "first_keys": feats.duplicates[:20]}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        feats.close()
        labels.close()
    if not used:
        shutil.rmtree(tmp, ignore_errors=True)
        reasons = _top_reasons(report["skipped"])
        raise FeatureImportError(f"{source}: no ingested image of {tsv_dir} got features ({reasons}); check that the "
                                 f"release covers these images and the key -> id rule (mmcn.data.oscar_import)")
    (tmp / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_chain(tmp, read_chain(tsv_dir), "features", {"source": "imported"})
    replace_folder(out_dir, tmp)
    log.info("imported %s in %.0fs: %s; %d feature rows without an ingested image (%s)", source,
             time.perf_counter() - start, {s: (c["images"], c["skipped"]) for s, c in report["splits"].items()},
             len(unmatched), out_dir / REPORT)
    return report


def _one(image_id: int, data: bytes, feats: _Rows, labels: _Rows, cfg: ImportConfig) -> region_features.RegionFeatures:
    found = feats.row(image_id)
    if found is None:
        raise _Skip("no feature row for this image id in the source")
    where, payload = found
    try:
        features = parse_features(payload)
    except ValueError as e:
        raise _Skip(str(e), where) from None
    found = labels.row(image_id)
    if found is None:
        raise _Skip("a feature row but no label row for this image id in the source", where)
    where, payload = found
    try:
        boxes, size = parse_labels(payload)
        width, height = _image_size(data)
        return to_record(image_id, width, height, features, boxes, size, cfg.check_geometry)
    except ValueError as e:
        raise _Skip(str(e), where) from None


def _top_reasons(skipped: list[dict], k: int = 3) -> str:
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:k]
    return "; ".join(f"{n} x {r}" for r, n in top) or "no images"
