"""The no-weights fallback detector: an ImageNet ResNet/ResNeXt classifier run on fixed grid regions.

For captioning datasets without boxes (MUGE, Flickr30k-CN, COCO-CN) and users without BUTD
or VinVL weights. :func:`convert_grid` turns any torchvision ImageNet classification
checkpoint (``resnet50/101/152``, ``resnext50_32x4d``, ``resnext101_32x8d``, ``wide_resnet*``:
``torch.save(model.state_dict())``, as torchvision's download URLs give them) into a model with
the detector interface the feature extractor uses (``config.classes`` / ``config.attributes``,
``prepare``, ``detect``), saved in a detector folder (``config.json`` says ``"kind": "grid"``)
that :func:`mmcn.vision.detector.load_detector` loads. What it computes, per image::

    RGB 0-255 -> resize (shorter side 600, longer at most 1000) -> ImageNet mean/std
        -> conv1 .. layer3 (res4, stride 16)
        boxes: the whole image + every cell of a 2x2 and a 3x3 grid (14 boxes)
        res4 + box -> RoIAlign 14x14 (aligned, adaptive sampling) -> layer4 (res5, 7x7) -> mean = 2048 feature
        feature -> fc -> softmax: tag = the top ImageNet class, score = its probability

Why RoIAlign on res4 then res5 (the C4 detectors' head) rather than pooling the whole
image's res5 map over each box: the 14x14 -> 7x7 res5 map of each region is what the
classifier saw in training (224 px -> 7x7), so ``fc`` on the pooled feature is the
classifier's own prediction for that region and the features are pooled the way BUTD/VinVL
pool theirs; pooling a stride-32 res5 map would average 6x6 cells for a 3x3 grid cell of a
600 px image, features of the whole image's context. The price is layer4 once per box
(14 small maps) instead of once per image. The 600/1000 size makes a 3x3 cell about
200 px, ImageNet's training scale, and matches the BUTD/VinVL input size.

It is not object detection: boxes do not follow objects, tags are the ImageNet class of
a region (breeds, artefacts; no people, no attributes), features are not VinVL's. Boxes
come back sorted by score; ``max_boxes`` truncates; ``min_boxes``, ``score_thresh`` and
``nms_thresh`` do not apply (every grid box is kept). Each image runs through the trunk on
its own (no batch padding), so an image's features do not depend on what it is batched with.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision.models import ResNet, ResNet50_Weights
from torchvision.models.resnet import Bottleneck
from torchvision.ops import roi_align

from mmcn.vision.checkpoint import CheckpointError, read_state_dict
from mmcn.vision.detector import CONFIG_FILE, WEIGHTS_FILE, Detections, NetInput, read_config

GRID_ARCH = "grid_resnet"   # detector.arch of this mode
KIND = "grid"               # config.json "kind": how load_detector tells a grid folder from a detector's
NUM_CLASSES = 1000

# ImageNet classes whose torchvision name is a word that mmcn/resources/labels_zh.tsv (the
# detectors' labels) translates in another sense: the grid model says which sense it means,
# so that one en->zh table serves both (mmcn/resources/imagenet_zh.tsv maps these names).
IMAGENET_SENSES = {
    21: "kite (bird)", 456: "bow (weapon)", 492: "chest (box)", 610: "T-shirt", 676: "muzzle (restraint)",
    681: "notebook computer", 718: "pier (bridge)", 725: "pitcher (jug)", 726: "plane (carpentry)",
    738: "flowerpot", 751: "race car", 800: "slot machine", 847: "tank (military)", 908: "wing (aircraft)",
    998: "ear of corn",
}


def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet class labels in class order: torchvision's names (shipped with
    torchvision, offline), with :data:`IMAGENET_SENSES` applied."""
    names = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    return tuple(IMAGENET_SENSES.get(i, name) for i, name in enumerate(names))


@dataclass(frozen=True)
class GridConfig:
    """A grid model: its ResNet shape, input size, grids and labels (``attributes`` is empty)."""

    arch: str = "resnet50"                      # torchvision's name of the classifier
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)   # Bottleneck blocks in layer1..layer4
    groups: int = 1
    width_per_group: int = 64
    grids: tuple[int, ...] = (1, 2, 3)          # n: an n x n grid of boxes (1: the whole image)
    min_size: int = 600                         # shorter side after resizing
    max_size: int = 1000                        # cap on the longer side
    pooler_resolution: int = 14                 # RoIAlign output on res4; res5 halves it
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)   # RGB 0-255 (ImageNet)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    classes: tuple[str, ...] = field(default_factory=imagenet_classes)
    attributes: tuple[str, ...] = ()
    kind: str = KIND
    name: str = GRID_ARCH

    def __post_init__(self) -> None:
        if self.kind != KIND:
            raise ValueError(f"kind: {self.kind!r}, expected {KIND!r}")
        if not self.grids or any(not isinstance(n, int) or n < 1 for n in self.grids):
            raise ValueError(f"grids: {self.grids!r}: give whole numbers >= 1 (n: an n x n grid)")
        if len(self.classes) != NUM_CLASSES:
            raise ValueError(f"classes: {len(self.classes)} labels, expected the {NUM_CLASSES} ImageNet classes")

    @property
    def size_divisibility(self) -> int:
        """Batch padding multiple (the extractor groups images by padded shape): none, each image runs alone."""
        return 1

    @property
    def boxes_per_image(self) -> int:
        return sum(n * n for n in self.grids)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GridConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"GridConfig: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def grid_boxes(height: int, width: int, grids: tuple[int, ...]) -> Tensor:
    """(sum n^2, 4) boxes x1, y1, x2, y2 in pixels: for each n, the n x n cells row by row."""
    out = []
    for n in grids:
        for i in range(n):
            for j in range(n):
                out.append([width * j / n, height * i / n, width * (j + 1) / n, height * (i + 1) / n])
    return torch.tensor(out, dtype=torch.float32)


class GridDetector(nn.Module):
    """A torchvision ResNet (``self.body``, torchvision's key names) with the detector interface."""

    def __init__(self, config: GridConfig):
        super().__init__()
        self.config = config
        self.body = ResNet(Bottleneck, list(config.layers), num_classes=len(config.classes),
                           groups=config.groups, width_per_group=config.width_per_group)
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(3, 1, 1), persistent=False)

    def prepare(self, image: Tensor | NetInput) -> NetInput:
        """One RGB 0-255 image (3, H, W) resized for the network (not yet normalised)."""
        if isinstance(image, NetInput):
            return image
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an RGB image tensor of shape (3, H, W), got {tuple(image.shape)}")
        c = self.config
        x = image.to(device=self.pixel_mean.device, dtype=torch.float32)
        h, w = x.shape[-2:]
        scale = min(c.min_size / min(h, w), c.max_size / max(h, w))
        nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
        if (nh, nw) != (h, w):
            x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        return NetInput(x, (nw / w, nh / h), (int(h), int(w)))

    def res4(self, x: Tensor) -> Tensor:
        """conv1 .. layer3 of a normalised batch: the stride-16 map."""
        b = self.body
        return b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))))

    def head(self, res4: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Region features (N, 2048) and class logits (N, 1000) of ``boxes`` (N, 4) in network
        pixels on one image's ``res4`` (1, C, h, w)."""
        n = self.config.pooler_resolution
        rois = roi_align(res4, [boxes.to(res4)], output_size=(n, n), spatial_scale=1 / 16, sampling_ratio=0,
                         aligned=True)
        features = self.body.layer4(rois).mean(dim=(2, 3))
        return features, self.body.fc(features)

    @torch.no_grad()
    def detect(self, images: list[Tensor | NetInput], min_boxes: int | None = None, max_boxes: int | None = None,
               score_thresh: float | None = None, nms_thresh: float | None = None) -> list[Detections]:
        """The grid boxes of each image (original pixels), best-scoring first, at most ``max_boxes``;
        ``min_boxes``, ``score_thresh`` and ``nms_thresh`` are accepted for the detector interface
        and do not apply (see the module docstring)."""
        was_training = self.training
        self.eval()
        try:
            results = []
            for k, image in enumerate(images):
                try:
                    net = self.prepare(image)
                except ValueError as e:
                    raise ValueError(f"image {k}: {e}") from None
                height, width = net.original_size
                boxes = grid_boxes(height, width, self.config.grids).to(self.pixel_mean.device)
                sx, sy = net.scale
                x = (net.tensor.to(self.pixel_mean.device) - self.pixel_mean) / self.pixel_std
                features, logits = self.head(self.res4(x[None]), boxes * boxes.new_tensor([sx, sy, sx, sy]))
                scores, labels = F.softmax(logits, dim=1).max(dim=1)
                order = torch.argsort(scores, descending=True, stable=True)
                if max_boxes is not None:
                    order = order[:max_boxes]
                n = len(order)
                results.append(Detections(
                    boxes=boxes[order], scores=scores[order].float(), labels=labels[order],
                    attr_ids=labels.new_zeros((n, 0)), attr_scores=scores.new_zeros((n, 0)),
                    features=features[order].float().contiguous(), image_size=(height, width)))
            return results
        finally:
            self.train(was_training)


# --------------------------------------------------------------------------- checkpoints and files


def _arch_name(layers: tuple[int, ...], groups: int, width_per_group: int) -> str:
    depth = 3 * sum(layers) + 2
    if groups > 1:
        return f"resnext{depth}_{groups}x{width_per_group}d"
    if width_per_group != 64:
        return f"wide_resnet{depth}_{width_per_group // 64}"
    return f"resnet{depth}"


def grid_config_for(state: dict[str, Tensor], origin: str) -> GridConfig:
    """The :class:`GridConfig` of a torchvision ImageNet ResNet/ResNeXt state dict: blocks per
    layer from the key names, groups and width from ``layer1.0.conv2`` (width = groups x
    width_per_group, input channels per group = width_per_group for layer1's 64 planes)."""
    required = ("conv1.weight", "bn1.weight", "layer1.0.conv3.weight", "layer4.0.conv3.weight", "fc.weight")
    missing = [k for k in required if k not in state]
    if missing:
        hint = ""
        if any(k.startswith(("backbone.", "roi_heads.", "proposal_generator.", "rpn.")) for k in state):
            hint = (" It looks like a detector checkpoint: set detector.arch to butd_r101_c4 (BUTD .pkl) or "
                    "vinvl_x152_c4 (VinVL .pth) for it.")
        elif "layer1.0.conv2.weight" in state:
            hint = " It looks like a ResNet-18/34 (basic blocks, 512-dim features): use a ResNet-50 or deeper."
        raise CheckpointError(f"{origin}: not a torchvision ResNet/ResNeXt ImageNet classifier (missing {missing}; "
                              f"first keys: {list(state)[:5]}).{hint} {GRID_ARCH} needs a file like torchvision's "
                              f"resnet101-63fe2227.pth (see README, 'No detector weights: grid features')")
    layers = tuple(1 + max((int(m.group(1)) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))), default=-1)
                   for i in range(1, 5))
    if min(layers) < 1:
        raise CheckpointError(f"{origin}: blocks per layer {layers}: a ResNet has at least one in each of layer1..4")
    conv2 = state["layer1.0.conv2.weight"]
    groups = int(conv2.shape[0]) // int(conv2.shape[1])
    fc = state["fc.weight"]
    if tuple(fc.shape) != (NUM_CLASSES, 2048):
        raise CheckpointError(f"{origin}: fc.weight is {tuple(fc.shape)}, expected ({NUM_CLASSES}, 2048): {GRID_ARCH} "
                              "needs an ImageNet-1k classifier (its classes are the tags) with 2048-dim features")
    return GridConfig(arch=_arch_name(layers, groups, int(conv2.shape[0]) // groups), layers=layers, groups=groups,
                      width_per_group=int(conv2.shape[0]) // groups)


def _load_body(model: GridDetector, state: dict[str, Tensor], origin: str, fix: str) -> GridDetector:
    expected = model.body.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{origin}: not a torchvision {model.config.arch}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]}; {fix}")
    model.body.load_state_dict(state)
    return model.eval()


def convert_grid(path: str | Path, **changes: Any) -> GridDetector:
    """A :class:`GridDetector` from a torchvision ImageNet ResNet/ResNeXt checkpoint file (its
    state dict, possibly under ``"state_dict"``/``"model"`` or with ``module.`` prefixes);
    ``changes``: other :class:`GridConfig` values (``grids``, ``min_size``, ...).
    Raises :class:`~mmcn.vision.checkpoint.CheckpointError` (a ValueError) naming the file."""
    path = Path(path)
    state = read_state_dict(path)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    config = replace(grid_config_for(state, str(path)), **changes)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # half-precision files too
    return _load_body(GridDetector(config), state, str(path), "pass torchvision's state dict of that model")


def is_grid_folder(path: str | Path) -> bool:
    """True when ``path/config.json`` is a grid model's."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text("utf-8"))
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("kind") == KIND


def load_grid(path: str | Path, map_location: str | torch.device = "cpu") -> GridDetector:
    """A grid model saved by :func:`mmcn.vision.detector.save_detector`, in eval mode."""
    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path / WEIGHTS_FILE}: missing; a grid detector folder holds {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE} (written by the detector stage with detector.arch {GRID_ARCH})")
    config = read_config(path / CONFIG_FILE, GridConfig, "grid model")
    state = {k[len("body."):] if k.startswith("body.") else k: v
             for k, v in load_file(str(path / WEIGHTS_FILE), device="cpu").items()}
    model = _load_body(GridDetector(config), state, str(path / WEIGHTS_FILE), "convert the checkpoint again")
    return model.to(map_location).eval()
