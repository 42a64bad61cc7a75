"""The reference codes' pre/post-processing rules, so converted BUTD and VinVL weights give the
boxes and features those codes give (``DetectorConfig.fidelity``; used by
:class:`mmcn.vision.detector.Detector`).

Facts below were read from the reference sources (no code copied):

VinVL (``fidelity="vinvl"``: microsoft/scene_graph_benchmark, its maskrcnn_benchmark, with
``sgg_configs/vgattr/vinvl_x152c4.yaml`` and the extraction flags ``MODEL.ROI_HEADS.NMS_FILTER 1``,
``SCORE_THRESH 0.2``, ``TEST.IGNORE_BOX_REGRESSION True``):

- D2 resize (``data/transforms/transforms.py`` ``Resize.get_size``): short side 600; if the
  long side would pass 1000, the short side becomes ``int(round(1000 * short / long))``; the
  other side is *truncated* (``int(size * long / short)``), so 333x500 -> 600x900 and
  431x1300 -> 332x1001 (past the cap, as VinVL does). The image is a PIL RGB image resized by
  ``torchvision.transforms.functional.resize`` (PIL bilinear, which antialiases when it
  shrinks), then ``ToTensor`` (/255) and ``to_bgr255`` (x255, BGR): :func:`vinvl_resize`
  does the same with PIL, so the network input is bit-identical for the same decoded pixels.
- D1 proposals (``modeling/rpn/inference.py`` ``RPNPostProcessor``, C4: one feature map):
  sigmoid objectness, top ``PRE_NMS_TOP_N_TEST`` (6000 in the yaml) by probability,
  decode, clip to ``[0, W-1] x [0, H-1]`` (``BoxList.clip_to_image``, ``TO_REMOVE = 1``,
  ``remove_empty=False``), drop boxes whose ``x2 - x1 + 1`` or ``y2 - y1 + 1`` is under
  ``RPN.MIN_SIZE`` (default 0: zero-size boxes stay), NMS 0.7 (``RPN.NMS_THRESH``), keep
  ``POST_NMS_TOP_N_TEST`` (300 in the yaml; the default would be 1000).
- D6 NMS: ``layers/nms.py`` was maskrcnn_benchmark's ``_C.nms`` until 2021-06-07 (commit
  "upgrade repo to pytorch1.7", after VinVL's feature release), whose CUDA kernel uses
  areas ``(x2 - x1 + 1) * (y2 - y1 + 1)``, intersections ``+ 1`` and suppresses when
  ``IoU > thresh`` (in float32); since then it is ``torchvision.ops.nms`` (no +1). The RPN
  and the final per-class NMS both use it: ``fidelity="vinvl"`` applies the +1 kernel to both.
- Box selection (``box_head/inference.py`` ``filter_results_peter``): NMS 0.3 per
  foreground class over all boxes; a box's label is its best class among those it
  survived, kept only if that score is above 0; sorted by score; the boxes scoring
  ``>= SCORE_THRESH`` kept, at least ``MIN_DETECTIONS_PER_IMG`` (10), at most
  ``DETECTIONS_PER_IMG`` (100). Boxes return to the image by ``BoxList.resize``:
  multiplied by ``original / resized`` per axis.
- D7 attributes (``scene_graph_benchmark/attribute_head/inference.py``): softmax, "no
  attribute" zeroed, probabilities ``<= POSTPROCESS_ATTRIBUTES_THRESHOLD`` (0.05) zeroed;
  if more than ``MAX_NUM_ATTR_PER_IMG`` (100) remain in the image, those under the
  ``(n - 100 + 1)``-th smallest of *all* the image's entries (zeros included, as the code
  does) are zeroed; then the top ``MAX_NUM_ATTR_PER_OBJ`` (16) per box: every attribute
  left above 0 is kept (:func:`vinvl_attributes`), the embedding fed with the final label.

BUTD (``fidelity="butd"``: peteanderson80/bottom-up-attention, ``lib/fast_rcnn/test.py``,
``lib/rpn/proposal_layer.py``, ``tools/generate_tsv.py`` run with
``experiments/cfgs/faster_rcnn_end2end_resnet.yml``, which sets ``USE_GPU_NMS: False``):

- D3 resize (``_get_image_blob``): ``s = 600 / short``, or ``1000 / long`` when
  ``round(s * long) > 1000``; ``cv2.resize(fx=s, fy=s)``: size ``round(side * s)`` and
  bilinear sampling with the exact scale ``s`` (source ``(x + 0.5) / s - 0.5``), which is
  ``aten.upsample_bilinear2d(x, size, False, s, s)`` (:func:`caffe_resize`); boxes return
  to the image divided by ``s``. Not bit-exact: caffe subtracts the mean before resizing
  (in float64 then float32) and cv2 computes its own float coefficients: <= 0.02 per pixel.
- D8 proposals (``proposal_layer.py`` with ``TEST.RPN_*``): py-faster-rcnn's anchors
  (``generate_anchors.py``: base box ``[0, 0, 15, 15]``, rounded widths, centred at 7.5:
  the ``"maskrcnn_benchmark"`` cell anchors), decoded by ``bbox_transform_inv`` (widths
  ``x2 - x1 + 1``, ``x2 = cx + w/2`` with no ``- 1``, no clamp of ``dw``), clipped to
  ``[0, W-1]``, boxes with a side (``+1``) under ``16 * s`` dropped, sorted by score, top
  6000, NMS 0.7, top 300. ``butd_proposals="detectron2"`` instead filters as the detectron2
  port (airsplay/py-bottom-up-attention; the lxmert FRCNN port in transformers'
  research_projects follows it): top 6000 logits, clip to ``[0, W]``, drop empty boxes
  (width or height not above 0), torchvision NMS 0.7, top 300. The published BUTD features
  (bottom-up-attention's 10-100 and 36 box sets, and LXMERT's, all made with the caffe
  code) need ``"caffe"``; ``"detectron2"`` reproduces features extracted with the port.
- D6 NMS: ``lib/nms/cpu_nms.pyx`` (+1 areas and intersections in float32, suppressed
  when ``IoU >= thresh`` compared in double), for the proposals and for the per-class NMS
  of ``generate_tsv.py``, which runs on boxes already divided by ``s`` (image pixels: the
  ``+1`` is not scale-free).
- Selection (``generate_tsv.py``): per foreground class, NMS 0.3 over all proposals;
  ``max_conf`` = the best score among the classes a box survived (0 if none); boxes with
  ``max_conf >= 0.2``, else the 10 best, at most the 100 best. Object label: the argmax of
  the box's foreground probabilities (the label the generate_tsv derivatives write, e.g.
  LXMERT's), conf ``max_conf``.
- D4 attributes: the caffe net embeds ``argmax`` of ``cls_prob`` over all 1601 classes,
  background included, per proposal (:func:`butd_embedding_labels`); the attribute is the
  argmax of the softmax with "no attribute" dropped after the softmax, kept above 0.1.

Both references run one image per forward (VinVL's ``TEST.IMS_PER_BATCH 1``, caffe's single
blob): a batch must hold images of one network shape (the features stage batches so), since
padding changes the convolutions at a smaller image's border and adds anchors beyond it.

What stays float rounding, or unverifiable here: sigmoid (VinVL, mmcn) vs caffe's 2-way
softmax for the RPN score ranks the same boxes except on float ties; score ties are
ordered by a stable sort here (the references' sorts are not stable); JPEG decoders
(libjpeg builds) differ outside mmcn. The background position in ``cls_score``, the
class-embedding row order, the "no attribute" position and the vocabulary orders need the
real files: the checkpoint conversion reports what it assumed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

CAFFE_RPN_MIN_SIZE = 16  # bottom-up-attention's cfg.TEST.RPN_MIN_SIZE, in original-image pixels
MASKRCNN_RPN_MIN_SIZE = 0  # maskrcnn_benchmark's MODEL.RPN.MIN_SIZE (VinVL does not set it)
NMS_RULES = ("cuda", "cpu")  # maskrcnn_benchmark's CUDA kernel (IoU > t) | py-faster-rcnn's cpu_nms (IoU >= t)


# --------------------------------------------------------------------------- resizing


def vinvl_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width) after VinVL's ``Resize.get_size`` (D2): truncating, may pass ``max_size``."""
    size = min_size
    short, long = float(min(height, width)), float(max(height, width))
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def vinvl_resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """VinVL's input pixels (D2): the uint8 RGB image (3, H, W) resized to ``size`` as a PIL
    image by PIL's bilinear filter (antialiased when shrinking), then ``ToTensor`` (/255)
    and back to 0-255 (x255) in float32, RGB order. Non-uint8 input is rounded to uint8."""
    from torchvision.transforms import functional as TF

    if image.dtype != torch.uint8:
        image = image.detach().round().clamp(0, 255).to(torch.uint8)
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    pil = TF.resize(pil, list(size), interpolation=TF.InterpolationMode.BILINEAR)
    return TF.to_tensor(pil) * 255


def caffe_scale(height: int, width: int, min_size: int, max_size: int) -> tuple[float, tuple[int, int]]:
    """``(s, (height, width))`` of BUTD's ``_get_image_blob`` (D3): ``s = min_size / short``
    unless ``round(s * long) > max_size``; cv2's output size ``round(side * s)`` (half to even)."""
    s = float(min_size) / float(min(height, width))
    if round(s * max(height, width)) > max_size:
        s = float(max_size) / float(max(height, width))
    return s, (int(round(height * s)), int(round(width * s)))


def caffe_resize(image: Tensor, scale: float, size: tuple[int, int]) -> Tensor:
    """Bilinear resize sampling at the exact scale (source ``(x + 0.5) / scale - 0.5``), as
    ``cv2.resize(fx=scale, fy=scale)`` does (D3); ``image`` float (3, H, W)."""
    if tuple(size) == tuple(image.shape[-2:]) and scale == 1.0:
        return image
    return torch.ops.aten.upsample_bilinear2d(image[None], list(size), False, scale, scale)[0]


# --------------------------------------------------------------------------- NMS with +1 areas


def _plus_one_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``a`` and ``b`` (broadcast, (..., 4)) with +1 areas and intersections, in
    the references' float32 order of operations (``a`` is the better-scoring box)."""
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0]) + 1).clamp(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1]) + 1).clamp(min=0)
    inter = w * h
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    return inter / (area_a + area_b - inter)


def _over(iou: Tensor, thresh: float, rule: str) -> Tensor:
    if rule == "cpu":  # cpu_nms.pyx: float32 IoU >= a Python (double) threshold
        return iou.double() >= thresh
    if rule == "cuda":  # nms_kernel: float IoU > float threshold
        return iou > torch.tensor(thresh, dtype=torch.float32, device=iou.device)
    raise ValueError(f"NMS rule must be one of {NMS_RULES}, got {rule!r}")


def nms_plus_one(boxes: Tensor, scores: Tensor, thresh: float, rule: str, max_keep: int = 0) -> Tensor:
    """Greedy NMS with +1 areas (D6); indices of the kept boxes, best score first (at most
    ``max_keep`` when > 0: the rest cannot change the first ones). One step per *kept* box."""
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order].float()
    n = len(b)
    removed = torch.zeros(n, dtype=torch.bool, device=b.device)
    keep = []
    i = 0
    while i < n:
        alive = torch.nonzero(~removed[i:])
        if not len(alive):
            break
        i += int(alive[0])
        keep.append(i)
        if max_keep and len(keep) == max_keep:
            break
        removed[i + 1:] |= _over(_plus_one_iou(b[i][None], b[i + 1:]), thresh, rule)
        i += 1
    return order[torch.tensor(keep, dtype=torch.long, device=b.device)]


def per_class_nms_plus_one(boxes: Tensor, scores: Tensor, thresh: float, rule: str,
                           classes_per_chunk: int = 1024) -> Tensor:
    """:func:`nms_plus_one` in every class at once: ``boxes`` (N, K, 4) (or (N, 4) shared by
    all classes), ``scores`` (N, K) -> (N, K) bool, True where box n survives in class k.
    N steps over (classes, N) tensors per chunk of classes, not one NMS call per class."""
    n, k = scores.shape
    shared = boxes.dim() == 2 or boxes.stride(1) == 0
    if shared:  # one IoU matrix for all classes (proposals as final boxes)
        b = (boxes if boxes.dim() == 2 else boxes[:, 0]).float()
        over_all = _over(_plus_one_iou(b[:, None, :], b[None, :, :]), thresh, rule)   # (N, N)
    survived = torch.zeros((n, k), dtype=torch.bool, device=scores.device)
    for first in range(0, k, classes_per_chunk):
        cls = slice(first, min(first + classes_per_chunk, k))
        order = torch.sort(scores[:, cls].t(), dim=1, descending=True, stable=True).indices     # (C, N)
        if shared:  # over[i, c, j]: the i-th box of class c in score order overlaps its j-th
            over = over_all[order.t()].gather(2, order[None].expand(n, -1, -1))
        else:
            b = boxes[:, cls].permute(1, 0, 2).float().gather(1, order[..., None].expand(-1, -1, 4))
            over = _over(_plus_one_iou(b.transpose(0, 1)[:, :, None, :], b[None]), thresh, rule)
        suppressed = torch.zeros(order.shape, dtype=torch.bool, device=scores.device)
        kept = torch.zeros((n, len(order)), dtype=torch.bool, device=scores.device)
        for i in range(n):  # box i (in score order) survives unless a kept, better box suppressed it
            alive = ~suppressed[:, i]
            kept[i] = alive
            suppressed.logical_or_(over[i] & alive[:, None])
        survived[:, cls] = torch.zeros_like(order, dtype=torch.bool).scatter_(1, order, kept.t()).t()
    return survived


# --------------------------------------------------------------------------- proposals


def decode_caffe(deltas: Tensor, anchors: Tensor) -> Tensor:
    """py-faster-rcnn's ``bbox_transform_inv`` (D8): widths ``x2 - x1 + 1``, ``x2 = cx + w/2``
    (no ``- 1``), no clamp of ``dw``/``dh``; float32."""
    anchors = anchors.to(deltas.dtype)
    widths = anchors[:, 2] - anchors[:, 0] + 1.0
    heights = anchors[:, 3] - anchors[:, 1] + 1.0
    ctr_x = anchors[:, 0] + 0.5 * widths
    ctr_y = anchors[:, 1] + 0.5 * heights
    cx = deltas[:, 0] * widths + ctr_x
    cy = deltas[:, 1] * heights + ctr_y
    w = torch.exp(deltas[:, 2]) * widths
    h = torch.exp(deltas[:, 3]) * heights
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=1)


def _clip_minus_one(boxes: Tensor, height: int, width: int) -> Tensor:
    x = boxes[:, 0::2].clamp(min=0, max=width - 1)
    y = boxes[:, 1::2].clamp(min=0, max=height - 1)
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def filter_maskrcnn(boxes: Tensor, logits: Tensor, image_size: tuple[int, int], pre_nms: int, post_nms: int,
                    nms_thresh: float, min_size: float = MASKRCNN_RPN_MIN_SIZE) -> Tensor:
    """VinVL's proposals of one image (D1) from decoded ``boxes`` (A, 4) and objectness ``logits`` (A,)."""
    prob = logits.sigmoid()
    prob, top = prob.topk(min(pre_nms, len(prob)), sorted=True)
    boxes = _clip_minus_one(boxes[top], *image_size)
    ok = (boxes[:, 2] - boxes[:, 0] + 1 >= min_size) & (boxes[:, 3] - boxes[:, 1] + 1 >= min_size)
    boxes, prob = boxes[ok], prob[ok]
    return boxes[nms_plus_one(boxes, prob, nms_thresh, "cuda", post_nms)]


def filter_caffe(boxes: Tensor, logits: Tensor, image_size: tuple[int, int], scale: float, pre_nms: int,
                 post_nms: int, nms_thresh: float, min_size: float = CAFFE_RPN_MIN_SIZE) -> Tensor:
    """BUTD caffe's proposal layer for one image (D8) from boxes decoded by :func:`decode_caffe`:
    clip to ``W-1``, drop sides (+1) under ``min_size * scale``, sort, top ``pre_nms``, NMS, top ``post_nms``."""
    boxes = _clip_minus_one(boxes, *image_size)
    least = (torch.tensor(min_size, dtype=torch.float32) * torch.tensor(scale, dtype=torch.float32)).to(boxes.device)
    ok = (boxes[:, 2] - boxes[:, 0] + 1 >= least) & (boxes[:, 3] - boxes[:, 1] + 1 >= least)
    boxes, score = boxes[ok], logits[ok].sigmoid()
    order = torch.sort(score, descending=True, stable=True).indices[:pre_nms]
    boxes, score = boxes[order], score[order]
    return boxes[nms_plus_one(boxes, score, nms_thresh, "cpu", post_nms)]


def filter_detectron2(boxes: Tensor, logits: Tensor, image_size: tuple[int, int], pre_nms: int, post_nms: int,
                      nms_thresh: float) -> Tensor:
    """The detectron2 port's ``find_top_rpn_proposals`` for one image (one level): top
    ``pre_nms`` logits, clip to ``[0, W] x [0, H]``, drop boxes not wider/taller than 0, NMS."""
    logits, top = logits.topk(min(pre_nms, len(logits)), sorted=True)
    boxes = clip_boxes_to_image(boxes[top], image_size)
    ok = torch.isfinite(boxes).all(dim=1) & torch.isfinite(logits)
    ok &= (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    boxes, logits = boxes[ok], logits[ok]
    keep = batched_nms(boxes, logits, torch.zeros_like(logits, dtype=torch.long), nms_thresh)
    return boxes[keep[:post_nms]]


def proposals(rpn, image_list, features: Tensor, rule: str, scales: list[tuple[float, float]]) -> list[Tensor]:
    """Proposals of a batch by one of the reference rules (``"maskrcnn"``, ``"caffe"``,
    ``"detectron2"``), from the RPN head's outputs, anchors and box coder of ``rpn``
    (torchvision's ``RegionProposalNetwork`` as built by ``detector.build_rpn``)."""
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    logits, deltas = rpn.head([features])
    anchors = rpn.anchor_generator(image_list, [features])
    logits, deltas = concat_box_prediction_layers(logits, deltas)
    n = len(anchors)
    logits, deltas = logits.detach().view(n, -1), deltas.detach().view(n, -1, 4)
    pre, post, thresh = rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"], rpn.nms_thresh
    out = []
    for a, lo, d, size, (sx, _) in zip(anchors, logits, deltas, image_list.image_sizes, scales):
        if rule == "caffe":
            out.append(filter_caffe(decode_caffe(d, a), lo, size, sx, pre, post, thresh))
            continue
        boxes = rpn.box_coder.decode_single(d, a)
        if rule == "maskrcnn":
            out.append(filter_maskrcnn(boxes, lo, size, pre, post, thresh))
        elif rule == "detectron2":
            out.append(filter_detectron2(boxes, lo, size, pre, post, thresh))
        else:
            raise ValueError(f"unknown proposal rule {rule!r}")
    return out


# --------------------------------------------------------------------------- selection


def select_vinvl(survived: Tensor, scores: Tensor, score_thresh: float, min_boxes: int,
                 max_boxes: int) -> tuple[Tensor, Tensor, Tensor]:
    """``filter_results_peter``: (box index, class index, score) best first; ``scores`` (N, K)
    foreground probabilities, ``survived`` (N, K) the per-class NMS outcome."""
    best, label = (scores * survived).max(dim=1)
    candidates = torch.nonzero(best > 0).squeeze(1)
    order = candidates[torch.argsort(best[candidates], descending=True, stable=True)]
    n_above = int((best[order] >= score_thresh).sum())
    keep = order[: min(max(n_above, min_boxes), max_boxes)]
    return keep, label[keep], best[keep]


def select_butd(survived: Tensor, scores: Tensor, score_thresh: float, min_boxes: int,
                max_boxes: int) -> tuple[Tensor, Tensor, Tensor]:
    """``generate_tsv.py``: ``max_conf`` (0 where a box survived no class) decides; every
    proposal can fill ``min_boxes``; the label is the argmax of the box's foreground
    probabilities. (box index, class index, max_conf), by decreasing max_conf."""
    max_conf = (scores * survived).max(dim=1).values
    order = torch.argsort(max_conf, descending=True, stable=True)
    n_above = int((max_conf >= score_thresh).sum())
    keep = order[: min(max(n_above, min_boxes), max_boxes)]
    return keep, scores[keep].argmax(dim=1), max_conf[keep]


def butd_embedding_labels(class_probs: Tensor) -> Tensor:
    """D4: the class the caffe attribute head embeds, argmax over all K+1 probabilities
    (background 0 included), per proposal (native labels: 0 = background)."""
    return class_probs.argmax(dim=1)


def vinvl_attributes(logits: Tensor, thresh: float, per_box: int, per_image: int) -> tuple[Tensor, Tensor]:
    """D7: VinVL's ``AttributePostProcessor`` for one image's boxes. ``logits`` (n, A+1),
    "no attribute" at 0. Returns (ids, scores) (n, per_box), 0-based attribute ids best
    first, -1 / 0 where fewer attributes than ``per_box`` were kept."""
    scores = F.softmax(logits, dim=1)
    scores[:, 0] = 0.0
    scores = torch.where(scores > thresh, scores, torch.zeros_like(scores))
    found = int((scores > 0).sum())
    if per_image > 0 and found > per_image:
        cut = torch.kthvalue(scores.flatten().cpu(), found - per_image + 1).values.item()
        scores = torch.where(scores < cut, torch.zeros_like(scores), scores)
    k = min(per_box, scores.shape[1])
    top, ids = scores.topk(k, dim=1)
    ok = top > 0
    return torch.where(ok, ids - 1, torch.full_like(ids, -1)), torch.where(ok, top, torch.zeros_like(top))


def image_to_original(boxes: Tensor, rule: str, scale: tuple[float, float], original: tuple[int, int],
                      net: tuple[int, int]) -> Tensor:
    """Network-input boxes back to image pixels: ``"vinvl"`` multiplies by original/resized
    per axis (``BoxList.resize``); others divide by the scale (caffe: ``rois / im_scale``)."""
    if rule == "vinvl":
        rw, rh = float(original[1]) / float(net[1]), float(original[0]) / float(net[0])
        return boxes * boxes.new_tensor([rw, rh, rw, rh])
    sx, sy = scale
    return boxes / boxes.new_tensor([sx, sy, sx, sy])

