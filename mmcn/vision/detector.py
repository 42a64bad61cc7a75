"""The native C4 Faster R-CNN with an attribute head, built from torchvision parts; save/load.

Architecture (one config, three sizes; see :mod:`mmcn.vision.config`)::

    RGB 0-255 -> [reorder to BGR?, resize, normalise, pad] -> stem -> res2 -> res3 -> res4 (stride 16)
        res4 -> RPN (3x3 conv, objectness + deltas per anchor) -> proposals
        res4 + boxes -> RoIAlign/RoIPool -> res5 -> mean-pool [-> Linear+ReLU to 2048] = region feature
        region feature -> cls_score (K+1, background 0), bbox_pred (K*4, or 4 class-agnostic)
        region feature ⊕ Embedding(K+1, 256)[class] -> fc 512 -> ReLU -> attr_score (A+1, "none" 0)

Design decisions, with the reasons:

- Label indices: background is 0 of the object logits and "no attribute" is 0 of the
  attribute logits (torchvision / maskrcnn_benchmark / VinVL convention), so object class
  ``config.classes[i]`` is native label ``i + 1``. Box regression has only the K foreground
  classes (class ``i + 1`` uses rows ``4i..4i+3``) — no dead background rows.
  ``detect`` reports 0-based indices into ``config.classes`` / ``config.attributes``.
- Anchor order per location is ratio-major (anchor ``r * len(sizes) + s``), torchvision's
  and maskrcnn_benchmark's order; detectron2's is size-major and is permuted on load.
  Cell anchor coordinates follow ``config.anchor_style`` (:class:`CellAnchorGenerator`).
- Box coding: torchvision's BoxCoder, plus ``legacy_plus_one`` (widths ``x2 - x1 + 1`` and
  ``x2 = cx + w/2 - 1``), which maskrcnn_benchmark-trained weights (VinVL) expect.
- BGR: caffe-lineage weights see BGR 0-255 minus a BGR mean; ``config.input_format``
  says so and the model flips the RGB input, so converted conv1 weights stay untouched.
- Attribute loss: VinVL's — softmax cross-entropy over the A+1 attribute logits against a
  target that spreads 1/n over the box's n ground-truth attributes (= BUTD's per-label CE
  weighted 1/n), on foreground RoIs, with the matched ground-truth class fed to the
  embedding; RoIs whose object has no attribute are left out (VG leaves most attributes
  unlabelled, so "no label" is not evidence of "no attribute"). Index 0 is never a target;
  it exists for checkpoint compatibility and is zeroed at inference.
- Inference (VinVL's ``NMS_FILTER=1`` / BUTD's ``generate_tsv``): softmax class scores;
  NMS per class over all boxes; each box keeps its best class among those it survived;
  boxes scoring >= ``score_thresh`` are kept, but at least ``min_boxes`` (the best ones,
  whatever their score) and at most ``max_boxes``. Fewer than ``min_boxes`` come back only
  when fewer boxes survive NMS. Features are those of the final boxes: proposal features
  when boxes are not regressed (the papers' feature extraction), else re-pooled on the
  regressed boxes. Attributes: softmax, "none" zeroed, the top ``max_attributes`` with
  probability > ``attr_score_thresh``, the embedding fed with the detected class.
- An image whose RPN returns no proposal gets the whole image as its only proposal, so
  ``detect`` never returns an empty result for it.
- ``config.fidelity`` other than ``"native"`` (the BUTD and VinVL presets) swaps in the
  reference code's rules, from :mod:`mmcn.vision.reference`: resizing inside
  :meth:`Detector.prepare` (so callers that prepare images get it too), proposal filtering,
  +1-area NMS, box selection, the class the attribute head embeds and attribute selection.
  The rules above are the native ones (the demo detector).
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FrozenBatchNorm2d, batched_nms, box_iou, roi_align, roi_pool

from mmcn.vision import reference
from mmcn.vision.config import DetectorConfig, detector_config

FEATURE_STRIDE = 16  # res4 (RPN input and RoI pooling) is 1/16 of the network input
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
NO_DETECTOR_FILE = "no_detector.json"   # see save_no_detector


# --------------------------------------------------------------------------- backbone


def _norm_layer(config: DetectorConfig) -> type[nn.Module] | partial:
    if config.norm == "frozen_bn":
        return partial(FrozenBatchNorm2d, eps=config.norm_eps)
    return partial(nn.BatchNorm2d, eps=config.norm_eps)


def make_stage(config: DetectorConfig, in_channels: int, planes: int, blocks: int,
               stride: int, dilation: int = 1) -> nn.Sequential:
    """``blocks`` torchvision Bottlenecks (out = 4 * planes); the first one strides.

    ``config.stride_in_1x1`` moves the stride from the 3x3 conv (torchvision, Caffe2,
    ResNeXt) to the first 1x1 conv (MSRA ResNets, BUTD).
    """
    norm = _norm_layer(config)
    out_channels = planes * Bottleneck.expansion
    layers = []
    for i in range(blocks):
        s = stride if i == 0 else 1
        downsample = None
        if in_channels != out_channels or s != 1:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=s, bias=False), norm(out_channels))
        block = Bottleneck(in_channels, planes, stride=s, downsample=downsample, groups=config.groups,
                           base_width=config.width_per_group, dilation=dilation, norm_layer=norm)
        if config.stride_in_1x1 and s != 1:
            block.conv1.stride, block.conv2.stride = (s, s), (1, 1)
        layers.append(block)
        in_channels = out_channels
    return nn.Sequential(*layers)


class Stem(nn.Module):
    """7x7 stride-2 conv, norm, ReLU, 3x3 stride-2 max-pool (caffe flavour: no padding, ceil)."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(3, config.stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = _norm_layer(config)(config.stem_channels)
        self.caffe_maxpool = config.caffe_maxpool

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu_(self.bn1(self.conv1(x)))
        if self.caffe_maxpool:
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class Backbone(nn.Module):
    """stem + res2..res4: the C4 trunk, stride 16."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        planes, blocks = config.stage_planes, config.stage_blocks
        self.stem = Stem(config)
        self.res2 = make_stage(config, config.stem_channels, planes[0], blocks[0], stride=1)
        self.res3 = make_stage(config, planes[0] * 4, planes[1], blocks[1], stride=2)
        self.res4 = make_stage(config, planes[1] * 4, planes[2], blocks[2], stride=2)
        self.out_channels = planes[2] * 4
        self.frozen = [self.stem, self.res2, self.res3, self.res4][: config.freeze_at]
        for stage in self.frozen:
            stage.requires_grad_(False)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for stage in self.frozen:  # frozen stages keep their BatchNorm statistics too
            stage.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))


# --------------------------------------------------------------------------- boxes and anchors


class BoxCoder(det_utils.BoxCoder):
    """torchvision's BoxCoder with an optional legacy "+1" pixel convention.

    ``legacy_plus_one=True`` is maskrcnn_benchmark's / Detectron's coder: widths are
    ``x2 - x1 + 1`` and a decoded box ends at ``cx + w/2 - 1``. Weights trained with it
    (VinVL) decode boxes ~1 px too large without it.
    """

    def __init__(self, weights: tuple[float, float, float, float], legacy_plus_one: bool = False,
                 bbox_xform_clip: float = math.log(1000.0 / 16)):
        super().__init__(weights, bbox_xform_clip)
        self.offset = 1.0 if legacy_plus_one else 0.0

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Deltas that take ``proposals`` (anchors, RoIs) to ``reference_boxes`` (ground truth)."""
        wx, wy, ww, wh = self.weights
        ex_w = proposals[:, 2] - proposals[:, 0] + self.offset
        ex_h = proposals[:, 3] - proposals[:, 1] + self.offset
        ex_x = proposals[:, 0] + 0.5 * ex_w
        ex_y = proposals[:, 1] + 0.5 * ex_h
        gt_w = reference_boxes[:, 2] - reference_boxes[:, 0] + self.offset
        gt_h = reference_boxes[:, 3] - reference_boxes[:, 1] + self.offset
        gt_x = reference_boxes[:, 0] + 0.5 * gt_w
        gt_y = reference_boxes[:, 1] + 0.5 * gt_h
        return torch.stack((wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h,
                            ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)), dim=1)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """Boxes (N, 4k) from deltas (N, 4k) relative to ``boxes`` (N, 4)."""
        boxes = boxes.to(rel_codes.dtype)
        widths = boxes[:, 2] - boxes[:, 0] + self.offset
        heights = boxes[:, 3] - boxes[:, 1] + self.offset
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx, dy = rel_codes[:, 0::4] / wx, rel_codes[:, 1::4] / wy
        dw = torch.clamp(rel_codes[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(rel_codes[:, 3::4] / wh, max=self.bbox_xform_clip)
        cx = dx * widths[:, None] + ctr_x[:, None]
        cy = dy * heights[:, None] + ctr_y[:, None]
        w = torch.exp(dw) * widths[:, None]
        h = torch.exp(dh) * heights[:, None]
        out = torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - self.offset, cy + 0.5 * h - self.offset), dim=2)
        return out.flatten(1)


def cell_anchors(sizes: tuple[float, ...], ratios: tuple[float, ...], style: str,
                 stride: int = FEATURE_STRIDE) -> Tensor:
    """The anchors of one feature-map cell, (len(ratios) * len(sizes), 4), ratio-major.

    Anchor ``r * len(sizes) + s`` has size ``sizes[s]`` and aspect ratio (h/w) ``ratios[r]``.

    - ``"torchvision"``: centred on the cell's top-left pixel (offset 0), rounded to ints.
    - ``"detectron2"``: DefaultAnchorGenerator, offset 0: ``w = sqrt(size^2 / r)``,
      ``h = r * w``, not rounded.
    - ``"maskrcnn_benchmark"``: Detectron's legacy ``generate_anchors``: a ``stride``-pixel
      base box ``[0, 0, stride - 1, stride - 1]`` reshaped with rounded widths, then scaled,
      in the "+1" pixel convention (these are the ``cell_anchors`` VinVL checkpoints store).
    """
    out = []
    for r in ratios:
        for s in sizes:
            if style == "maskrcnn_benchmark":
                ctr = (stride - 1) / 2
                ws = round(math.sqrt(stride * stride / r))
                hs = round(ws * r)
                w, h = ws * s / stride, hs * s / stride
                out.append([ctr - 0.5 * (w - 1), ctr - 0.5 * (h - 1), ctr + 0.5 * (w - 1), ctr + 0.5 * (h - 1)])
            else:
                w, h = s / math.sqrt(r), s * math.sqrt(r)
                box = [-w / 2, -h / 2, w / 2, h / 2]
                out.append([float(round(v)) for v in box] if style == "torchvision" else box)
    return torch.tensor(out, dtype=torch.float32, device="cpu")


class CellAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator for one feature map with a fixed stride and chosen cell anchors.

    torchvision derives the stride from ``padded image size // feature size``, which is
    wrong (15 instead of 16) for sizes that are not multiples of 16; the stride is fixed here.
    """

    def __init__(self, sizes: tuple[float, ...], ratios: tuple[float, ...], style: str,
                 stride: int = FEATURE_STRIDE):
        super().__init__(sizes=(tuple(sizes),), aspect_ratios=(tuple(ratios),))
        self.stride = stride
        self.cell_anchors = [cell_anchors(tuple(sizes), tuple(ratios), style, stride)]

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [fm.shape[-2:] for fm in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(self.stride, dtype=torch.int64, device=device)] * 2 for _ in feature_maps]
        self.set_cell_anchors(dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in range(len(image_list.image_sizes))]


class RPNHead(nn.Module):
    """3x3 conv (``hidden`` channels) + ReLU, then 1x1 convs for A objectness logits and A*4 deltas.

    Delta channel ``4a + k`` is coordinate k of anchor a (same in torchvision, detectron2
    and maskrcnn_benchmark).
    """

    def __init__(self, in_channels: int, hidden: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1)
        self.cls_logits = nn.Conv2d(hidden, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(hidden, num_anchors * 4, kernel_size=1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        hidden = [F.relu(self.conv(f)) for f in features]
        return [self.cls_logits(t) for t in hidden], [self.bbox_pred(t) for t in hidden]


def build_rpn(config: DetectorConfig, in_channels: int) -> RegionProposalNetwork:
    rpn = RegionProposalNetwork(
        CellAnchorGenerator(config.anchor_sizes, config.anchor_ratios, config.rpn_anchor_style),
        RPNHead(in_channels, config.rpn_channels, config.num_anchors),
        fg_iou_thresh=config.rpn_fg_iou, bg_iou_thresh=config.rpn_bg_iou,
        batch_size_per_image=config.rpn_batch_per_image, positive_fraction=config.rpn_positive_fraction,
        pre_nms_top_n={"training": config.rpn_pre_nms_train, "testing": config.rpn_pre_nms_test},
        post_nms_top_n={"training": config.rpn_post_nms_train, "testing": config.rpn_post_nms_test},
        nms_thresh=config.rpn_nms,
    )
    rpn.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0), config.legacy_plus_one)
    return rpn


# --------------------------------------------------------------------------- RoI heads


class BoxPredictor(nn.Module):
    """Class logits (K+1, background first) and box deltas (K*4, or 4 if class-agnostic)."""

    def __init__(self, dim: int, num_classes: int, cls_agnostic: bool):
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes + 1)
        self.bbox_pred = nn.Linear(dim, 4 if cls_agnostic else num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class AttributePredictor(nn.Module):
    """Attribute logits (A+1, "no attribute" first) from a region feature and its object label."""

    def __init__(self, dim: int, num_classes: int, num_attributes: int, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.cls_embed = nn.Embedding(num_classes + 1, embed_dim)
        self.fc = nn.Linear(dim + embed_dim, hidden_dim)
        self.attr_score = nn.Linear(hidden_dim, num_attributes + 1)
        for layer in (self.cls_embed, self.fc, self.attr_score):
            nn.init.normal_(layer.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        nn.init.zeros_(self.attr_score.bias)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        """``labels``: native object labels (1..K; 0 = background)."""
        return self.attr_score(F.relu(self.fc(torch.cat([x, self.cls_embed(labels)], dim=1))))


class RoIHeads(nn.Module):
    """RoI pooling on res4, res5, mean-pool (+ projection): features, boxes, classes, attributes."""

    def __init__(self, config: DetectorConfig, in_channels: int):
        super().__init__()
        self.config = config
        planes = config.stage_planes[3]
        self.res5 = make_stage(config, in_channels, planes, config.stage_blocks[3],
                               stride=config.res5_stride, dilation=config.res5_dilation)
        res5_out = planes * 4
        self.box_proj = nn.Linear(res5_out, config.feature_dim) if res5_out != config.feature_dim else None
        self.box_predictor = BoxPredictor(config.feature_dim, config.num_classes, config.cls_agnostic_bbox_reg)
        self.attribute_predictor = AttributePredictor(config.feature_dim, config.num_classes, config.num_attributes,
                                                      config.attr_embed_dim, config.attr_hidden_dim)
        self.box_coder = BoxCoder(config.box_reg_weights, config.legacy_plus_one)
        self.matcher = det_utils.Matcher(config.roi_fg_iou, config.roi_bg_iou, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(config.roi_batch_per_image,
                                                                 config.roi_positive_fraction)

    def box_features(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        """(sum of boxes, feature_dim) region features; ``boxes[i]`` in image i's network-input pixels."""
        c = self.config
        boxes = [b.to(features.dtype) for b in boxes]
        if c.pooler == "align":
            x = roi_align(features, boxes, c.pooler_resolution, 1.0 / FEATURE_STRIDE,
                          c.pooler_sampling_ratio, c.pooler_aligned)
        else:
            x = roi_pool(features, boxes, c.pooler_resolution, 1.0 / FEATURE_STRIDE)
        x = self.res5(x).mean(dim=(2, 3))
        if self.box_proj is not None:
            x = F.relu(self.box_proj(x))
        return x

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Per-class boxes (N, K, 4) (or (N, 1, 4) class-agnostic) from deltas and proposals."""
        return self.box_coder.decode_single(deltas, boxes).view(len(boxes), -1, 4)

    def losses(self, features: Tensor, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        c = self.config
        rois, labels, reg_targets, attr_targets = [], [], [], []
        for props, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            props = torch.cat([props, gt_boxes])
            if len(gt_boxes):
                matched = self.matcher(box_iou(gt_boxes, props))
                lab = gt_labels[matched.clamp(min=0)].clone()
                lab[matched == self.matcher.BELOW_LOW_THRESHOLD] = 0
                lab[matched == self.matcher.BETWEEN_THRESHOLDS] = -1
            else:
                matched = torch.full((len(props),), -1, dtype=torch.int64, device=props.device)
                lab = torch.zeros(len(props), dtype=torch.int64, device=props.device)
            pos, neg = self.sampler([lab])
            keep = torch.where(pos[0] | neg[0])[0]
            props, lab, matched = props[keep], lab[keep], matched[keep]
            gt_for_roi = gt_boxes[matched.clamp(min=0)] if len(gt_boxes) else props
            rois.append(props)
            labels.append(lab)
            reg_targets.append(self.box_coder.encode_single(gt_for_roi, props))
            multi_hot = _attribute_multi_hot(target, c.num_attributes, len(gt_boxes), props.device)
            attr_targets.append(multi_hot[matched.clamp(min=0)] if len(gt_boxes)
                                else props.new_zeros((len(props), c.num_attributes)))
        labels_all = torch.cat(labels)
        reg_all = torch.cat(reg_targets)
        attr_all = torch.cat(attr_targets)

        x = self.box_features(features, rois)
        class_logits, deltas = self.box_predictor(x)
        loss_cls = F.cross_entropy(class_logits, labels_all)
        fg = torch.where(labels_all > 0)[0]
        deltas = deltas.view(len(deltas), -1, 4)
        fg_deltas = deltas[fg, 0] if c.cls_agnostic_bbox_reg else deltas[fg, labels_all[fg] - 1]
        loss_box = _smooth_l1(fg_deltas, reg_all[fg], c.roi_smooth_l1_beta) / max(1, labels_all.numel())

        # attribute loss on foreground RoIs whose object has attributes (see module docstring)
        attr_fg = fg[attr_all[fg].sum(dim=1) > 0]
        if len(attr_fg):
            logits = self.attribute_predictor(x[attr_fg], labels_all[attr_fg])
            target = attr_all[attr_fg] / attr_all[attr_fg].sum(dim=1, keepdim=True)
            loss_attr = -(target * F.log_softmax(logits, dim=1)[:, 1:]).sum(dim=1).mean()
        else:
            loss_attr = x.sum() * 0.0
        return {"loss_roi_cls": loss_cls, "loss_roi_box": loss_box,
                "loss_attribute": c.attribute_loss_weight * loss_attr}


def _smooth_l1(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    if beta < 1e-5:
        return F.l1_loss(pred, target, reduction="sum")
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")


def _attribute_multi_hot(target: dict[str, Tensor], num_attributes: int, n: int, device: torch.device) -> Tensor:
    """(n, A) float multi-hot of a target's ``attributes``: ids (1-based, <= 0 = padding) or multi-hot."""
    attrs = target.get("attributes")
    if attrs is None:
        return torch.zeros((n, num_attributes), device=device)
    attrs = attrs.to(device)
    if attrs.dtype in (torch.bool, torch.float16, torch.float32, torch.float64):
        if attrs.shape != (n, num_attributes):
            raise ValueError(f"multi-hot attributes must be ({n}, {num_attributes}), got {tuple(attrs.shape)}")
        return attrs.float()
    if attrs.dim() == 1:
        attrs = attrs[:, None]
    if attrs.shape[0] != n:
        raise ValueError(f"attributes has {attrs.shape[0]} rows for {n} boxes")
    if attrs.numel() and int(attrs.max()) > num_attributes:
        raise ValueError(f"attribute id {int(attrs.max())} > {num_attributes}; ids are 1-based (0/-1 = none)")
    multi_hot = torch.zeros((n, num_attributes + 1), device=device)
    multi_hot.scatter_(1, attrs.clamp(min=0).long(), 1.0)
    return multi_hot[:, 1:]


# --------------------------------------------------------------------------- detector


@dataclass
class NetInput:
    """An image resized for the network by :meth:`Detector.prepare`."""

    tensor: Tensor                      # float32 (3, h, w), 0-255, the config's channel order
    scale: tuple[float, float]          # (sx, sy): network pixels per original pixel
    original_size: tuple[int, int]      # (height, width) of the image before resizing


@dataclass
class Detections:
    """One image's detections, sorted by decreasing score; boxes in original-image pixels.

    ``labels`` index ``config.classes``; ``attr_ids`` index ``config.attributes``, (n, k)
    padded with -1 (``attr_scores`` with 0); ``features`` (n, 2048) float32.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    attr_ids: Tensor
    attr_scores: Tensor
    features: Tensor
    image_size: tuple[int, int]  # (height, width) of the input image

    def __len__(self) -> int:
        return len(self.boxes)


def per_class_nms(boxes: Tensor, scores: Tensor, iou_thresh: float) -> Tensor:
    """Greedy NMS in every class: ``boxes`` (N, K, 4), ``scores`` (N, K) -> (N, K) bool, True
    where box n survives in class k. On the CPU torchvision's ``batched_nms``; on a GPU
    :func:`_nms_all_classes_at_once`, which makes the same decisions (tested) without
    ``batched_nms``'s Python loop of one NMS call per class (it takes that path above 100k
    boxes, and on a GPU each call waits for the device: 0.4 s per image of 300 proposals x
    1600 classes on an H200, 20x the network's time)."""
    n, k = scores.shape
    if not scores.is_cuda:
        classes = torch.arange(k, device=scores.device).repeat(n)
        kept = batched_nms(boxes.reshape(-1, 4), scores.reshape(-1), classes, iou_thresh)
        survived = torch.zeros(n * k, dtype=torch.bool, device=scores.device)
        survived[kept] = True
        return survived.view(n, k)
    return _nms_all_classes_at_once(boxes, scores, iou_thresh)


def _nms_all_classes_at_once(boxes: Tensor, scores: Tensor, iou_thresh: float, classes_per_chunk: int = 256) -> Tensor:
    """:func:`per_class_nms` as N tensor steps over all classes together: torchvision's ``nms``
    decisions (stable descending score order; IoU = inter / (area_i + area_j - inter) in
    float32, suppressed when > ``iou_thresh``) for every class at once."""
    n, k = scores.shape
    survived = torch.zeros((n, k), dtype=torch.bool, device=scores.device)
    for first in range(0, k, classes_per_chunk):  # bounds the (classes, N, N) IoU tensor
        cls = slice(first, min(first + classes_per_chunk, k))
        s = scores[:, cls].t().float()                                       # (C, N)
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        b = boxes[:, cls].permute(1, 0, 2).float().gather(1, order[..., None].expand(-1, -1, 4))  # (C, N, 4) sorted
        area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
        w = (torch.minimum(b[..., :, None, 2], b[..., None, :, 2]) -
             torch.maximum(b[..., :, None, 0], b[..., None, :, 0])).clamp(min=0)
        h = (torch.minimum(b[..., :, None, 3], b[..., None, :, 3]) -
             torch.maximum(b[..., :, None, 1], b[..., None, :, 1])).clamp(min=0)
        inter = w * h
        overlaps = inter / (area[..., :, None] + area[..., None, :] - inter) > iou_thresh   # (C, N, N)
        suppressed = torch.zeros_like(s, dtype=torch.bool)
        kept = torch.zeros_like(s, dtype=torch.bool)
        for i in range(n):  # box i (in score order) survives unless a kept, better box suppressed it
            alive = ~suppressed[:, i]
            kept[:, i] = alive
            suppressed |= overlaps[:, i] & alive[:, None]
        survived[:, cls] = torch.zeros_like(kept).scatter_(1, order, kept).t()
    return survived


def select_detections(boxes: Tensor, scores: Tensor, score_thresh: float, nms_thresh: float,
                      min_boxes: int, max_boxes: int) -> tuple[Tensor, Tensor, Tensor]:
    """VinVL/BUTD box selection; returns (box index, class index, score), best first.

    ``boxes`` (N, K, 4) per-class boxes, ``scores`` (N, K) foreground probabilities. NMS per
    class over all N boxes; a box's score is its best class among those it survived; keep
    scores >= score_thresh, at least min_boxes and at most max_boxes of them.
    """
    survived = per_class_nms(boxes, scores, nms_thresh)
    best, label = scores.masked_fill(~survived, -1.0).max(dim=1)
    candidates = torch.where(best >= 0)[0]
    order = candidates[torch.argsort(best[candidates], descending=True, stable=True)]
    n_above = int((best[order] >= score_thresh).sum())
    keep = order[: min(max(n_above, min_boxes), max_boxes)]
    return keep, label[keep], best[keep]


class Detector(nn.Module):
    """C4 Faster R-CNN with attribute head. ``forward``: losses in train mode, detections in eval."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.rpn = build_rpn(config, self.backbone.out_channels)
        self.roi_heads = RoIHeads(config, self.backbone.out_channels)
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(3, 1, 1), persistent=False)
        if config.norm == "bn":  # trained from scratch: He init, zero-init the last BN of each block
            for m in self.backbone.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            for m in list(self.backbone.modules()) + list(self.roi_heads.res5.modules()):
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    # ---- pre-processing

    def prepare(self, image: Tensor) -> NetInput:
        """One RGB 0-255 image (3, H, W) resized for the network (channel order as the config,
        not yet normalised). Callers that hold many images (feature extraction) prepare each
        right after decoding and drop the original: only network-size images stay in memory."""
        if isinstance(image, NetInput):
            return image
        c = self.config
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an RGB image tensor of shape (3, H, W), got {tuple(image.shape)}")
        h, w = (int(v) for v in image.shape[-2:])
        if c.fidelity == "vinvl":  # D2: truncating size, PIL's antialiased bilinear on 8-bit pixels
            nh, nw = reference.vinvl_size(h, w, c.min_size, c.max_size)
            x = reference.vinvl_resize(image, (nh, nw)).to(self.pixel_mean.device)
            return NetInput(x.flip(0) if c.input_format == "BGR" else x, (nw / w, nh / h), (h, w))
        x = image.to(device=self.pixel_mean.device, dtype=torch.float32)
        if c.input_format == "BGR":
            x = x.flip(0)
        if c.fidelity == "butd":  # D3: caffe's scale, sampled at exactly that scale
            s, size = reference.caffe_scale(h, w, c.min_size, c.max_size)
            return NetInput(reference.caffe_resize(x, s, size), (s, s), (h, w))
        scale = min(c.min_size / min(h, w), c.max_size / max(h, w))
        nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
        if (nh, nw) != (h, w):
            x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        return NetInput(x, (nw / w, nh / h), (h, w))

    def preprocess(self, images: list[Tensor | NetInput], targets: list[dict[str, Tensor]] | None = None
                   ) -> tuple[ImageList, list[dict[str, Tensor]] | None, list[tuple[float, float]]]:
        """Batch images (RGB 0-255 tensors or :meth:`prepare`'s output) for the network; scale
        target boxes. Returns (batch, targets, (sx, sy) per image)."""
        c = self.config
        device = self.pixel_mean.device
        inputs = []
        for i, image in enumerate(images):
            try:
                inputs.append(self.prepare(image))
            except ValueError as e:
                raise ValueError(f"image {i}: {e}") from None
        resized = [(x.tensor.to(device) - self.pixel_mean) / self.pixel_std for x in inputs]
        scales = [x.scale for x in inputs]
        max_h = max(x.shape[1] for x in resized)
        max_w = max(x.shape[2] for x in resized)
        if c.size_divisibility > 1:
            d = c.size_divisibility
            max_h, max_w = (max_h + d - 1) // d * d, (max_w + d - 1) // d * d
        batch = resized[0].new_zeros((len(resized), 3, max_h, max_w))
        for b, x in zip(batch, resized):
            b[:, : x.shape[1], : x.shape[2]].copy_(x)
        image_list = ImageList(batch, [(int(x.shape[1]), int(x.shape[2])) for x in resized])
        if targets is not None:
            targets = [self._scale_target(t, s, i, device) for i, (t, s) in enumerate(zip(targets, scales))]
        return image_list, targets, scales

    def _scale_target(self, target: dict[str, Tensor], scale: tuple[float, float], i: int,
                      device: torch.device) -> dict[str, Tensor]:
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
        labels = torch.as_tensor(target["labels"], dtype=torch.int64, device=device).reshape(-1)
        if len(labels) != len(boxes):
            raise ValueError(f"target {i}: {len(boxes)} boxes but {len(labels)} labels")
        if len(labels) and (int(labels.min()) < 1 or int(labels.max()) > self.config.num_classes):
            raise ValueError(f"target {i}: labels must be 1..{self.config.num_classes} (0 is background), "
                             f"got {labels.tolist()}")
        sx, sy = scale
        out = dict(target)
        out["boxes"] = boxes * boxes.new_tensor([sx, sy, sx, sy])
        out["labels"] = labels
        return out

    # ---- training

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[Detections]:
        """Train mode: dict of losses (targets required). Eval mode: ``detect(images)``."""
        if not self.training:
            return self.detect(images)
        if targets is None or len(targets) != len(images):
            raise ValueError("training needs one target dict (boxes, labels[, attributes]) per image")
        image_list, targets, _ = self.preprocess(images, targets)
        features = self.backbone(image_list.tensors)
        proposals, rpn_losses = self.rpn(image_list, {"res4": features}, targets)
        losses = {"loss_rpn_objectness": rpn_losses["loss_objectness"],
                  "loss_rpn_box": rpn_losses["loss_rpn_box_reg"]}
        losses.update(self.roi_heads.losses(features, proposals, targets))
        return losses

    # ---- inference

    @torch.no_grad()
    def detect(self, images: list[Tensor | NetInput], min_boxes: int | None = None, max_boxes: int | None = None,
               score_thresh: float | None = None, nms_thresh: float | None = None,
               box_regression: bool | None = None) -> list[Detections]:
        """Detections for RGB 0-255 images (3, H, W) or :meth:`prepare`'s output (boxes in
        original-image pixels either way); unset arguments come from the config."""
        c = self.config
        min_boxes = c.min_boxes if min_boxes is None else min_boxes
        max_boxes = c.max_boxes if max_boxes is None else max_boxes
        score_thresh = c.score_thresh if score_thresh is None else score_thresh
        nms_thresh = c.nms_thresh if nms_thresh is None else nms_thresh
        regress = c.test_box_regression if box_regression is None else box_regression
        if not images:
            return []
        was_training = self.training
        self.eval()
        try:
            images = [self.prepare(image) for image in images]
            image_list, _, scales = self.preprocess(images)
            features = self.backbone(image_list.tensors)
            if c.fidelity == "native":
                proposals, _ = self.rpn(image_list, {"res4": features})
            else:
                proposals = reference.proposals(self.rpn, image_list, features, c.rpn_rule, scales)
            proposals = [p if len(p) else p.new_tensor([[0.0, 0.0, float(w), float(h)]])
                         for p, (h, w) in zip(proposals, image_list.image_sizes)]
            x = self.roi_heads.box_features(features, proposals)
            class_logits, deltas = self.roi_heads.box_predictor(x)
            probs_all = F.softmax(class_logits, dim=1)
            counts = [len(p) for p in proposals]
            picks = []
            for props, p_all, d, x_i, (h, w), scale in zip(proposals, probs_all.split(counts), deltas.split(counts),
                                                           x.split(counts), image_list.image_sizes, scales):
                p = p_all[:, 1:]
                if regress:
                    boxes = self.roi_heads.decode(d, props)
                    boxes = _clip(boxes, h, w, c.legacy_plus_one).expand(len(props), c.num_classes, 4)
                else:
                    boxes = props[:, None, :].expand(len(props), c.num_classes, 4)
                embed = None
                if c.fidelity == "native":
                    keep, label, score = select_detections(boxes, p, score_thresh, nms_thresh, min_boxes, max_boxes)
                elif c.fidelity == "vinvl":  # D6 (+1 NMS, CUDA kernel) on network-input boxes
                    survived = reference.per_class_nms_plus_one(boxes, p, nms_thresh, "cuda")
                    keep, label, score = reference.select_vinvl(survived, p, score_thresh, min_boxes, max_boxes)
                else:  # butd: generate_tsv's NMS (+1, cpu_nms) runs on boxes in image pixels
                    sx, sy = scale
                    in_image = boxes[:, 0] if not regress else boxes
                    in_image = in_image / in_image.new_tensor([sx, sy, sx, sy])
                    in_image = in_image[:, None, :].expand_as(boxes) if not regress else in_image
                    survived = reference.per_class_nms_plus_one(in_image, p, nms_thresh, "cpu")
                    keep, label, score = reference.select_butd(survived, p, score_thresh, min_boxes, max_boxes)
                    embed = reference.butd_embedding_labels(p_all[keep])  # D4
                picks.append((boxes[keep, label], label, score, x_i[keep], embed))
            if regress:  # features of the regressed boxes, as the final boxes moved
                feats = self.roi_heads.box_features(features, [b for b, *_ in picks]).split([len(b) for b, *_ in picks])
            else:
                feats = [pick[3] for pick in picks]
            results = []
            for (boxes, label, score, _, embed), feat, scale, image, net_size in zip(
                    picks, feats, scales, images, image_list.image_sizes):
                attr_ids, attr_scores = self._attributes(feat, label + 1 if embed is None else embed)
                height, width = image.original_size
                boxes = reference.image_to_original(boxes, c.fidelity, scale, (height, width), net_size)
                boxes = _clip(boxes, height, width, False)
                results.append(Detections(boxes=boxes.float(), scores=score.float(), labels=label,
                                          attr_ids=attr_ids, attr_scores=attr_scores,
                                          features=feat.float().contiguous(), image_size=(height, width)))
            return results
        finally:
            self.train(was_training)

    def _attributes(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(ids, scores) (n, k) padded with -1 / 0; ``labels``: the native labels embedded."""
        c = self.config
        logits = self.roi_heads.attribute_predictor(features, labels)
        if c.fidelity == "vinvl":  # D7
            return reference.vinvl_attributes(logits, c.attr_score_thresh, c.max_attributes, c.max_attributes_per_image)
        k = min(c.max_attributes, c.num_attributes)
        probs = F.softmax(logits, dim=1)[:, 1:]
        scores, ids = probs.topk(k, dim=1) if len(probs) else (probs[:, :k], probs[:, :k].long())
        ok = scores > c.attr_score_thresh
        return torch.where(ok, ids, torch.full_like(ids, -1)), torch.where(ok, scores, torch.zeros_like(scores))


def _clip(boxes: Tensor, height: int, width: int, legacy_plus_one: bool) -> Tensor:
    off = 1.0 if legacy_plus_one else 0.0
    x = boxes[..., 0::2].clamp(min=0, max=width - off)
    y = boxes[..., 1::2].clamp(min=0, max=height - off)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def build_detector(config: DetectorConfig | str) -> Detector:
    """A randomly initialised detector for a config (or a preset name, see ``detector_config``)."""
    if isinstance(config, str):
        config = detector_config(config)
    return Detector(config)


# --------------------------------------------------------------------------- files


def save_detector(model: Detector, out_dir: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` to ``out_dir``; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "producer": "mmcn.vision.detector"})
    (out / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=1, ensure_ascii=False) + "\n", "utf-8")
    return out


def save_no_detector(out_dir: str | Path, reason: str) -> Path:
    """A detector folder that holds no detector and says why (released features were imported):
    :func:`load_detector` then fails with that reason instead of a missing file."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / NO_DETECTOR_FILE).write_text(json.dumps({"reason": reason}, ensure_ascii=False) + "\n", "utf-8")
    return out


def read_config(file: Path, config_class: type, what: str):
    """``config_class.from_dict`` of a saved model folder's JSON config, or an error naming the file."""
    try:
        return config_class.from_dict(json.loads(file.read_text("utf-8")))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{file}: not a {what} config: {e}") from e


def load_detector(path: str | Path, map_location: str | torch.device = "cpu") -> Detector:
    """A detector saved by :func:`save_detector`, in eval mode on ``map_location`` (a grid
    model's folder, :mod:`mmcn.vision.grid`, loads as that model: same interface)."""
    path = Path(path)
    from mmcn.vision import grid  # imports this module: imported here, not at the top

    if grid.is_grid_folder(path):
        return grid.load_grid(path, map_location)
    if (path / NO_DETECTOR_FILE).is_file():
        reason = json.loads((path / NO_DETECTOR_FILE).read_text("utf-8"))["reason"]
        raise FileNotFoundError(f"{path} holds no detector: {reason}. To get region features of new images, "
                                f"convert the checkpoint those features came from (detector.weights and "
                                f"detector.arch, with features.source emptied) or pass another detector folder")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: missing; a detector directory holds {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE} (written by save_detector)")
    model = Detector(read_config(path / CONFIG_FILE, DetectorConfig, "detector"))
    state = load_file(str(path / WEIGHTS_FILE), device="cpu")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{path / WEIGHTS_FILE} does not match {path / CONFIG_FILE}: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}, shape mismatch {mismatched[:10]}; "
                         f"re-save the model with save_detector")
    model.load_state_dict(state)
    return model.to(map_location).eval()
