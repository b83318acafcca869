"""agp_models.metrics curves: the points behind AUROC, AP and PRO give back those numbers,
and the ROC / PR points are sklearn's."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_curve

from agp_models import metrics

TOLERANCE = 1e-12


def trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


def corners(x: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
    """The points of a polyline where it changes direction, plus its two ends."""
    points = np.round(np.stack([x, y], 1).astype(np.float64), 12)
    points = points[np.r_[True, np.any(np.diff(points, axis=0) != 0, axis=1)]]  # no repeats
    before, after = points[1:-1] - points[:-2], points[2:] - points[1:-1]
    turns = np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) > 1e-12
    return [tuple(p) for p in points[np.r_[True, turns, True]]]


def binary_problem(seed: int, quantised: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(400) < 0.3
    labels[:2] = [True, False]
    scores = rng.standard_normal(400) + labels * 1.2
    if quantised:  # ties inside and across classes
        scores = np.round(scores * 3)
    return scores.astype(np.float32), labels


def pixel_problem(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = ndimage.uniform_filter(rng.random((6, 32, 32)), size=(0, 5, 5)) > 0.6
    maps = (rng.random(masks.shape) + masks * 0.7).astype(np.float32)
    return maps, masks


@pytest.mark.parametrize("quantised", [False, True])
def test_image_curves_give_back_auroc_and_ap(quantised: bool) -> None:
    scores, labels = binary_problem(1, quantised)
    curves = metrics.image_curves(scores, labels)
    fpr, tpr = curves["roc"]
    assert abs(trapezoid(fpr, tpr) - metrics.auroc(scores, labels)) < TOLERANCE
    recall, precision = curves["pr"]
    assert abs(float(np.sum(np.diff(recall) * precision[1:])) - metrics.average_precision(scores, labels)) < TOLERANCE
    # The same polyline as sklearn's ROC curve (both keep some collinear points: compare corners).
    sk_fpr, sk_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert corners(fpr, tpr) == corners(sk_fpr, sk_tpr)
    # Our PR points are sklearn's at the positive scores (sklearn adds thresholds where only
    # negatives change, which leave recall, and so AP, unchanged).
    sk_precision, sk_recall, _ = precision_recall_curve(labels, scores)
    assert set(zip(np.round(recall, 12), np.round(precision, 12))) <= set(
        zip(np.round(sk_recall, 12), np.round(sk_precision, 12)))


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_pro_curve_area_is_the_pro_score(limit: float) -> None:
    maps, masks = pixel_problem(2)
    curves = metrics.pixel_curves(maps, masks, fpr_limit=limit)
    fpr, pro = curves["pro"]
    assert fpr[0] == 0.0 and fpr[-1] == pytest.approx(limit) and np.all(np.diff(fpr) >= 0)
    assert np.all((pro >= 0) & (pro <= 1))
    assert abs(trapezoid(fpr, pro) / limit - metrics.pro_score(maps, masks, limit)) < 1e-9
    roc_fpr, roc_tpr = curves["roc"]
    assert abs(trapezoid(roc_fpr, roc_tpr) - metrics.pixel_metrics(maps, masks)["p_auroc"]) < TOLERANCE


def test_undefined_curves_are_empty() -> None:
    curves = metrics.image_curves(np.array([0.1, 0.5]), np.array([0, 0]))
    assert all(len(x) == 0 and len(y) == 0 for x, y in curves.values())
    pixel = metrics.pixel_curves(np.random.default_rng(0).random((2, 8, 8)), np.zeros((2, 8, 8), bool))
    assert set(pixel) == {"roc", "pr", "pro"}
    assert all(len(x) == 0 for x, _ in pixel.values())
