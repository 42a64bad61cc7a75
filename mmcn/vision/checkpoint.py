"""Loading detectron2 (BUTD) and maskrcnn_benchmark (VinVL) checkpoints into the native detector.

Neither detectron2 nor maskrcnn_benchmark is needed: the files are read as plain tensors
and renamed/reshaped onto :class:`mmcn.vision.detector.Detector`'s state dict. (Where
detectron2 is installed one could load through it instead; that is not implemented,
because the native path needs no compiled extension and gives the same tensors.)

Reading (:func:`read_state_dict`), never executing code from the file:

- ``.pth`` / ``.pt`` / anything ``torch.save`` wrote: ``torch.load(weights_only=True)``.
- ``.pkl`` (detectron2 / airsplay, a pickled ``{"model": {name: numpy array}, ...}``): a
  restricted unpickler that allows only containers and numpy arrays; any other global
  (``os.system``, ``torch._utils``...) is refused with :class:`CheckpointError`.
- ``.safetensors``.

Mapping (:func:`convert_state_dict`), with the facts it relies on:

- detectron2 names (airsplay/py-bottom-up-attention's ``faster_rcnn_from_caffe_attr.pkl``):
  ``backbone.stem.conv1.{weight,norm.*}``, ``backbone.res{2,3,4}.{i}.conv{1,2,3}.{weight,norm.*}``,
  ``...shortcut.{weight,norm.*}``, ``roi_heads.res5.{i}.*``, ``proposal_generator.rpn_head.{conv,
  objectness_logits,anchor_deltas}.*``, ``roi_heads.box_predictor.{cls_score (K+1, background
  LAST), bbox_pred (K*4), cls_embedding (K+1, background last), fc_attr, attr_score (A+1)}``.
  airsplay's extraction code reads attribute probabilities as ``softmax(attr_logits[..., :-1])``
  indexed straight into the 400-word vocabulary, so "no attribute" is LAST there too.
  Background / "no attribute" rows move to index 0. detectron2 lists a cell's anchors
  size-major (``for size: for ratio``); the objectness / delta channels are permuted to the
  native ratio-major order (deltas keep their ``4a + k`` interleaving, per anchor).
- maskrcnn_benchmark names (VinVL ``vinvl_vg_x152c4.pth``, optional ``module.`` prefix):
  ``backbone.body.stem.{conv1,bn1}``, ``backbone.body.layer{1,2,3}.{i}.{conv,bn}{1,2,3}`` /
  ``downsample.{0,1}``, ``roi_heads.box.feature_extractor.head.layer4.{i}.*`` (res5),
  ``rpn.head.{conv,cls_logits,bbox_pred}``, ``rpn.anchor_generator.cell_anchors.0`` (checked
  against the config's anchors, then dropped), ``roi_heads.box.predictor.{cls_score (K+1,
  background FIRST), bbox_pred ((K+1)*4: the background's 4 rows are dropped; class-agnostic
  2*4: the last 4 are kept)}``, ``attribute.predictor.{cls_embedding, fc_attr, attr_score
  (A+1, none first)}``, ``attribute.feature_extractor.*`` (the box head's res5, shared by
  ``SHARE_BOX_FEATURE_EXTRACTOR``; checked equal, then dropped). Its anchors are already
  ratio-major. Its weights expect the legacy "+1" box coder: use a config with
  ``legacy_plus_one=True`` (the ``vinvl_x152_c4`` preset does).
- FrozenBatchNorm without ``running_mean`` / ``running_var`` (older files) gets 0 / 1.
- BGR: the converted first conv is left as is; the presets declare ``input_format="BGR"``.
"""
from __future__ import annotations

import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from mmcn.vision.config import DetectorConfig, detector_config
from mmcn.vision.detector import Detector, cell_anchors

log = logging.getLogger(__name__)

SOURCES = ("detectron2", "maskrcnn_benchmark", "native")
_BN = r"(weight|bias|running_mean|running_var)"
_MAX_LISTED = 12


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the detector config."""


# --------------------------------------------------------------------------- reading

_PICKLE_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # arrays pickled with protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes with protocol 2 (array buffers)
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles containers and numpy arrays only; any other global is refused."""

    def __init__(self, file: Any, origin: str):
        super().__init__(file, encoding="latin1")  # detectron2 reads Python 2 pickles this way
        self.origin = origin

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED and not (module == "numpy.dtypes" and name.endswith("DType")):
            raise CheckpointError(
                f"{self.origin}: refusing to unpickle {module}.{name}: a detectron2 .pkl checkpoint may only "
                f"hold dicts, lists and numpy arrays. If you trust this file, load it yourself and save its "
                f"state dict with torch.save or safetensors, then load that.")
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The name -> tensor dict of a checkpoint file (unwrapping ``{"model": ...}``), without running its code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    if zipfile.is_zipfile(path) or path.suffix in (".pth", ".pt", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: torch.load(weights_only=True) refused it ({e}); it holds objects "
                                  f"besides tensors. If you trust it, re-save only its state dict.") from e
    else:
        with open(path, "rb") as f:
            try:
                obj = _ArrayUnpickler(f, str(path)).load()
            except (pickle.UnpicklingError, EOFError) as e:
                raise CheckpointError(f"{path}: not a readable pickle ({e})") from e
    return _unwrap(obj, str(path))


def _unwrap(obj: Any, origin: str) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{origin}: expected a dict of weights (or {{'model': ...}}), got {type(obj).__name__}")
    state = {}
    for name, value in obj.items():
        if isinstance(value, np.ndarray):
            value = np.ascontiguousarray(value)
            value = torch.from_numpy(value if value.flags.writeable else value.copy())
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{origin}: entry {name!r} is a {type(value).__name__}, not an array")
        state[str(name)] = value
    return state


def guess_source(state: dict[str, Tensor], origin: str = "the checkpoint") -> str:
    """``"detectron2"``, ``"maskrcnn_benchmark"`` or ``"native"`` from the key names. An
    ImageNet classification checkpoint (torchvision ResNet keys) or an unknown layout is a
    :class:`CheckpointError` that says what the file is and what to do instead."""
    keys = [_strip_module(k) for k in state]
    if any(k.startswith(("backbone.body.", "roi_heads.box.")) for k in keys):
        return "maskrcnn_benchmark"
    if any(k.startswith("proposal_generator.") or re.match(r"backbone\.res\d\.\d+\.conv\d\.norm\.", k) for k in keys):
        return "detectron2"
    if any(k.startswith(("backbone.stem.bn1.", "roi_heads.box_predictor.", "rpn.head.")) for k in keys):
        return "native"
    if any(re.match(r"res\d_\d+_branch", k) for k in keys):
        raise CheckpointError(f"{origin}: this looks like a Caffe2 / Detectron1 blob file (res2_0_branch2a_w ...); "
                              f"convert it to detectron2 names with detectron2's c2 model loading first")
    if "fc.weight" in keys and "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        classes = next(v.shape[0] for k, v in state.items() if _strip_module(k) == "fc.weight")
        raise CheckpointError(
            f"{origin}: an image classification checkpoint (torchvision ResNet/ResNeXt keys conv1, layer1..4, fc "
            f"with {classes} classes), not "
            f"a detector: it has no region proposal or box heads to convert. For features from it use the "
            f"grid-feature fallback (detector.arch: grid_resnet; README 'No detector weights: grid features'); for "
            f"region features give a detection checkpoint (BUTD faster_rcnn_from_caffe_attr.pkl, VinVL "
            f"vinvl_vg_x152c4.pth)")
    raise CheckpointError(
        f"{origin}: cannot tell its format: not a detectron2 (BUTD) or maskrcnn_benchmark (VinVL) detection "
        f"checkpoint, no key names either uses (first: {keys[:5]}); README 'Region features from published "
        f"detectors' names the files mmcn converts")


def _strip_module(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


# --------------------------------------------------------------------------- renaming rules

_RES = r"(?:conv[123]\.weight|bn[123]\.\w+|downsample\.[01]\.\w+)"

_DETECTRON2_RULES = [
    (r"backbone\.stem\.conv1\.weight", r"backbone.stem.conv1.weight"),
    (rf"backbone\.stem\.conv1\.norm\.{_BN}", r"backbone.stem.bn1.\1"),
    (r"(backbone\.res[234]|roi_heads\.res5)\.(\d+)\.conv([123])\.weight", r"\1.\2.conv\3.weight"),
    (rf"(backbone\.res[234]|roi_heads\.res5)\.(\d+)\.conv([123])\.norm\.{_BN}", r"\1.\2.bn\3.\4"),
    (r"(backbone\.res[234]|roi_heads\.res5)\.(\d+)\.shortcut\.weight", r"\1.\2.downsample.0.weight"),
    (rf"(backbone\.res[234]|roi_heads\.res5)\.(\d+)\.shortcut\.norm\.{_BN}", r"\1.\2.downsample.1.\3"),
    (r"proposal_generator\.rpn_head\.conv\.(weight|bias)", r"rpn.head.conv.\1"),
    (r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)", r"rpn.head.cls_logits.\1"),
    (r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)", r"rpn.head.bbox_pred.\1"),
    (r"roi_heads\.box_predictor\.cls_score\.(weight|bias)", r"roi_heads.box_predictor.cls_score.\1"),
    (r"roi_heads\.box_predictor\.bbox_pred\.(weight|bias)", r"roi_heads.box_predictor.bbox_pred.\1"),
    (r"roi_heads\.box_predictor\.cls_embedding\.weight", r"roi_heads.attribute_predictor.cls_embed.weight"),
    (r"roi_heads\.box_predictor\.fc_attr\.(weight|bias)", r"roi_heads.attribute_predictor.fc.\1"),
    (r"roi_heads\.box_predictor\.attr_score\.(weight|bias)", r"roi_heads.attribute_predictor.attr_score.\1"),
]
_DETECTRON2_IGNORED = [r"pixel_(mean|std)", r".*\.num_batches_tracked", r"proposal_generator\.anchor_generator\..*"]

_MASKRCNN_RULES = [
    (r"backbone\.body\.stem\.conv1\.weight", r"backbone.stem.conv1.weight"),
    (rf"backbone\.body\.stem\.bn1\.{_BN}", r"backbone.stem.bn1.\1"),
    (rf"backbone\.body\.layer1\.(\d+)\.({_RES})", r"backbone.res2.\1.\2"),
    (rf"backbone\.body\.layer2\.(\d+)\.({_RES})", r"backbone.res3.\1.\2"),
    (rf"backbone\.body\.layer3\.(\d+)\.({_RES})", r"backbone.res4.\1.\2"),
    (rf"roi_heads\.box\.feature_extractor\.head\.layer4\.(\d+)\.({_RES})", r"roi_heads.res5.\1.\2"),
    (r"rpn\.head\.(conv|cls_logits|bbox_pred)\.(weight|bias)", r"rpn.head.\1.\2"),
    (r"roi_heads\.box\.predictor\.(cls_score|bbox_pred)\.(weight|bias)", r"roi_heads.box_predictor.\1.\2"),
    (r"(?:roi_heads\.)?attribute\.predictor\.cls_embedding\.weight", r"roi_heads.attribute_predictor.cls_embed.weight"),
    (r"(?:roi_heads\.)?attribute\.predictor\.fc_attr\.(weight|bias)", r"roi_heads.attribute_predictor.fc.\1"),
    (r"(?:roi_heads\.)?attribute\.predictor\.attr_score\.(weight|bias)", r"roi_heads.attribute_predictor.attr_score.\1"),
]
_MASKRCNN_IGNORED = [r".*\.num_batches_tracked", r"pixel_(mean|std)"]
_MASKRCNN_SHARED_RES5 = re.compile(rf"(?:roi_heads\.)?attribute\.feature_extractor\.head\.layer4\.(\d+)\.({_RES})")
_MASKRCNN_CELL_ANCHORS = re.compile(r"rpn\.anchor_generator\.cell_anchors\.0")


def _rename(state: dict[str, Tensor], rules: list[tuple[str, str]], ignored: list[str]
            ) -> tuple[dict[str, Tensor], list[str], dict[str, str]]:
    """(renamed state, source keys no rule knows, native key -> source key)."""
    compiled = [(re.compile(p), r) for p, r in rules]
    ignore = [re.compile(p) for p in ignored]
    out, unknown, origin = {}, [], {}
    for key, value in state.items():
        name = _strip_module(key)
        for pattern, replacement in compiled:
            if pattern.fullmatch(name):
                new = pattern.sub(replacement, name)
                out[new], origin[new] = value, key
                break
        else:
            if not any(p.fullmatch(name) for p in ignore):
                unknown.append(key)
    return out, unknown, origin


# --------------------------------------------------------------------------- tensor fixes


def _last_row_first(t: Tensor) -> Tensor:
    """Move the last row (background / no-attribute in detectron2) to index 0."""
    return torch.cat([t[-1:], t[:-1]])


def _anchor_permutation(config: DetectorConfig) -> Tensor:
    """``perm[native] = detectron2 index``: native anchor r*S+s is detectron2's s*R+r."""
    n_sizes, n_ratios = len(config.anchor_sizes), len(config.anchor_ratios)
    return torch.tensor([s * n_ratios + r for r in range(n_ratios) for s in range(n_sizes)])


def _check_anchor_count(t: Tensor, per_anchor: int, config: DetectorConfig, key: str) -> None:
    if t.shape[0] != config.num_anchors * per_anchor:
        raise CheckpointError(
            f"{key} has {t.shape[0] // per_anchor} anchors per location but config {config.name!r} has "
            f"{len(config.anchor_sizes)} sizes x {len(config.anchor_ratios)} ratios = {config.num_anchors}; "
            f"set anchor_sizes / anchor_ratios to the checkpoint's")


def _detectron2_fixes(state: dict[str, Tensor], config: DetectorConfig, origin: dict[str, str]) -> None:
    perm = _anchor_permutation(config)
    for key in list(state):
        t = state[key]
        if key.startswith("rpn.head.cls_logits."):
            _check_anchor_count(t, 1, config, origin[key])
            state[key] = t[perm]
        elif key.startswith("rpn.head.bbox_pred."):
            _check_anchor_count(t, 4, config, origin[key])
            state[key] = t.reshape(config.num_anchors, 4, *t.shape[1:])[perm].reshape(t.shape)
        elif key.startswith("roi_heads.box_predictor.cls_score.") and t.shape[0] == config.num_classes + 1:
            state[key] = _last_row_first(t)
        elif key == "roi_heads.attribute_predictor.cls_embed.weight" and t.shape[0] == config.num_classes + 1:
            state[key] = _last_row_first(t)
        elif key.startswith("roi_heads.attribute_predictor.attr_score.") and t.shape[0] == config.num_attributes + 1:
            state[key] = _last_row_first(t)


def _maskrcnn_fixes(state: dict[str, Tensor], config: DetectorConfig, origin: dict[str, str]) -> None:
    for key in list(state):
        t = state[key]
        if key.startswith("rpn.head.cls_logits."):
            _check_anchor_count(t, 1, config, origin[key])
        elif key.startswith("rpn.head.bbox_pred."):
            _check_anchor_count(t, 4, config, origin[key])
        elif key.startswith("roi_heads.box_predictor.bbox_pred."):
            if config.cls_agnostic_bbox_reg and t.shape[0] == 8:
                state[key] = t[4:]  # maskrcnn_benchmark's agnostic regression: [background, object]
            elif not config.cls_agnostic_bbox_reg and t.shape[0] == (config.num_classes + 1) * 4:
                state[key] = t[4:]  # drop the background class's 4 rows


def _maskrcnn_extras(state: dict[str, Tensor], config: DetectorConfig, converted: dict[str, Tensor],
                     origin_name: str) -> None:
    """Check the stored cell anchors and the attribute head's shared res5 copy."""
    for key, value in state.items():
        name = _strip_module(key)
        if _MASKRCNN_CELL_ANCHORS.fullmatch(name):
            expected = cell_anchors(config.anchor_sizes, config.anchor_ratios, config.anchor_style)
            if value.device.type != "meta" and (value.shape != expected.shape
                                                or not torch.allclose(value.float().cpu(), expected, atol=1e-3)):
                raise CheckpointError(
                    f"{origin_name}: {key} {value.tolist() if value.numel() <= 80 else tuple(value.shape)} differs "
                    f"from config {config.name!r}'s cell anchors ({config.anchor_style} style, sizes "
                    f"{config.anchor_sizes}, ratios {config.anchor_ratios}); fix the anchor fields")
        match = _MASKRCNN_SHARED_RES5.fullmatch(name)
        if match:
            native = f"roi_heads.res5.{match.group(1)}.{match.group(2)}"
            box = converted.get(native)
            if box is not None and value.device.type != "meta" and (
                    box.shape != value.shape or not torch.equal(box, value)):
                raise CheckpointError(
                    f"{origin_name}: {key} differs from the box head's res5: this model has a separate attribute "
                    f"feature extractor, which the native detector (one shared res5) cannot hold")


def _fill_frozen_bn(state: dict[str, Tensor], expected: dict[str, torch.Size]) -> None:
    for key in expected:
        for stat, fill in (("running_mean", 0.0), ("running_var", 1.0)):
            if key.endswith("." + stat) and key not in state:
                weight = state.get(key[: -len(stat)] + "weight")
                if weight is not None:
                    state[key] = torch.full_like(weight, fill)


# --------------------------------------------------------------------------- public API


def expected_state_shapes(config: DetectorConfig) -> dict[str, torch.Size]:
    """Native state-dict key -> shape for a config (built on the meta device: no memory, fast)."""
    with torch.device("meta"):
        model = Detector(config)
    return {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def convert_state_dict(state: dict[str, Tensor], source: str, config: DetectorConfig | str,
                       strict: bool = True, origin: str = "state dict") -> dict[str, Tensor]:
    """Rename and reshape a ``source``-format state dict onto the native detector's keys.

    ``strict``: raise :class:`CheckpointError` listing missing / unexpected / mis-shaped
    keys; otherwise log them and return what fits. Tensors may live on the meta device.
    """
    if isinstance(config, str):
        config = detector_config(config)
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "native":
        converted, unknown = {_strip_module(k): v for k, v in state.items()}, []
    elif source == "detectron2":
        converted, unknown, names = _rename(state, _DETECTRON2_RULES, _DETECTRON2_IGNORED)
        _detectron2_fixes(converted, config, names)
    else:
        shared = [k for k in state if _MASKRCNN_SHARED_RES5.fullmatch(_strip_module(k))
                  or _MASKRCNN_CELL_ANCHORS.fullmatch(_strip_module(k))]
        converted, unknown, names = _rename({k: v for k, v in state.items() if k not in shared},
                                            _MASKRCNN_RULES, _MASKRCNN_IGNORED)
        _maskrcnn_fixes(converted, config, names)
        _maskrcnn_extras({k: state[k] for k in shared}, config, converted, origin)

    expected = expected_state_shapes(config)
    _fill_frozen_bn(converted, expected)
    converted = {k: v.float() if v.is_floating_point() else v for k, v in converted.items()}
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(unknown + [k for k in converted if k not in expected and not k.endswith("num_batches_tracked")])
    mismatched = sorted(f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k])}"
                        for k in set(expected) & set(converted) if converted[k].shape != expected[k])
    if missing or unexpected or mismatched:
        message = _mismatch_message(origin, source, config, missing, unexpected, mismatched)
        if strict:
            raise CheckpointError(message)
        log.warning("%s", message)
    return {k: v for k, v in converted.items() if k in expected and v.shape == expected[k]}


def _mismatch_message(origin: str, source: str, config: DetectorConfig, missing: list[str],
                      unexpected: list[str], mismatched: list[str]) -> str:
    def listed(items: list[str]) -> str:
        more = f"\n      ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
        return "".join(f"\n      {k}" for k in items[:_MAX_LISTED]) + more

    parts = [f"{origin} ({source} format) does not fit detector config {config.name!r}:"]
    if missing:
        parts.append(f"  missing ({len(missing)}): weights the model needs that the checkpoint lacks — is it another "
                     f"architecture (depth, groups, attribute head)? Pick the matching preset.{listed(missing)}")
    if unexpected:
        parts.append(f"  unexpected ({len(unexpected)}): checkpoint weights with no place in the model — wrong "
                     f"source= (one of {SOURCES}) or a head it does not have (e.g. masks).{listed(unexpected)}")
    if mismatched:
        parts.append(f"  shape mismatch ({len(mismatched)}): vocabulary size, anchors or widths differ — set the "
                     f"config's classes/attributes/anchor/stage fields to the checkpoint's.{listed(mismatched)}")
    parts.append("  Pass strict=False to load what fits anyway (the rest keeps its random init).")
    return "\n".join(parts)


def load_checkpoint(path: str | Path, config: DetectorConfig | str, source: str | None = None,
                    strict: bool = True, map_location: str | torch.device = "cpu") -> Detector:
    """A detector with a detectron2 / maskrcnn_benchmark / native checkpoint's weights, in eval mode.

    ``source`` defaults to a guess from the key names (:func:`guess_source`).
    """
    if isinstance(config, str):
        config = detector_config(config)
    state = read_state_dict(path)
    source = source or guess_source(state, str(path))
    return detector_from_state(state, source, config, strict=strict, origin=str(path)).to(map_location)


def detector_from_state(state: dict[str, Tensor], source: str, config: DetectorConfig, strict: bool = True,
                        origin: str = "state dict") -> Detector:
    """A detector holding a ``source``-format state dict's weights (:func:`convert_state_dict`), in eval mode."""
    converted = convert_state_dict(state, source, config, strict=strict, origin=origin)
    model = Detector(config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if strict and (missing or unexpected):  # convert_state_dict already checked; this guards the guard
        raise CheckpointError(f"{origin}: missing {missing[:_MAX_LISTED]}, unexpected {unexpected[:_MAX_LISTED]}")
    return model.eval()

