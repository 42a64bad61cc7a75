"""mAP@0.5: hand-checked cases (perfect, duplicates, misses, ranking) and VOC interpolation."""
import numpy as np
import pytest

from mmcn.eval.detection import ImageBoxes, average_precision, mean_average_precision


def boxes(*rows):
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def test_perfect_detections_give_one():
    gt = [ImageBoxes(boxes([0, 0, 10, 10], [20, 20, 40, 40]), np.array([0, 1]))]
    det = [ImageBoxes(boxes([0, 0, 10, 10], [20, 20, 40, 40]), np.array([0, 1]), np.array([0.9, 0.8]))]
    assert mean_average_precision(det, gt, num_classes=2)["mAP"] == pytest.approx(1.0)


def test_duplicate_is_false_positive_and_miss_lowers_recall():
    gt = [ImageBoxes(boxes([0, 0, 10, 10]), np.array([0])), ImageBoxes(boxes([5, 5, 15, 15]), np.array([0]))]
    det = [ImageBoxes(boxes([0, 0, 10, 10], [0, 0, 10, 11]), np.array([0, 0]), np.array([0.9, 0.8])),
           ImageBoxes(boxes([50, 50, 60, 60]), np.array([0]), np.array([0.95]))]
    # ranked: fp(0.95), tp(0.9), fp(0.8); recall 0, .5, .5; precision 0, .5, 1/3 -> AP = 0.5 * 0.5
    result = mean_average_precision(det, gt, num_classes=1)
    assert result["AP"][0] == pytest.approx(0.25) and result["n_gt"][0] == 2


def test_wrong_class_or_low_iou_does_not_count_and_absent_classes_are_ignored():
    gt = [ImageBoxes(boxes([0, 0, 10, 10]), np.array([1]))]
    det = [ImageBoxes(boxes([0, 0, 10, 10], [0, 0, 10, 4]), np.array([0, 1]), np.array([0.9, 0.8]))]
    result = mean_average_precision(det, gt, num_classes=3)
    assert result["AP"] == {1: 0.0} and result["mAP"] == 0.0


def test_voc_interpolation_uses_precision_envelope():
    assert average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(
        0.5 * 1.0 + 0.5 * 2 / 3)
