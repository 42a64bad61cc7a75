"""Detector architecture configs: the frozen ``DetectorConfig`` and the named presets.

Presets (``detector_config(name)``):

- ``"small"``: the CPU demo detector (6 shapes, 9 attributes, 128 px images, upsampled to
  192 px inside so that 20 px shapes span more than one stride-16 cell). A tiny ResNet
  (one torchvision ``Bottleneck`` per stage, res2/res3/res4 = 128/256/128 channels), 64
  sampled RoIs per image, 7x7 RoIAlign with one sample per bin, a one-block res5 head of
  128 channels whose mean-pooled output is linearly projected (+ReLU) to 2048, so its
  region features have the real detectors' width. About 0.33 s per training step of 8
  images on 2 CPU cores; AdamW (lr 2e-3) learns it much faster than SGD.
- ``"butd_r101_c4"``: bottom-up-attention's Visual Genome R101-C4 (1600 objects / 400
  attributes) as ported to detectron2 by airsplay/py-bottom-up-attention
  (``faster_rcnn_R_101_C4_attr_caffemaxpool.yaml``): MSRA ResNet-101 (stride in the 1x1
  conv), caffe max-pool (k3 s2 p0 ceil), RPN on res4 with a 512-channel hidden conv and
  anchors 64..512 x ratios 0.5/1/2 (12 per location; the real config has no 32), RoIPool
  14x14 at 1/16, res5 with stride 1 and dilation 2, BGR 0-255 input minus
  [102.9801, 115.9465, 122.7717].
- ``"vinvl_x152_c4"``: VinVL's X152-C4 (``sgg_configs/vgattr/vinvl_x152c4.yaml`` of
  microsoft/scene_graph_benchmark): ResNeXt-152 32x8d (stride in the 3x3 conv), RPN
  anchors 32..512 x 0.5/1/2 (15) with maskrcnn_benchmark's legacy cell anchors,
  RoIAlign 14x14 (sampling_ratio 0, aligned=False), res5 = maskrcnn_benchmark's
  ``ResNetHead`` for stage 4 with ``stride_init=None`` -> stride 2, dilation 1
  (``RES5_DILATION`` default 1), FrozenBN without eps, legacy "+1" box coder, BGR 0-255
  input minus [103.530, 116.280, 123.675] (the value in that yaml; maskrcnn_benchmark's
  default would be 102.9801, 115.9465, 122.7717).

Feature extraction in both papers uses the RPN proposals as the final boxes (BUTD's
``generate_tsv.py``; VinVL's ``TEST.IGNORE_BOX_REGRESSION True``), so both presets set
``test_box_regression=False``; the small detector regresses its boxes.

``fidelity`` picks the pre/post-processing rules (see :mod:`mmcn.vision.reference`):
``"native"`` (torchvision's RPN filtering, rounded bilinear resize, torchvision NMS; the
demo detector), ``"vinvl"`` (maskrcnn_benchmark / scene_graph_benchmark as they made
VinVL's released features) or ``"butd"`` (the caffe bottom-up-attention code and its
``generate_tsv.py``; ``butd_proposals`` chooses caffe's proposal layer or the detectron2
port's). The BUTD and VinVL presets default to their reference rules. A saved
``config.json`` that lacks a field (written before the field existed) takes the value of
the preset it names (``name``), else the dataclass default: an old converted
``vinvl_x152_c4`` folder loads with ``fidelity="vinvl"``, an old demo folder with ``"native"``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mmcn.vision.vocab import display_label, load_vocab

SMALL_CLASSES = ("circle", "square", "triangle", "star", "heart", "cross")
SMALL_ATTRIBUTES = ("red", "green", "blue", "yellow", "purple", "orange", "black", "large", "small")

NORMS = ("bn", "frozen_bn")
POOLERS = ("align", "pool")
ANCHOR_STYLES = ("torchvision", "detectron2", "maskrcnn_benchmark")
FIDELITIES = ("native", "vinvl", "butd")
BUTD_PROPOSALS = ("caffe", "detectron2")


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that fixes a detector's architecture, pre/post-processing and vocabulary.

    Label conventions of the native model: object logits have ``len(classes) + 1`` rows
    with background at index 0 (class ``classes[i]`` is label ``i + 1``); attribute logits
    have ``len(attributes) + 1`` rows with "no attribute" at index 0.
    """

    name: str = "small"
    classes: tuple[str, ...] = SMALL_CLASSES
    attributes: tuple[str, ...] = SMALL_ATTRIBUTES

    # input: callers pass RGB 0-255; the model reorders to input_format and normalises
    input_format: str = "RGB"  # channel order the first conv was trained on: "RGB" or "BGR"
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # in input_format order
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    min_size: int = 192  # shorter side after resizing
    max_size: int = 320  # cap on the longer side
    size_divisibility: int = 16  # pad the batch to a multiple of this (0: no rounding)

    # backbone: stem + res2..res4 (stride 16), res5 is the box head
    stem_channels: int = 32
    caffe_maxpool: bool = False  # kernel 3 stride 2 padding 0 ceil_mode=True (caffe) vs padding 1
    stage_blocks: tuple[int, int, int, int] = (1, 1, 1, 1)  # Bottleneck blocks in res2..res5
    stage_planes: tuple[int, int, int, int] = (32, 64, 32, 32)  # torchvision `planes`; out = 4 * planes
    groups: int = 1
    width_per_group: int = 64  # torchvision `base_width`: width = planes * width_per_group / 64 * groups
    stride_in_1x1: bool = False  # MSRA/caffe ResNets stride in the first 1x1 conv
    res5_stride: int = 1
    res5_dilation: int = 1
    norm: str = "bn"  # "bn" (trainable BatchNorm2d) or "frozen_bn" (FrozenBatchNorm2d)
    norm_eps: float = 1e-5
    freeze_at: int = 0  # 0: train all; 1: freeze stem; 2: stem + res2; ...

    # RPN on res4
    anchor_sizes: tuple[float, ...] = (24.0, 48.0, 96.0)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_style: str = "torchvision"  # cell anchor coordinates; see detector.CellAnchorGenerator
    rpn_channels: int = 128  # hidden 3x3 conv width
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_batch_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 256
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 100
    rpn_nms: float = 0.7

    # RoI head
    pooler: str = "align"  # "align" (torchvision roi_align) or "pool" (roi_pool)
    pooler_resolution: int = 7
    pooler_sampling_ratio: int = 1
    pooler_aligned: bool = True
    roi_batch_per_image: int = 64
    roi_positive_fraction: float = 0.25
    roi_fg_iou: float = 0.5
    roi_bg_iou: float = 0.5
    box_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    cls_agnostic_bbox_reg: bool = False
    legacy_plus_one: bool = False  # maskrcnn_benchmark / Detectron box widths x2 - x1 + 1
    roi_smooth_l1_beta: float = 1.0 / 9
    feature_dim: int = 2048  # region feature width; res5 output is projected to it if different

    # attribute head: Embedding(classes + 1, embed) of the class, concat feature -> fc -> logits
    attr_embed_dim: int = 256
    attr_hidden_dim: int = 512
    attribute_loss_weight: float = 0.5

    # inference
    score_thresh: float = 0.2
    nms_thresh: float = 0.3
    min_boxes: int = 10
    max_boxes: int = 100
    attr_score_thresh: float = 0.1
    max_attributes: int = 3  # per box
    max_attributes_per_image: int = 0  # VinVL's MAX_NUM_ATTR_PER_IMG (fidelity "vinvl" only; 0: no cap)
    test_box_regression: bool = True

    # reference fidelity (mmcn.vision.reference): "native" | "vinvl" | "butd"
    fidelity: str = "native"
    butd_proposals: str = "caffe"  # fidelity "butd": "caffe" (published BUTD features) | "detectron2" (the port)

    def __post_init__(self) -> None:
        checks = [
            (self.input_format in ("RGB", "BGR"), f"input_format must be 'RGB' or 'BGR', got {self.input_format!r}"),
            (self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}"),
            (self.pooler in POOLERS, f"pooler must be one of {POOLERS}, got {self.pooler!r}"),
            (self.anchor_style in ANCHOR_STYLES, f"anchor_style must be one of {ANCHOR_STYLES}, got {self.anchor_style!r}"),
            (self.fidelity in FIDELITIES, f"fidelity must be one of {FIDELITIES}, got {self.fidelity!r}"),
            (self.butd_proposals in BUTD_PROPOSALS,
             f"butd_proposals must be one of {BUTD_PROPOSALS}, got {self.butd_proposals!r}"),
            (self.max_attributes >= 1 and self.max_attributes_per_image >= 0,
             f"need max_attributes >= 1 and max_attributes_per_image >= 0, got {self.max_attributes}, "
             f"{self.max_attributes_per_image}"),
            (len(self.classes) > 0 and len(self.attributes) > 0, "classes and attributes must not be empty"),
            (len(self.stage_blocks) == 4 and len(self.stage_planes) == 4, "stage_blocks/stage_planes need 4 entries (res2..res5)"),
            (0 <= self.min_boxes <= self.max_boxes, f"need 0 <= min_boxes <= max_boxes, got {self.min_boxes}, {self.max_boxes}"),
            (0 <= self.freeze_at <= 4, f"freeze_at must be in 0..4, got {self.freeze_at}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DetectorConfig {self.name!r}: {message}")

    @property
    def num_classes(self) -> int:
        """Foreground object classes (logits have one more, background at index 0)."""
        return len(self.classes)

    @property
    def num_attributes(self) -> int:
        """Attributes (logits have one more, "no attribute" at index 0)."""
        return len(self.attributes)

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_ratios)

    @property
    def rpn_rule(self) -> str:
        """How proposals are filtered after decoding (:func:`mmcn.vision.reference.proposals`):
        ``"torchvision"`` (native), ``"maskrcnn"`` (VinVL), ``"caffe"`` or ``"detectron2"`` (BUTD)."""
        return {"native": "torchvision", "vinvl": "maskrcnn"}.get(self.fidelity, self.butd_proposals)

    @property
    def rpn_anchor_style(self) -> str:
        """Cell anchors the RPN decodes from: caffe's proposal layer uses py-faster-rcnn's
        ``generate_anchors`` (centred, rounded: the ``"maskrcnn_benchmark"`` style) whatever
        ``anchor_style`` the converted detectron2 port says."""
        return "maskrcnn_benchmark" if self.rpn_rule == "caffe" else self.anchor_style

    @property
    def class_labels(self) -> tuple[str, ...]:
        return tuple(display_label(c) for c in self.classes)

    @property
    def attribute_labels(self) -> tuple[str, ...]:
        return tuple(display_label(a) for a in self.attributes)

    def replace(self, **changes: Any) -> "DetectorConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DetectorConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error. Missing keys (a config saved
        before they existed) take the values of the preset named by ``data["name"]`` when there
        is one, else the dataclass defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"DetectorConfig: unknown keys {unknown}; known keys: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        missing = known - set(values)
        if missing and data.get("name") in PRESETS:
            preset = PRESETS[data["name"]]()
            values.update({k: getattr(preset, k) for k in missing})
        return cls(**values)


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"non-finite config value {value}")
    return value


def _butd_r101_c4() -> DetectorConfig:
    return DetectorConfig(
        name="butd_r101_c4",
        classes=load_vocab("vg1600_objects"),
        attributes=load_vocab("vg400_attributes"),
        input_format="BGR",
        pixel_mean=(102.9801, 115.9465, 122.7717),
        pixel_std=(1.0, 1.0, 1.0),
        min_size=600,
        max_size=1000,
        size_divisibility=0,
        stem_channels=64,
        caffe_maxpool=True,
        stage_blocks=(3, 4, 23, 3),
        stage_planes=(64, 128, 256, 512),
        groups=1,
        width_per_group=64,
        stride_in_1x1=True,
        res5_stride=1,
        res5_dilation=2,
        norm="frozen_bn",
        norm_eps=1e-5,
        freeze_at=2,
        anchor_sizes=(64.0, 128.0, 256.0, 512.0),
        anchor_ratios=(0.5, 1.0, 2.0),
        anchor_style="detectron2",
        rpn_channels=512,
        rpn_pre_nms_train=12000,
        rpn_post_nms_train=2000,
        rpn_pre_nms_test=6000,
        rpn_post_nms_test=300,
        pooler="pool",
        pooler_resolution=14,
        pooler_sampling_ratio=0,
        pooler_aligned=False,
        roi_batch_per_image=512,
        roi_positive_fraction=0.25,
        legacy_plus_one=False,
        roi_smooth_l1_beta=0.0,
        attr_score_thresh=0.1,
        max_attributes=1,  # generate_tsv's followers: the argmax attribute, shown above 0.1
        test_box_regression=False,
        fidelity="butd",
        butd_proposals="caffe",
    )


def _vinvl_x152_c4() -> DetectorConfig:
    return DetectorConfig(
        name="vinvl_x152_c4",
        classes=load_vocab("vinvl1594_objects"),
        attributes=load_vocab("vinvl524_attributes"),
        input_format="BGR",
        pixel_mean=(103.530, 116.280, 123.675),
        pixel_std=(1.0, 1.0, 1.0),
        min_size=600,
        max_size=1000,
        size_divisibility=0,
        stem_channels=64,
        caffe_maxpool=False,
        stage_blocks=(3, 8, 36, 3),
        stage_planes=(64, 128, 256, 512),
        groups=32,
        width_per_group=8,
        stride_in_1x1=False,
        res5_stride=2,
        res5_dilation=1,
        norm="frozen_bn",
        norm_eps=0.0,
        freeze_at=2,
        anchor_sizes=(32.0, 64.0, 128.0, 256.0, 512.0),
        anchor_ratios=(0.5, 1.0, 2.0),
        anchor_style="maskrcnn_benchmark",
        rpn_channels=1024,
        rpn_pre_nms_train=12000,
        rpn_post_nms_train=2000,
        rpn_pre_nms_test=6000,
        rpn_post_nms_test=300,
        pooler="align",
        pooler_resolution=14,
        pooler_sampling_ratio=0,
        pooler_aligned=False,
        roi_batch_per_image=384,
        roi_positive_fraction=0.5,
        legacy_plus_one=True,
        roi_smooth_l1_beta=1.0,
        attr_score_thresh=0.05,  # POSTPROCESS_ATTRIBUTES_THRESHOLD
        max_attributes=16,  # sg_defaults MAX_NUM_ATTR_PER_OBJ
        max_attributes_per_image=100,  # sg_defaults MAX_NUM_ATTR_PER_IMG
        test_box_regression=False,
        fidelity="vinvl",
    )


PRESETS = {
    "small": DetectorConfig,
    "butd_r101_c4": _butd_r101_c4,
    "vinvl_x152_c4": _vinvl_x152_c4,
}


def detector_config(name: str, **overrides: Any) -> DetectorConfig:
    """The preset called ``name`` (see the module docstring), with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown detector config {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)
