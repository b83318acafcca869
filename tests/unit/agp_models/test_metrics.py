"""agp_models.metrics: exact agreement with sklearn and with the MVTec-AD PRO definition."""

from __future__ import annotations

import math
from bisect import bisect_right

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from agp_models import metrics

TOLERANCE = 1e-12


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


def random_binary_problem(seed: int, quantised: bool, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 3000))
    labels = rng.random(n) < rng.uniform(0.05, 0.9)
    labels[:2] = [True, False]  # both classes present
    scores = rng.standard_normal(n) + labels * rng.uniform(0.0, 2.0)
    if quantised:  # few distinct values: ties everywhere, including across classes
        scores = np.round(scores * rng.choice([2, 5, 20]))
    return scores.astype(dtype), labels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_binary_metrics_equal_sklearn(seed: int, quantised: bool, dtype: type) -> None:
    scores, labels = random_binary_problem(seed, quantised, dtype)
    assert abs(metrics.auroc(scores, labels) - roc_auc_score(labels, scores)) < TOLERANCE
    expected_ap = average_precision_score(labels, scores)
    assert abs(metrics.average_precision(scores, labels) - expected_ap) < TOLERANCE
    assert abs(metrics.f1_max(scores, labels) - sklearn_f1_max(labels, scores)) < TOLERANCE
    image = metrics.image_metrics(scores, labels)
    assert image == {
        "i_auroc": metrics.auroc(scores, labels),
        "i_ap": metrics.average_precision(scores, labels),
        "i_f1max": metrics.f1_max(scores, labels),
    }


def blob_masks(rng: np.random.Generator, shape: tuple[int, int, int], level: float) -> np.ndarray:
    return ndimage.uniform_filter(rng.random(shape), size=(0, 5, 5)) > level


@pytest.mark.parametrize("quantised", [False, True])
def test_pixel_metrics_equal_sklearn_on_all_pixels(quantised: bool) -> None:
    rng = np.random.default_rng(7)
    masks = blob_masks(rng, (12, 48, 40), 0.6)
    background = ndimage.uniform_filter(rng.random(masks.shape), size=(0, 3, 3))
    maps = (background + 0.3 * masks).astype(np.float32)
    if quantised:
        maps = np.round(maps * 50) / np.float32(50)
    flat_maps, flat_masks = maps.ravel(), masks.ravel()
    result = metrics.pixel_metrics(maps, masks.astype(np.uint8) * 255)  # 0/255 masks binarised
    assert abs(result["p_auroc"] - roc_auc_score(flat_masks, flat_maps)) < TOLERANCE
    assert abs(result["p_ap"] - average_precision_score(flat_masks, flat_maps)) < TOLERANCE
    assert abs(result["p_f1max"] - sklearn_f1_max(flat_masks, flat_maps)) < TOLERANCE
    assert abs(result["pro"] - reference_pro(maps, masks)) < TOLERANCE


@pytest.mark.parametrize("max_buckets", [1, 16, 1 << 10, 1 << 23])
def test_bucket_count_never_changes_a_result(
    monkeypatch: pytest.MonkeyPatch, max_buckets: int
) -> None:
    # The bucketed counting is an exact shortcut: any number of buckets (1 = a plain sort of
    # all negatives) must give bit-identical metrics. Pixel count > 4096 so buckets are used.
    rng = np.random.default_rng(3)
    masks = blob_masks(rng, (6, 40, 40), 0.62)
    maps = np.round(rng.standard_normal(masks.shape) * 30 + 40 * masks) / 7
    expected = metrics.pixel_metrics(maps, masks)
    monkeypatch.setattr(metrics, "_MAX_BUCKETS", max_buckets)
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 3000)  # several chunks of whole images
    assert metrics.pixel_metrics(maps, masks) == expected
    assert abs(expected["p_auroc"] - roc_auc_score(masks.ravel(), maps.ravel())) < TOLERANCE


def test_signed_zeros_tie_and_infinities_keep_their_order() -> None:
    labels = np.array([1, 0, 1, 0, 1, 0, 0, 1, 0], dtype=bool)
    scores = np.array([0.0, -0.0, -0.0, 0.0, np.inf, 2.0, -np.inf, 1.0, np.inf])
    finite = np.array([0.0, 0.0, 0.0, 0.0, 1e9, 2.0, -1e9, 1.0, 1e9])  # same order and ties
    assert metrics.image_metrics(scores, labels) == metrics.image_metrics(finite, labels)
    assert abs(metrics.auroc(scores, labels) - roc_auc_score(labels, finite)) < TOLERANCE


def test_torch_tensors_are_accepted() -> None:
    torch = pytest.importorskip("torch")
    scores, labels = random_binary_problem(0, True, np.float32)
    from_tensors = metrics.image_metrics(
        torch.from_numpy(scores).requires_grad_(True), torch.from_numpy(labels)
    )
    assert from_tensors == metrics.image_metrics(scores, labels)


def test_nan_scores_are_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1]))


def test_single_class_gives_nan_not_an_error() -> None:
    scores = np.array([0.2, 0.5, 0.9])
    for labels in (np.zeros(3), np.ones(3)):
        assert all(math.isnan(value) for value in metrics.image_metrics(scores, labels).values())
    assert all(math.isnan(value) for value in metrics.image_metrics([], []).values())
    maps = np.random.default_rng(0).random((2, 8, 8))
    no_defect = metrics.pixel_metrics(maps, np.zeros((2, 8, 8)))
    assert all(math.isnan(value) for value in no_defect.values())
    all_defect = metrics.pixel_metrics(maps, np.ones((2, 8, 8)))
    assert all(math.isnan(value) for value in all_defect.values())


# ----------------------------------------------------------------------------------- PRO


def reference_pro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """The MVTec-AD procedure written out literally (per-pixel weights, argsort, cumsum)."""
    maps, masks = np.asarray(maps, dtype=np.float64), np.asarray(masks) > 0
    fpr_weight = np.where(masks, 0.0, 1.0 / (~masks).sum())
    pro_weight = np.zeros(maps.shape)
    n_regions = 0
    for image in range(maps.shape[0]):
        labelled, count = ndimage.label(masks[image], structure=np.ones((3, 3)))
        n_regions += count
        for region in range(1, count + 1):
            pro_weight[image][labelled == region] = 1.0 / (labelled == region).sum()
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    sorted_scores = maps.ravel()[order]
    fpr = np.cumsum(fpr_weight.ravel()[order])
    pro = np.cumsum(pro_weight.ravel()[order]) / n_regions
    last_of_tie = np.append(np.diff(sorted_scores) != 0, True)
    fpr = np.concatenate([[0.0], np.minimum(fpr[last_of_tie], 1.0), [1.0]])
    pro = np.concatenate([[0.0], np.minimum(pro[last_of_tie], 1.0), [1.0]])
    correction = 0.0
    if fpr_limit not in fpr:
        i = bisect_right(fpr.tolist(), fpr_limit)
        slope = (pro[i] - pro[i - 1]) / (fpr[i] - fpr[i - 1])
        pro_at_limit = pro[i - 1] + slope * (fpr_limit - fpr[i - 1])
        correction = 0.5 * (pro_at_limit + pro[i - 1]) * (fpr_limit - fpr[i - 1])
    inside = fpr <= fpr_limit
    fpr, pro = fpr[inside], pro[inside]
    area = float(np.sum(0.5 * (pro[1:] + pro[:-1]) * (fpr[1:] - fpr[:-1]))) + correction
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(8))
def test_pro_equals_literal_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, (int(rng.integers(1, 4)), 17, 13), rng.uniform(0.55, 0.7))
    masks[0, 0, 0] = True  # at least one region
    masks[-1, -1, -1] = False  # at least one OK pixel
    maps = rng.random(masks.shape) + masks * rng.uniform(0.0, 1.0)
    if seed % 2:
        maps = np.round(maps * 8) / 8  # heavy ties between OK and region pixels
    for fpr_limit in (0.3, 0.05, 1.0):
        expected = reference_pro(maps, masks, fpr_limit)
        assert abs(metrics.pro_score(maps, masks, fpr_limit) - expected) < TOLERANCE


def test_pro_of_perfect_and_inverted_maps() -> None:
    masks = blob_masks(np.random.default_rng(1), (4, 32, 32), 0.6)
    perfect = masks.astype(np.float32)
    assert metrics.pro_score(perfect, masks) == 1.0
    assert metrics.pro_score(1.0 - perfect, masks) == 0.0
    noisy_inverted = 1.0 - perfect + 0.01 * np.random.default_rng(2).random(masks.shape)
    assert metrics.pro_score(noisy_inverted, masks) == 0.0


def test_pro_is_invariant_to_monotone_transforms() -> None:
    rng = np.random.default_rng(5)
    masks = blob_masks(rng, (3, 24, 24), 0.6)
    # Multiples of 1/64 in [0, 2): 2x+3 and exp keep every order and every tie exactly.
    maps = np.floor((rng.random(masks.shape) + masks) * 64) / 64
    base = metrics.pixel_metrics(maps, masks)
    assert metrics.pixel_metrics(2 * maps + 3, masks) == base
    assert metrics.pixel_metrics(np.exp(maps), masks) == base
    assert metrics.pixel_metrics(maps.astype(np.float32), masks) == base
    assert metrics.pixel_metrics(-np.exp(-maps), masks) == base


def test_pro_hand_computed_two_regions_with_ties() -> None:
    # Regions (8-connectivity): A = {(0,0), (1,1)} (diagonal neighbours — 4-connectivity would
    # split it), B = {(2,3), (3,3)}. 12 OK pixels -> each 1/12 FPR; each region pixel
    # 1/(|r|·#regions) = 1/(2·2) = 1/4 PRO.
    mask = np.array(
        [[1, 0, 0, 0],
         [0, 1, 0, 0],
         [0, 0, 0, 1],
         [0, 0, 0, 1]], dtype=bool)  # fmt: skip
    # Scores, ties on purpose: 0.9 = A(0,0) + one OK; 0.5 = A(1,1) + B(2,3) + two OK;
    # 0.2 = B(3,3) only; 0.1 = the nine other OK pixels.
    scores = np.array(
        [[0.9, 0.9, 0.1, 0.5],
         [0.1, 0.5, 0.1, 0.1],
         [0.5, 0.1, 0.1, 0.5],
         [0.1, 0.1, 0.1, 0.2]])  # fmt: skip
    # Curve (FPR, PRO), one point per distinct score, highest first, plus (0,0) and (1,1):
    #   (0,0) -> t=0.9 (1/12, 1/4) -> t=0.5 (3/12, 3/4) -> t=0.2 (3/12, 1) -> t=0.1 (1, 1)
    # Area for FPR <= 0.3:
    #   [0, 1/12]:    1/12 · (0 + 1/4)/2   = 1/96
    #   [1/12, 1/4]:  1/6 · (1/4 + 3/4)/2  = 1/12
    #   [1/4, 1/4]:   vertical, 0
    #   [1/4, 0.3]:   0.05 · 1             = 1/20   (curve is flat at 1, interpolation trivial)
    # (1/96 + 8/96 + 1/20) / 0.3 = (3/32 + 1/20) / 0.3 = 0.14375 / 0.3 = 23/48
    assert metrics.pro_score(scores[None], mask[None]) == pytest.approx(23 / 48, abs=TOLERANCE)
    assert reference_pro(scores[None], mask[None]) == pytest.approx(23 / 48, abs=TOLERANCE)


def test_pro_interpolates_exactly_at_the_limit_inside_a_tie() -> None:
    # One region {(0,0), (0,1)} (each pixel 1/2 PRO), ten OK pixels (each 0.1 FPR).
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, :2] = True
    scores = np.array(
        [[0.8, 0.4, 0.9, 0.6],
         [0.4, 0.4, 0.0, 0.0],
         [0.0, 0.0, 0.0, 0.0]])  # fmt: skip
    # Points: (0,0) -> t=0.9 (0.1, 0) -> t=0.8 (0.1, 0.5) -> t=0.6 (0.2, 0.5)
    #         -> t=0.4 (0.4, 1.0) -> t=0.0 (1, 1)
    # The tie at 0.4 (two OK pixels + one region pixel) is one straight segment from (0.2, 0.5)
    # to (0.4, 1.0) that crosses FPR 0.3; PRO there = 0.5 + 0.5 · (0.3-0.2)/(0.4-0.2) = 0.75.
    #   [0, 0.1] at 0: 0;  [0.1, 0.2] at 0.5: 0.05;  [0.2, 0.3]: 0.1 · (0.5 + 0.75)/2 = 0.0625
    # (0.05 + 0.0625) / 0.3 = 0.375.  Without interpolation (stop at 0.2): 0.05/0.3 ≈ 0.167;
    # normalising by the last FPR reached instead of 0.3 would give 0.25.
    assert metrics.pro_score(scores[None], mask[None]) == pytest.approx(0.375, abs=TOLERANCE)
    assert metrics.pro_score(scores[None], mask[None], fpr_limit=0.4) == pytest.approx(
        (0.05 + 0.2 * (0.5 + 1.0) / 2) / 0.4, abs=TOLERANCE
    )


def test_pro_counts_regions_per_image() -> None:
    # Overlapping blobs at the same place in two images are two regions (4 px and 2 px);
    # connecting them across images would make one 6-px region and give PRO(t=1) = 4/6.
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 1, 1:3] = True
    maps = np.zeros((2, 5, 5))
    maps[0, 1:3, 1:3] = 1.0  # only the first image's region is found
    # Curve: (0,0) -> t=1 (0, 1/2) -> t=0 (1, 1); PRO at FPR 0.3 = 1/2 + 0.3 · 1/2 = 0.65
    # Area to 0.3 = 0.3 · (1/2 + 0.65) / 2
    expected = 0.3 * (0.5 + 0.65) / 2 / 0.3
    assert metrics.pro_score(maps, masks) == pytest.approx(expected, abs=TOLERANCE)


# ------------------------------------------------------------------------- aggregation


def test_compute_metrics_keys() -> None:
    scores, labels = np.array([0.1, 0.9, 0.4]), np.array([0, 1, 0])
    assert list(metrics.compute_metrics(scores, labels)) == list(metrics.IMAGE_METRICS)
    maps = np.zeros((3, 4, 4))
    masks = np.zeros((3, 4, 4))
    masks[1, 0, 0] = 1
    maps[1, 0, 0] = 1.0
    result = metrics.compute_metrics(scores, labels, maps, masks)
    assert list(result) == list(metrics.METRIC_NAMES)
    assert all(type(result[key]) is float and result[key] == 1.0 for key in metrics.METRIC_NAMES)


def test_per_category_metrics_and_nan_skipping_mean() -> None:
    rng = np.random.default_rng(11)
    categories = ["screw"] * 6 + ["bottle"] * 5 + ["grid"] * 4
    categories = [categories[i] for i in rng.permutation(len(categories))]  # interleaved
    labels = np.array([i % 2 for i in range(len(categories))], dtype=bool)
    grid = [i for i, name in enumerate(categories) if name == "grid"]
    labels[grid] = False  # grid: only normal images -> NaN image metrics
    scores = rng.random(len(categories)) + labels
    masks = blob_masks(rng, (len(categories), 16, 16), 0.6) & labels[:, None, None]
    maps = rng.random(masks.shape) + 0.5 * masks

    result = metrics.per_category_metrics(categories, scores, labels, maps, masks)
    assert list(result) == ["bottle", "grid", "screw", "mean"]
    for name in ("bottle", "screw"):
        index = [i for i, c in enumerate(categories) if c == name]
        expected = metrics.compute_metrics(scores[index], labels[index], maps[index], masks[index])
        assert result[name] == expected
    assert all(math.isnan(value) for value in result["grid"].values())
    for key in metrics.METRIC_NAMES:
        pair_mean = (result["bottle"][key] + result["screw"][key]) / 2
        assert result["mean"][key] == pytest.approx(pair_mean)

    image_only = metrics.per_category_metrics(categories, scores, labels)
    assert list(image_only["mean"]) == list(metrics.IMAGE_METRICS)
    assert image_only["bottle"] == {key: result["bottle"][key] for key in metrics.IMAGE_METRICS}


def test_shape_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="same shape"):
        metrics.auroc(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        metrics.pixel_metrics(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.pro_score(np.zeros((1, 4, 4)), np.ones((1, 4, 4)), fpr_limit=0.0)
    with pytest.raises(ValueError, match="categories"):
        metrics.per_category_metrics(["a"], np.zeros(2), np.zeros(2))
