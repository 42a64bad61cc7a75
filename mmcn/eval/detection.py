"""Detection quality: per-class average precision and mAP at an IoU threshold (VOC style).

AP is the area under the all-point interpolated precision/recall curve (PASCAL VOC 2010+):
detections of a class are ranked by score over the whole split, each matches the
highest-IoU unmatched ground-truth box of that class in its image if IoU >= threshold,
otherwise it is a false positive. mAP averages over the classes that have ground truth.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou


@dataclass
class ImageBoxes:
    """Boxes (n, 4) xyxy pixels with class ids (n,) and, for detections, scores (n,)."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None = None


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP from a recall-sorted precision/recall curve."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # precision envelope
    steps = np.where(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def mean_average_precision(detections: list[ImageBoxes], ground_truth: list[ImageBoxes], num_classes: int,
                           iou_threshold: float = 0.5) -> dict:
    """``{"mAP": float, "AP": {class_id: float}, "n_gt": {class_id: int}}`` over images in order."""
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection lists for {len(ground_truth)} images")
    ap: dict[int, float] = {}
    n_gt: dict[int, int] = {}
    for c in range(num_classes):
        records = []  # (score, is_true_positive)
        total = 0
        for det, gt in zip(detections, ground_truth):
            gt_boxes = gt.boxes[gt.labels == c]
            total += len(gt_boxes)
            d_mask = det.labels == c
            d_boxes, d_scores = det.boxes[d_mask], det.scores[d_mask]
            if not len(d_boxes):
                continue
            order = np.argsort(-d_scores, kind="stable")
            d_boxes, d_scores = d_boxes[order], d_scores[order]
            matched = np.zeros(len(gt_boxes), dtype=bool)
            ious = (box_iou(torch.as_tensor(d_boxes, dtype=torch.float64), torch.as_tensor(gt_boxes, dtype=torch.float64))
                    .numpy() if len(gt_boxes) else np.zeros((len(d_boxes), 0)))
            for i, score in enumerate(d_scores):
                hit = False
                if ious.shape[1]:
                    candidates = np.where(~matched, ious[i], -1.0)
                    j = int(np.argmax(candidates))
                    if candidates[j] >= iou_threshold:
                        matched[j] = hit = True
                records.append((float(score), hit))
        if total == 0:
            continue
        n_gt[c] = total
        if not records:
            ap[c] = 0.0
            continue
        records.sort(key=lambda r: -r[0])
        tp = np.cumsum([r[1] for r in records])
        fp = np.cumsum([not r[1] for r in records])
        ap[c] = average_precision(tp / total, tp / np.maximum(tp + fp, 1))
    return {"mAP": float(np.mean(list(ap.values()))) if ap else 0.0, "AP": ap, "n_gt": n_gt}


def evaluate_detector(model, samples, batch_size: int = 16, iou_threshold: float = 0.5,
                      score_thresh: float = 0.05) -> dict:
    """mAP of ``model`` (a :class:`mmcn.vision.detector.Detector`) on ``samples`` with boxes
    (:class:`mmcn.vision.train.Sample`, 1-based labels); class names in the result."""
    model.eval()
    detections, truth = [], []
    for first in range(0, len(samples), batch_size):
        batch = samples[first:first + batch_size]
        for sample, det in zip(batch, model.detect([s.image for s in batch], min_boxes=0,
                                                  score_thresh=score_thresh)):
            detections.append(ImageBoxes(det.boxes.numpy(), det.labels.numpy(), det.scores.numpy()))
            truth.append(ImageBoxes(sample.boxes.numpy(), sample.labels.numpy() - 1))
    classes = model.config.classes
    result = mean_average_precision(detections, truth, len(classes), iou_threshold)
    return {"mAP": result["mAP"], "AP": {classes[c]: v for c, v in result["AP"].items()},
            "n_gt": {classes[c]: v for c, v in result["n_gt"].items()}, "n_images": len(samples)}
