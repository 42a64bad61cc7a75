"""What a detection checkpoint says about itself, the label map it needs, and its conversion
into a detector folder: one home for the detector stage, ``mmcn inspect-detector`` and
``mmcn convert-detector``.

:func:`inspect_state_dict` reads only shapes and the biases of the classifier rows:

- format from the key names (:func:`mmcn.vision.checkpoint.guess_source`): detectron2 (BUTD,
  airsplay/py-bottom-up-attention) or maskrcnn_benchmark (VinVL, microsoft/scene_graph_benchmark);
- backbone depth from the blocks per stage (depth = 3 x blocks + 2: 3/4/23/3 is ResNet-101,
  3/8/36/3 ResNeXt-152), groups and width from the first block's grouped 3x3 conv, C4 when
  the res5 stage is the box head, the attribute head when ``attr_score`` is there;
- object classes = ``cls_score`` rows - 1 (one is background); attributes = ``attr_score``
  rows - 1 ("no attribute"); box regression per class or class-agnostic from ``bbox_pred``
  rows (detectron2: K*4 or 4; maskrcnn_benchmark: (K+1)*4 or 8, background rows included);
- which end holds background / "no attribute": the format's convention (detectron2 last,
  maskrcnn_benchmark first) checked against the biases. Most proposals a detector is trained
  on are background, so the background logit's bias ends up the largest, usually far above
  the rest; the same holds for "no attribute". :class:`RowEvidence` states the numbers and a
  confidence; a checkpoint whose biases point at the other end is reported, not silently mapped;
- the ``detector.arch`` presets whose architecture fits (tried on the meta device) and
  whether their packaged label maps have the checkpoint's sizes.

Label maps (:func:`read_label_files`): VinVL's ``VG-SGG-dicts-vgoi6-clipped.json``
(``label_to_idx`` / ``idx_to_label``, ``attribute_to_idx`` / ``idx_to_attribute``, indices
1..N, 0 = background / no attribute) and BUTD's ``objects_vocab.txt`` / ``attributes_vocab.txt``
(line i = class i; a file whose name contains "attr" holds attributes). Without one, the
preset's packaged vocabulary (``mmcn/resources/detector/``) is used. :func:`convert_detector`
refuses a label map whose size differs from the checkpoint's, or whose indices cannot be put
in order (gaps, duplicates, index 0 taken by a name other than background / no attribute, the
two directions disagreeing), naming the file.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mmcn.vision.checkpoint import (_DETECTRON2_IGNORED, _DETECTRON2_RULES, _MASKRCNN_IGNORED, _MASKRCNN_RULES,
                                    CheckpointError, _rename, _strip_module, convert_state_dict,
                                    detector_from_state, guess_source, read_state_dict)
from mmcn.vision.config import PRESETS, DetectorConfig, detector_config
from mmcn.vision.detector import Detector
from mmcn.vision.vocab import PACKAGED, load_vocab

log = logging.getLogger(__name__)

FORMATS = {
    "detectron2": "detectron2 (BUTD: airsplay/py-bottom-up-attention's faster_rcnn_from_caffe_attr.pkl layout)",
    "maskrcnn_benchmark": "maskrcnn_benchmark (VinVL: scene_graph_benchmark's vinvl_vg_x152c4.pth layout)",
    "native": "mmcn's own detector",
}
# where the format puts background / "no attribute" (what the conversion assumes)
CONVENTION = {"detectron2": "last", "maskrcnn_benchmark": "first", "native": "first"}
LABEL_MAP_KEYS = (("label_to_idx", "idx_to_label"), ("attribute_to_idx", "idx_to_attribute"))
_STRONG, _CLEAR = 6.0, 3.0  # robust z-scores (spreads above the median of the other rows)
_RESERVED_ZERO = {"background", "noattribute", "none", "noattr"}  # names index 0 may carry, letters only


@dataclass(frozen=True)
class RowEvidence:
    """Which end of a logit layer holds background / "no attribute", judged from its biases."""

    position: str  # "first", "last" or "unclear"
    confidence: str  # "high", "medium" or "low"
    evidence: str

    def agrees(self, assumed: str) -> bool | None:
        """True / False when the biases point clearly at one end, None when they do not tell."""
        return None if self.position == "unclear" else self.position == assumed


def row_position(bias: Tensor) -> RowEvidence:
    """Judge whether the first or the last row of a logit layer is the special one from its
    bias: an outlier beyond every other row, measured in robust spreads (1.4826 x the median
    absolute deviation of the middle rows) from their median. Background is trained as the
    most frequent class, so its bias ends up far above; "no attribute" may be far above (the
    usual target) or far below (never a target). ``high``: one end at least 6 spreads out and
    the other end under 3; ``medium``: one end at least 3 out and the further; else ``unclear``."""
    if bias.device.type == "meta":
        return RowEvidence("unclear", "low", "no values (shapes only)")
    b = bias.detach().double().flatten()
    if b.numel() < 4:
        return RowEvidence("unclear", "low", f"only {b.numel()} rows")
    ends, middle = {"first": b[0].item(), "last": b[-1].item()}, b[1:-1]
    median = middle.median().item()
    spread = max(1.4826 * (middle - median).abs().median().item(), 1e-6)
    z = {end: (value - median) / spread for end, value in ends.items()}
    beyond = {end: value > middle.max().item() or value < middle.min().item() for end, value in ends.items()}
    score = {end: abs(z[end]) if beyond[end] else 0.0 for end in ends}
    top, other = ("first", "last") if score["first"] >= score["last"] else ("last", "first")
    words = (f"bias[0] = {ends['first']:.3f}, bias[{b.numel() - 1}] = {ends['last']:.3f}; the {b.numel() - 2} rows "
             f"between: median {median:.3f}, range {middle.min().item():.3f}..{middle.max().item():.3f}, spread "
             f"{spread:.3g}; the {top} row is {min(abs(z[top]), 1e6):.1f} spreads "
             f"{'above' if z[top] > 0 else 'below'} that median")
    if score[top] >= _STRONG and score[other] < _CLEAR:
        return RowEvidence(top, "high", words)
    if score[top] >= _CLEAR:
        return RowEvidence(top, "medium", words)
    return RowEvidence("unclear", "low", words + " (no outlier at either end)")


@dataclass
class CheckpointInfo:
    """What :func:`inspect_state_dict` found; :meth:`summary` words it."""

    origin: str
    source: str
    backbone: str
    blocks: tuple[int, ...]
    groups: int
    width_per_group: int
    head: str
    num_classes: int  # foreground object classes
    background: RowEvidence
    box_regression: str
    class_agnostic: bool
    num_attributes: int | None  # None: no attribute head
    no_attribute: RowEvidence | None
    anchors_per_location: int
    rpn_channels: int
    presets: list[str] = field(default_factory=list)  # architecture fits
    label_presets: list[str] = field(default_factory=list)  # ... and the packaged label map's sizes too
    notes: list[str] = field(default_factory=list)

    @property
    def assumed_background(self) -> str:
        return CONVENTION[self.source]

    def summary(self) -> str:
        assumed = self.assumed_background
        lines = [
            f"checkpoint: {self.origin}",
            f"  format: {FORMATS[self.source]}",
            f"  architecture: {self.backbone} ({'/'.join(map(str, self.blocks))} blocks), {self.head}, "
            f"attribute head {'present' if self.num_attributes is not None else 'absent'}; RPN "
            f"{self.anchors_per_location} anchors per location, {self.rpn_channels} channels",
            f"  object classes: {self.num_classes} + background (cls_score {self.num_classes + 1} rows); "
            f"background row {assumed} by the format's convention; biases say: {_verdict(self.background, assumed)}",
            f"    evidence: {self.background.evidence}",
            f"  box regression: {self.box_regression}",
        ]
        if self.num_attributes is not None and self.no_attribute is not None:
            lines += [f"  attributes: {self.num_attributes} + 'no attribute' (attr_score {self.num_attributes + 1} "
                      f"rows); 'no attribute' row {assumed} by the format's convention; biases say: "
                      f"{_verdict(self.no_attribute, assumed)}",
                      f"    evidence: {self.no_attribute.evidence}"]
        lines.append(f"  label map it expects: {self.num_classes} object names"
                     + (f", {self.num_attributes} attribute names" if self.num_attributes is not None else "")
                     + " (in the checkpoint's row order)")
        if self.presets:
            for name in self.presets:
                fits = ("its packaged label map fits" if name in self.label_presets else
                        "its packaged label map does NOT fit: give the checkpoint's own (--labels)")
                lines.append(f"  detector.arch: {name} (architecture matches; {fits})")
        else:
            lines.append(f"  detector.arch: no preset matches ({', '.join(PRESETS)} tried; `mmcn convert-detector "
                         f"--arch config.json` takes a config for another architecture)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """The facts as JSON values (for metrics/detector.json and ``--json``)."""
        return {"format": self.source, "backbone": self.backbone, "head": self.head, "classes": self.num_classes,
                "background_row": {"assumed": self.assumed_background, "biases": self.background.position,
                                   "confidence": self.background.confidence},
                "box_regression": "class-agnostic" if self.class_agnostic else "per class",
                "attributes": self.num_attributes,
                "no_attribute_row": None if self.no_attribute is None else {
                    "assumed": self.assumed_background, "biases": self.no_attribute.position,
                    "confidence": self.no_attribute.confidence},
                "presets": self.presets, "label_presets": self.label_presets}


def _verdict(evidence: RowEvidence, assumed: str) -> str:
    agrees = evidence.agrees(assumed)
    if agrees is None:
        return "unclear (no outlier bias: cannot be checked from the weights)"
    if agrees:
        return f"{evidence.position} too ({evidence.confidence} confidence)"
    return f"{evidence.position}, AGAINST the convention ({evidence.confidence} confidence)"


# --------------------------------------------------------------------------- inspection


def _native_names(state: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], list[str]]:
    """The state under native key names (renamed only: rows keep the source's order), and unknown keys."""
    if source == "detectron2":
        renamed, unknown, _ = _rename(state, _DETECTRON2_RULES, _DETECTRON2_IGNORED)
    elif source == "maskrcnn_benchmark":
        renamed, unknown, _ = _rename(state, _MASKRCNN_RULES, _MASKRCNN_IGNORED)
    else:
        renamed, unknown = {_strip_module(k): v for k, v in state.items()}, []
    return renamed, unknown


def _blocks(state: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.conv1\.weight")
    return len({m.group(1) for k in state for m in [pattern.fullmatch(k)] if m})


def _shape(state: dict[str, Tensor], key: str, origin: str) -> torch.Size:
    if key not in state:
        raise CheckpointError(f"{origin}: no {key} (native name): not a C4 detector with a box classifier, "
                              f"so mmcn cannot convert it; `mmcn inspect-detector` lists what it has")
    return state[key].shape


def inspect_state_dict(state: dict[str, Tensor], source: str | None = None, origin: str = "state dict",
                       match_presets: bool = True) -> CheckpointInfo:
    """What ``state`` says about itself (see the module docstring). ``match_presets``: try
    each ``detector.arch`` preset's architecture on the meta device."""
    source = source or guess_source(state, origin)
    native, unknown = _native_names(state, source)
    blocks = tuple(_blocks(native, p) for p in ("backbone.res2", "backbone.res3", "backbone.res4", "roi_heads.res5"))
    inner = _shape(native, "backbone.res2.0.conv1.weight", origin)[0]
    groups = inner // _shape(native, "backbone.res2.0.conv2.weight", origin)[1]
    depth = 3 * sum(blocks) + 2
    backbone = f"ResNet-{depth}" if groups == 1 else f"ResNeXt-{depth} {groups}x{inner // groups}d"
    fpn = any("fpn" in k for k in unknown)
    head = "C4 (res5 is the box head)" if blocks[3] else ("FPN (not supported)" if fpn else "no res5 box head")

    cls_rows = _shape(native, "roi_heads.box_predictor.cls_score.weight", origin)[0]
    k = cls_rows - 1
    bbox_rows = _shape(native, "roi_heads.box_predictor.bbox_pred.weight", origin)[0]
    with_background = source == "maskrcnn_benchmark"
    agnostic_rows, per_class_rows = (8, (k + 1) * 4) if with_background else (4, k * 4)
    notes = []
    if bbox_rows == agnostic_rows:
        agnostic = True
        regression = f"class-agnostic ({bbox_rows} rows{': background + object' if with_background else ''})"
    else:
        agnostic = False
        regression = (f"per class ({bbox_rows} rows = {bbox_rows // 4} x 4, "
                      f"{'background included: its 4 are dropped on conversion' if with_background else 'no background rows'})")
        if bbox_rows != per_class_rows:
            notes.append(f"bbox_pred has {bbox_rows} rows, neither class-agnostic ({agnostic_rows}) nor per class "
                         f"({per_class_rows}) for {k} classes")
    bias_key = "roi_heads.box_predictor.cls_score.bias"
    background = row_position(native[bias_key]) if bias_key in native else RowEvidence("unclear", "low", "no bias")
    attr_key = "roi_heads.attribute_predictor.attr_score.bias"
    num_attributes = native[attr_key].shape[0] - 1 if attr_key in native else None
    no_attribute = row_position(native[attr_key]) if attr_key in native else None
    assumed = CONVENTION[source]
    for what, evidence in (("background", background), ("'no attribute'", no_attribute)):
        if evidence is not None and evidence.agrees(assumed) is False:
            notes.append(f"the {what} row looks {evidence.position} from its bias but the {source} format puts it "
                         f"{assumed}; the conversion follows the format, so check the file's origin (a re-exported "
                         f"checkpoint may have reordered rows)")
    rpn = _shape(native, "rpn.head.cls_logits.weight", origin)
    info = CheckpointInfo(
        origin=origin, source=source, backbone=backbone, blocks=blocks, groups=groups,
        width_per_group=inner // groups, head=head, num_classes=k, background=background,
        box_regression=regression, class_agnostic=agnostic, num_attributes=num_attributes,
        no_attribute=no_attribute, anchors_per_location=rpn[0], rpn_channels=rpn[1], notes=notes)
    if match_presets:
        _match_presets(info, state)
    return info


def _placeholder_config(name: str, info: CheckpointInfo) -> DetectorConfig:
    """Preset ``name`` sized to the checkpoint's vocabulary (placeholder names)."""
    return detector_config(name, classes=tuple(f"class {i}" for i in range(info.num_classes)),
                           attributes=tuple(f"attribute {i}" for i in range(max(info.num_attributes or 1, 1))),
                           cls_agnostic_bbox_reg=info.class_agnostic)


def _match_presets(info: CheckpointInfo, state: dict[str, Tensor]) -> None:
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
    for name in PRESETS:
        try:
            config = _placeholder_config(name, info)
            convert_state_dict(meta, info.source, config, strict=True, origin=info.origin)
        except (CheckpointError, ValueError, TypeError):
            continue
        info.presets.append(name)
        preset = detector_config(name)
        if preset.num_classes == info.num_classes and preset.num_attributes == info.num_attributes:
            info.label_presets.append(name)


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """:func:`inspect_state_dict` of a checkpoint file."""
    state = read_state_dict(path)
    return inspect_state_dict(state, origin=str(path))


# --------------------------------------------------------------------------- label maps


@dataclass(frozen=True)
class LabelMap:
    """Object and attribute names in logit-row order (background / none excluded), and their files."""

    classes: tuple[str, ...] | None = None
    attributes: tuple[str, ...] | None = None
    classes_from: str = ""
    attributes_from: str = ""


def _in_index_order(to_idx: dict | None, idx_to: dict | None, keys: tuple[str, str], path: Path) -> tuple[str, ...]:
    """Names at indices 1..N from VinVL's two dicts (either may be missing), checked."""
    where = f"{path}: {keys[0]}/{keys[1]}"
    by_index: dict[int, str] = {}
    if idx_to is not None:
        if not isinstance(idx_to, dict):
            raise CheckpointError(f"{where}: {keys[1]} is not an object")
        for index, name in idx_to.items():
            try:
                by_index[int(index)] = str(name)
            except ValueError:
                raise CheckpointError(f"{where}: {keys[1]} key {index!r} is not an index") from None
    if to_idx is not None:
        if not isinstance(to_idx, dict) or not all(isinstance(v, int) for v in to_idx.values()):
            raise CheckpointError(f"{where}: {keys[0]} must map names to integer indices")
        seen: dict[int, str] = {}
        for name, index in to_idx.items():
            if index in seen:
                raise CheckpointError(f"{where}: {keys[0]} gives index {index} to both {seen[index]!r} and "
                                      f"{name!r}; the row order cannot be recovered")
            seen[index] = name
            if idx_to is not None and by_index.get(index) != name:
                raise CheckpointError(f"{where}: the two directions disagree at index {index} "
                                      f"({keys[0]}: {name!r}, {keys[1]}: {by_index.get(index)!r})")
        if idx_to is not None and len(seen) != len(by_index):
            raise CheckpointError(f"{where}: {keys[0]} has {len(seen)} entries, {keys[1]} {len(by_index)}")
        by_index = seen
    if 0 in by_index and re.sub(r"[^a-z]", "", by_index[0].lower()) in _RESERVED_ZERO:
        del by_index[0]  # the reserved row written out ("__background__", "__no_attribute__")
    if 0 in by_index:
        raise CheckpointError(f"{where}: index 0 is {by_index[0]!r}, but 0 is background / 'no attribute' in "
                              f"VinVL's label map (names start at 1); the rows cannot be matched")
    n = len(by_index)
    gaps = sorted(set(range(1, n + 1)) - set(by_index))
    if gaps:
        raise CheckpointError(f"{where}: indices are not 1..{n} (missing {gaps[:5]}, present up to "
                              f"{max(by_index)}); the row order cannot be recovered")
    return tuple(by_index[i] for i in range(1, n + 1))


def read_label_files(paths: list[str | Path] | tuple[str | Path, ...]) -> LabelMap:
    """A label map from VinVL's ``*.json`` dicts and/or BUTD's ``objects_vocab.txt`` /
    ``attributes_vocab.txt`` (a ``.txt`` whose name contains "attr" holds attributes)."""
    classes = attributes = None
    classes_from = attributes_from = ""

    def put(kind: str, names: tuple[str, ...], origin: str) -> None:
        nonlocal classes, attributes, classes_from, attributes_from
        if (classes if kind == "objects" else attributes) is not None:
            raise CheckpointError(f"{origin}: a second {kind} list (the first came from "
                                  f"{classes_from if kind == 'objects' else attributes_from}); give one")
        if kind == "objects":
            classes, classes_from = names, origin
        else:
            attributes, attributes_from = names, origin

    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such label map file")
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: not a JSON label map ({e})") from e
            if not isinstance(data, dict) or not any(a in data or b in data for a, b in LABEL_MAP_KEYS):
                raise CheckpointError(f"{path}: not a VinVL label map: it needs label_to_idx / idx_to_label "
                                      f"(and attribute_to_idx / idx_to_attribute), as VG-SGG-dicts-vgoi6-clipped.json")
            for kind, keys in zip(("objects", "attributes"), LABEL_MAP_KEYS):
                if any(key in data for key in keys):
                    put(kind, _in_index_order(data.get(keys[0]), data.get(keys[1]), keys, path), str(path))
        elif path.suffix == ".txt":
            put("attributes" if "attr" in path.name.lower() else "objects", load_vocab(path), str(path))
        else:
            raise CheckpointError(f"{path}: a label map is a VinVL .json (label_to_idx ...) or a BUTD "
                                  f"objects_vocab.txt / attributes_vocab.txt")
    return LabelMap(classes, attributes, classes_from, attributes_from)


def _packaged_name(names: tuple[str, ...], fallback: str) -> str:
    for name in PACKAGED:
        if load_vocab(name) == names:
            return f"mmcn/resources/detector/{name}.txt"
    return fallback


def _config(arch: str | DetectorConfig) -> DetectorConfig:
    return arch if isinstance(arch, DetectorConfig) else detector_config(arch)


def resolve_labels(info: CheckpointInfo, arch: str | DetectorConfig | None, labels: LabelMap
                   ) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None, list[str]]:
    """``(classes, attributes, what was assumed)`` for converting ``info``'s checkpoint as
    ``arch`` (a preset name or a config; None: check the given lists only): the given label
    map's lists, else the preset's packaged ones; a size that differs from the checkpoint's is
    a :class:`CheckpointError` naming the file."""
    preset = None if arch is None else _config(arch)
    assumed = []
    result = []
    for kind, given, where, count, rows in (
            ("object", labels.classes, labels.classes_from, info.num_classes, "cls_score"),
            ("attribute", labels.attributes, labels.attributes_from, info.num_attributes, "attr_score")):
        packaged = None if preset is None else (preset.classes if kind == "object" else preset.attributes)
        if given is None and packaged is None:
            result.append(None)
            continue
        if given is None:
            given, where = packaged, _packaged_name(packaged, f"detector.arch {preset.name}'s {kind} list")
            origin = f"{where} (detector.arch {preset.name}'s {kind} names)"
        else:
            origin = where
            if packaged is not None and set(given) == set(packaged) and given != packaged:
                moved = sum(a != b for a, b in zip(given, packaged))
                assumed.append(f"{where}: the same {len(given)} {kind} names as "
                               f"{_packaged_name(packaged, preset.name)} in another order ({moved} rows differ); "
                               f"using {where}'s order")
        if count is None:  # no attribute head: any attribute list is unused
            result.append(given)
            continue
        if len(given) != count:
            raise CheckpointError(
                f"{origin}: {len(given)} {kind} names, but {info.origin} has {count} ({rows} has {count + 1} rows, "
                f"one of them {'background' if kind == 'object' else 'no attribute'}): this label map does not "
                f"belong to this checkpoint; give the one released with it (--labels, or beside the checkpoint "
                f"in the detector.weights folder; README 'Region features from published detectors')")
        assumed.append(f"{kind} names: {origin}, in its order ({count})")
        result.append(given)
    return result[0], result[1], assumed


# --------------------------------------------------------------------------- conversion


@dataclass
class Conversion:
    """A converted detector, what the checkpoint said about itself and what was assumed."""

    model: Detector
    info: CheckpointInfo
    assumed: list[str]

    def log_lines(self) -> list[str]:
        return self.info.summary().splitlines() + [f"assumed: {a}" for a in self.assumed]


def convert_detector(weights: str | Path, arch: str | DetectorConfig,
                     labels: list[str | Path] | tuple[str | Path, ...] = ()) -> Conversion:
    """A BUTD / VinVL checkpoint as a native detector of preset ``arch`` (or of a config for an
    architecture no preset has), its label map checked (``labels``: label map files, else the
    preset's packaged vocabulary). The inspection summary and the assumptions are logged
    (INFO; a disagreement WARNING)."""
    state = read_state_dict(weights)
    origin = str(weights)
    source = guess_source(state, origin)
    info = inspect_state_dict(state, source, origin)
    base = _config(arch)
    if info.presets and base.name not in info.presets:
        raise CheckpointError(f"{origin}: a {info.backbone} {FORMATS[source].split(' (')[0]} checkpoint, which fits "
                              f"detector.arch {' / '.join(info.presets)}, not {base.name}; set detector.arch "
                              f"(--arch) to {info.presets[0]}")
    classes, attributes, assumed = resolve_labels(info, base, read_label_files(labels))
    config = base.replace(classes=classes, attributes=attributes, cls_agnostic_bbox_reg=info.class_agnostic)
    assumed.insert(0, f"background row {info.assumed_background} of cls_score and 'no attribute' row "
                      f"{info.assumed_background} of attr_score ({source} convention)"
                      + (", moved to row 0" if info.assumed_background == "last" else ", row 0 as in mmcn's model"))
    if info.class_agnostic:
        assumed.append("class-agnostic box regression (cls_agnostic_bbox_reg=True)")
    model = detector_from_state(state, source, config, origin=origin)
    conversion = Conversion(model, info, assumed)
    for line in conversion.log_lines():
        log.info("%s", line)
    for note in info.notes:
        log.warning("%s: %s", origin, note)
    return conversion
