"""Evaluation metrics: I-AUROC, I-AP, I-F1max, P-AUROC, P-AP, P-F1max and PRO.

All metrics are exact (no thresholds sampled, ties handled exactly) and computed from one
shared pass over the scores:

* AUROC equals ``sklearn.metrics.roc_auc_score``: the trapezoid over the tie-collapsed ROC
  points, computed here as the (tie-corrected) Mann–Whitney statistic in integer arithmetic.
* AP equals ``sklearn.metrics.average_precision_score``: Σ (R_k − R_{k−1}) · P_k over the
  distinct score values, highest first.
* F1-max is the largest 2PR/(P+R) over all distinct score thresholds (``score >= t``).
* PRO follows the MVTec-AD reference exactly (see :func:`pro_score`).

Conventions
-----------
* Inputs: numpy arrays, sequences or torch tensors (moved to the CPU and detached).
* Scores: higher = more anomalous. Float32 scores stay float32 (never rounded to another
  precision, so ties and order are exactly those of the caller's array); float16 is widened
  to float32, integer and bool scores are read as float64 (both exact). NaN scores raise
  ``ValueError``; ±inf are allowed.
* Labels and masks are binarised with ``> 0``. Test images without a mask are all-zero masks.
* Results are Python floats, fractions in [0, 1] (callers print ×100 with one decimal).
* **Undefined metrics are NaN, never an error**: a set with only normal or only anomalous
  samples (images for the I- metrics, pixels for the P- metrics) gives NaN for AUROC, AP and
  F1-max; PRO is NaN without any anomalous region or without any normal pixel. Means over
  categories skip NaN values (and are NaN only when every category is NaN).

How it stays fast on ~10⁸ pixels
--------------------------------
Only the anomalous pixels (a few percent) are sorted in full. Every metric needs, for each
distinct anomalous score ``v``, how many normal pixels score ``< v`` and ``== v``. Normal
pixels are counted into value buckets of uniform width (a monotone function of the score, so
equal scores always share a bucket and a lower bucket always means a lower score); only the
normal pixels that share a bucket with some anomalous pixel are extracted and sorted, the rest
are known exactly from the bucket histogram. Any bucket count gives bit-identical results
(one bucket = sorting all normal pixels, the fallback for ±inf scores). Work is done in chunks
of whole images. Measured (``benchmarks/metrics_speed.py``, 1,725 MVTec-sized 256×256 maps):
about 3 CPU-seconds and 0.1 GB beyond the inputs for all six metrics of all 15 categories;
about 6 CPU-seconds and 0.5 GB for the pixel metrics of all 113 M pixels pooled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "IMAGE_METRICS",
    "PIXEL_METRICS",
    "METRIC_NAMES",
    "auroc",
    "average_precision",
    "f1_max",
    "pro_score",
    "image_curves",
    "pixel_curves",
    "image_metrics",
    "pixel_metrics",
    "compute_metrics",
    "per_category_metrics",
]

IMAGE_METRICS = ("i_auroc", "i_ap", "i_f1max")
PIXEL_METRICS = ("p_auroc", "p_ap", "p_f1max", "pro")
METRIC_NAMES = IMAGE_METRICS + PIXEL_METRICS

# Pixels processed per chunk (whole images at a time): small enough for cache-friendly
# temporaries, large enough that per-chunk overhead (one bucket histogram) is negligible.
_CHUNK_PIXELS = 1 << 21
# Number of value buckets for the normal-pixel histogram (see module docstring). More buckets
# means fewer normal pixels to sort but a larger histogram; capped relative to the data size.
_MAX_BUCKETS = 1 << 23
_PIXELS_PER_BUCKET = 4

# 8-connectivity inside each image and no connection across images of the (N, H, W) stack.
_EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_PER_IMAGE[1] = True


@dataclass
class _RankStats:
    """Counts at every distinct positive score value, in decreasing order of the value.

    ``values[k]`` is the k-th highest distinct score among positives; ``pos_ge[k]``,
    ``neg_ge[k]`` and ``neg_gt[k]`` count positives ``>= values[k]``, negatives ``>=`` and
    negatives ``>`` it. ``region_weight_ge[k]`` (PRO only) is Σ 1/|r| over the positive pixels
    scoring ``>= values[k]``, r being the pixel's connected ground-truth region.
    """

    n_pos: int
    n_neg: int
    values: np.ndarray
    pos_ge: np.ndarray
    neg_ge: np.ndarray
    neg_gt: np.ndarray
    n_regions: int = 0
    region_weight_ge: np.ndarray | None = None


def _to_numpy(values: object) -> np.ndarray:
    # torch tensors (any device, with or without grad) by duck typing: no torch import here.
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _as_scores(scores: object, name: str) -> np.ndarray:
    array = _to_numpy(scores)
    if array.dtype.kind == "f":
        return array.astype(np.float32) if array.dtype.itemsize < 4 else array
    if array.dtype.kind in "biu":
        return array.astype(np.float64)
    raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")


def _as_labels(labels: object) -> np.ndarray:
    array = _to_numpy(labels)
    return array if array.dtype == bool else array > 0


def _bucket_function(
    low: float, high: float, dtype: np.dtype, n_buckets: int
) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """A monotone non-decreasing map from scores in [low, high] to bucket ids 0..n_buckets-1.

    ``(x - low) * scale`` is evaluated in the scores' own dtype; IEEE rounding is monotone, so
    x <= y implies bucket(x) <= bucket(y) and equal scores share a bucket. That is all the
    exactness argument needs, the bucket widths do not have to be exact. Ranges that would
    overflow (or contain ±inf) fall back to a single bucket, i.e. a plain sort.
    """
    one_bucket = (lambda x: np.zeros(x.shape, dtype=np.intp)), 1
    if n_buckets <= 1 or not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return one_bucket
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        width = np.subtract(high, low, dtype=dtype)
        scale = dtype.type(n_buckets) / width
        top = np.multiply(width, scale, dtype=dtype)
    if not (np.isfinite(width) and np.isfinite(scale) and scale > 0 and np.isfinite(top)):
        return one_bucket
    low_value, last = dtype.type(low), n_buckets - 1

    def bucket(x: np.ndarray) -> np.ndarray:
        shifted = np.subtract(x, low_value, dtype=dtype)
        shifted *= scale
        ids = shifted.astype(np.intp)
        np.minimum(ids, last, out=ids)
        return ids

    return bucket, n_buckets


def _rank_stats(scores: np.ndarray, positive: np.ndarray, with_regions: bool = False) -> _RankStats:
    """The shared pass behind every metric. scores/positive: same shape, first axis = samples."""
    n_rows = scores.shape[0]
    if scores.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return _RankStats(0, 0, scores.reshape(-1), empty, empty, empty)
    row_size = int(np.prod(scores.shape[1:], dtype=np.int64)) if scores.ndim > 1 else 1
    flat_scores = scores.reshape(n_rows, row_size)
    flat_positive = positive.reshape(n_rows, row_size)
    rows_per_chunk = max(1, _CHUNK_PIXELS // max(row_size, 1))
    chunks = [slice(start, start + rows_per_chunk) for start in range(0, n_rows, rows_per_chunk)]

    # Pass 1: positive scores (and their region ids), score range.
    pos_parts: list[np.ndarray] = []
    region_parts: list[np.ndarray] = []
    n_regions = 0
    low, high = math.inf, -math.inf
    for chunk in chunks:
        chunk_scores, chunk_positive = flat_scores[chunk], flat_positive[chunk]
        chunk_low, chunk_high = chunk_scores.min(), chunk_scores.max()
        if np.isnan(chunk_low) or np.isnan(chunk_high):
            raise ValueError("scores contain NaN: check the model's output (±inf is allowed)")
        low, high = min(low, float(chunk_low)), max(high, float(chunk_high))
        pos_parts.append(chunk_scores[chunk_positive])
        if with_regions:
            labelled, count = ndimage.label(
                positive[chunk], structure=_EIGHT_CONNECTED_PER_IMAGE, output=np.int32
            )
            ids = labelled.reshape(-1, row_size)[chunk_positive]
            ids += n_regions - 1  # 1-based per chunk -> 0-based over the whole set
            region_parts.append(ids)
            n_regions += count
    pos = np.concatenate(pos_parts)
    n_pos, n_neg = int(pos.size), int(scores.size - pos.size)
    if n_pos == 0 or n_neg == 0:
        empty = np.zeros(0, dtype=np.int64)
        return _RankStats(n_pos, n_neg, pos[:0], empty, empty, empty, n_regions, None)

    # Sort positives; the distinct values and how many positives reach each.
    region_weights = None
    if with_regions:
        order = np.argsort(pos, kind="stable")
        pos_sorted = pos[order]
        region_ids = np.concatenate(region_parts)[order]
        del order
        region_sizes = np.bincount(region_ids, minlength=n_regions)
        region_weights = (1.0 / region_sizes)[region_ids]
        del region_ids
    else:
        pos_sorted = np.sort(pos)
    del pos, pos_parts, region_parts
    is_run_start = np.empty(n_pos, dtype=bool)
    is_run_start[0] = True
    np.not_equal(pos_sorted[1:], pos_sorted[:-1], out=is_run_start[1:])
    run_starts = np.flatnonzero(is_run_start)
    del is_run_start
    values = pos_sorted[run_starts]  # ascending, distinct

    # Pass 2: bucket histogram of all pixels; collect the negatives that share a bucket with
    # some positive value — only those need an exact comparison.
    n_buckets = int(min(_MAX_BUCKETS, max(1024, scores.size // _PIXELS_PER_BUCKET)))
    bucket, n_buckets = _bucket_function(low, high, scores.dtype, n_buckets)
    value_buckets = bucket(values)
    is_pos_bucket = np.zeros(n_buckets, dtype=bool)
    is_pos_bucket[value_buckets] = True
    histogram = np.zeros(n_buckets, dtype=np.int64)
    candidate_parts: list[np.ndarray] = []
    for chunk in chunks:
        chunk_scores, chunk_positive = flat_scores[chunk], flat_positive[chunk]
        ids = bucket(chunk_scores.reshape(-1))
        histogram += np.bincount(ids, minlength=n_buckets)
        is_candidate = is_pos_bucket[ids]
        del ids
        # candidate and not positive  ==  candidate > positive  for booleans
        np.greater(is_candidate, chunk_positive.reshape(-1), out=is_candidate)
        candidate_parts.append(chunk_scores.reshape(-1)[is_candidate])
    candidates = np.concatenate(candidate_parts)
    del candidate_parts
    candidates.sort()
    # Every positive lies in a positive bucket, so after zeroing those the histogram counts
    # exactly the negatives outside positive buckets.
    histogram[is_pos_bucket] = 0
    np.cumsum(histogram, out=histogram)
    # Negatives in non-positive buckets strictly below each value's bucket (inclusive cumsum
    # is fine: the value's own bucket holds no such negatives).
    outside_below = histogram[value_buckets]
    neg_lt = outside_below + np.searchsorted(candidates, values, side="left")
    neg_le = outside_below + np.searchsorted(candidates, values, side="right")
    del candidates, histogram

    region_weight_ge = None
    if with_regions:
        # Cumulative sum from the highest score down, as the reference does.
        cumulative = np.cumsum(region_weights[::-1])
        region_weight_ge = cumulative[n_pos - 1 - run_starts][::-1]
    return _RankStats(
        n_pos=n_pos,
        n_neg=n_neg,
        values=values[::-1],
        pos_ge=(n_pos - run_starts)[::-1],
        neg_ge=(n_neg - neg_lt)[::-1],
        neg_gt=(n_neg - neg_le)[::-1],
        n_regions=n_regions,
        region_weight_ge=region_weight_ge,
    )


def _undefined(stats: _RankStats) -> bool:
    return stats.n_pos == 0 or stats.n_neg == 0


def _auroc(stats: _RankStats) -> float:
    if _undefined(stats):
        return math.nan
    pos_count = np.diff(stats.pos_ge, prepend=0)  # positives exactly at each value
    neg_lt = stats.n_neg - stats.neg_ge
    neg_eq = stats.neg_ge - stats.neg_gt
    # Mann–Whitney: each positive beats the negatives below it and ties half of the equal ones.
    denominator = 2 * stats.n_pos * stats.n_neg
    if denominator < 2**62:  # exact in int64
        numerator = int(np.sum(pos_count * (2 * neg_lt + neg_eq)))
        return numerator / denominator
    return float(np.sum(pos_count * (2.0 * neg_lt + neg_eq)) / denominator)


def _average_precision(stats: _RankStats) -> float:
    if _undefined(stats):
        return math.nan
    pos_count = np.diff(stats.pos_ge, prepend=0)
    precision = stats.pos_ge / (stats.pos_ge + stats.neg_ge)
    return float(np.sum(pos_count / stats.n_pos * precision))


def _f1_max(stats: _RankStats) -> float:
    # Between two positive values the threshold only adds negatives, which lowers F1, so the
    # maximum over all thresholds is reached at a threshold equal to some positive value.
    if _undefined(stats):
        return math.nan
    f1 = 2.0 * stats.pos_ge / (stats.pos_ge + stats.neg_ge + stats.n_pos)
    return float(f1.max())


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) for x <= x_max; y interpolated linearly at x_max if x_max
    is not itself a point (as the MVTec-AD reference ``trapezoid_area``). x non-decreasing."""
    n_inside = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:n_inside], y[:n_inside]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * (xs[1:] - xs[:-1])))
    if xs[-1] < x_max and n_inside < x.size:
        x0, x1, y0, y1 = x[n_inside - 1], x[n_inside], y[n_inside - 1], y[n_inside]
        y_at_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y_at_max + y0) * (x_max - x0)
    return area


def _pro(stats: _RankStats, fpr_limit: float) -> float:
    if stats.n_regions == 0 or stats.n_neg == 0:
        return math.nan
    fpr, pro = _pro_points(stats)
    return float(_area_up_to(fpr, pro, fpr_limit) / fpr_limit)


def _pro_points(stats: _RankStats) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) points of the whole reference PRO curve, FPR non-decreasing."""
    # The reference curve has one point per distinct score value (highest first). Between two
    # positive values only negatives are added: horizontal segments at constant PRO. At a
    # positive value v the curve goes from (FPR(>v), PRO(>v)) to (FPR(>=v), PRO(>=v)); so two
    # points per positive value reproduce the reference curve exactly (plus collinear points).
    overlap = np.minimum(stats.region_weight_ge / stats.n_regions, 1.0)
    m = overlap.size
    fpr = np.empty(2 * m + 3)
    pro = np.empty(2 * m + 3)
    fpr[0] = pro[0] = 0.0
    fpr[1 : 2 * m + 1 : 2] = stats.neg_gt / stats.n_neg
    fpr[2 : 2 * m + 2 : 2] = stats.neg_ge / stats.n_neg
    pro[1] = 0.0
    pro[3 : 2 * m + 1 : 2] = overlap[:-1]
    pro[2 : 2 * m + 2 : 2] = overlap
    fpr[2 * m + 1], pro[2 * m + 1] = 1.0, overlap[-1]  # remaining negatives below all positives
    fpr[2 * m + 2], pro[2 * m + 2] = 1.0, 1.0  # the reference's appended (1, 1)
    return fpr, pro


def _roc_points(stats: _RankStats) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the exact ROC curve: as for PRO, two points per distinct positive value
    (just above it, then at it) from (0, 0) to (1, 1); its trapezoid area is :func:`_auroc`."""
    neg = np.stack([stats.neg_gt, stats.neg_ge], 1).reshape(-1)
    pos_above = np.concatenate([[0], stats.pos_ge[:-1]])
    pos = np.stack([pos_above, stats.pos_ge], 1).reshape(-1)
    fpr = np.concatenate([[0.0], neg / stats.n_neg, [1.0]])
    tpr = np.concatenate([[0.0], pos / stats.n_pos, [1.0]])
    return fpr, tpr


def _pr_points(stats: _RankStats) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at each distinct positive value, recall increasing, after a first
    (0, 1) point as sklearn's ``precision_recall_curve``; AP is the step sum Σ ΔR·P of these."""
    recall = np.concatenate([[0.0], stats.pos_ge / stats.n_pos])
    precision = np.concatenate([[1.0], stats.pos_ge / (stats.pos_ge + stats.neg_ge)])
    return recall, precision


def _points_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> tuple[np.ndarray, np.ndarray]:
    """The points with x <= x_max, plus the point interpolated at x_max (as
    :func:`_area_up_to` interpolates)."""
    n_inside = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:n_inside], y[:n_inside]
    if xs[-1] < x_max and n_inside < x.size:
        x0, x1, y0, y1 = x[n_inside - 1], x[n_inside], y[n_inside - 1], y[n_inside]
        xs, ys = np.append(xs, x_max), np.append(ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0))
    return xs, ys


def _check_fpr_limit(fpr_limit: float) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return float(fpr_limit)


def _binary_inputs(scores: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    score_array, label_array = _as_scores(scores, "scores"), _as_labels(labels)
    if score_array.shape != label_array.shape:
        raise ValueError(
            f"scores and labels must have the same shape, got {score_array.shape} and "
            f"{label_array.shape}"
        )
    if score_array.ndim == 0:
        score_array, label_array = score_array.reshape(1), label_array.reshape(1)
    return score_array, label_array


def _pixel_inputs(maps: object, masks: object) -> tuple[np.ndarray, np.ndarray]:
    map_array, mask_array = _as_scores(maps, "maps"), _as_labels(masks)
    if map_array.ndim == 4 and map_array.shape[1] == 1:
        map_array = map_array[:, 0]
    if mask_array.ndim == 4 and mask_array.shape[1] == 1:
        mask_array = mask_array[:, 0]
    if map_array.ndim == 2:  # a single map
        map_array, mask_array = map_array[None], mask_array[None]
    if map_array.ndim != 3 or map_array.shape != mask_array.shape:
        raise ValueError(
            f"maps and masks must both be (N, H, W), got {map_array.shape} and {mask_array.shape}"
        )
    return map_array, mask_array


def auroc(scores: object, labels: object) -> float:
    """Area under the ROC curve (= sklearn ``roc_auc_score``); NaN if only one class."""
    return _auroc(_rank_stats(*_binary_inputs(scores, labels)))


def average_precision(scores: object, labels: object) -> float:
    """Average precision (= sklearn ``average_precision_score``); NaN if only one class."""
    return _average_precision(_rank_stats(*_binary_inputs(scores, labels)))


def f1_max(scores: object, labels: object) -> float:
    """Largest F1 over all thresholds ``score >= t`` (tie-collapsed); NaN if only one class."""
    return _f1_max(_rank_stats(*_binary_inputs(scores, labels)))


def pro_score(maps: object, masks: object, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit``, as the MVTec-AD
    reference computes it.

    1. 8-connected components of every mask (per image) are the regions; all other pixels
       are OK pixels.
    2. Each OK pixel weighs 1/#OK on the FPR axis, each pixel of region r weighs
       1/(|r|·#regions) on the PRO axis.
    3. Over all scores sorted descending, both weights are summed cumulatively; the last
       point of every run of tied scores is kept; values are clipped to <= 1 and (0, 0) and
       (1, 1) are added.
    4. The trapezoid area for FPR <= fpr_limit, with the curve interpolated linearly at
       exactly fpr_limit, is divided by fpr_limit.

    maps: (N, H, W) scores; masks: (N, H, W), binarised ``> 0``. NaN without any region or
    without any OK pixel.
    """
    limit = _check_fpr_limit(fpr_limit)
    return _pro(_rank_stats(*_pixel_inputs(maps, masks), with_regions=True), limit)


def image_curves(scores: object, labels: object) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The curves behind the image metrics, from the same exact pass: ``"roc"`` (FPR, TPR),
    whose trapezoid area is :func:`auroc`, and ``"pr"`` (recall, precision), whose step sum
    is :func:`average_precision`. Empty arrays where the metric is undefined (one class)."""
    return _curves(_rank_stats(*_binary_inputs(scores, labels)), None)


def pixel_curves(
    maps: object, masks: object, fpr_limit: float = 0.3
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``"roc"`` and ``"pr"`` over all pixels, as :func:`image_curves`, and ``"pro"``: the
    (FPR, PRO) points of :func:`pro_score`'s curve up to ``fpr_limit`` (the last point
    interpolated at exactly ``fpr_limit``), whose trapezoid area / ``fpr_limit`` is the PRO."""
    limit = _check_fpr_limit(fpr_limit)
    return _curves(_rank_stats(*_pixel_inputs(maps, masks), with_regions=True), limit)


def _curves(stats: _RankStats, pro_limit: float | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    empty = (np.zeros(0), np.zeros(0))
    if _undefined(stats):
        curves = {"roc": empty, "pr": empty}
    else:
        curves = {"roc": _roc_points(stats), "pr": _pr_points(stats)}
    if pro_limit is not None:
        defined = stats.n_regions > 0 and stats.n_neg > 0
        curves["pro"] = _points_up_to(*_pro_points(stats), pro_limit) if defined else empty
    return curves


def image_metrics(scores: object, labels: object) -> dict[str, float]:
    """``i_auroc``, ``i_ap``, ``i_f1max`` of image scores (N,) against labels (N,)."""
    stats = _rank_stats(*_binary_inputs(scores, labels))
    return {"i_auroc": _auroc(stats), "i_ap": _average_precision(stats), "i_f1max": _f1_max(stats)}


def pixel_metrics(maps: object, masks: object, fpr_limit: float = 0.3) -> dict[str, float]:
    """``p_auroc``, ``p_ap``, ``p_f1max`` over all pixels and ``pro``, from one shared pass.

    maps: (N, H, W) float scores; masks: (N, H, W) bool or 0/1 (binarised ``> 0``).
    """
    limit = _check_fpr_limit(fpr_limit)
    stats = _rank_stats(*_pixel_inputs(maps, masks), with_regions=True)
    return {
        "p_auroc": _auroc(stats),
        "p_ap": _average_precision(stats),
        "p_f1max": _f1_max(stats),
        "pro": _pro(stats, limit),
    }


def compute_metrics(
    scores: object,
    labels: object,
    maps: object | None = None,
    masks: object | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All image metrics, plus the pixel metrics when ``maps`` is given (then ``masks`` too)."""
    result = image_metrics(scores, labels)
    if maps is not None:
        if masks is None:
            raise ValueError("pixel metrics need masks: pass all-zero masks for normal images")
        result.update(pixel_metrics(maps, masks, fpr_limit))
    return result


def per_category_metrics(
    categories: Sequence[str],
    scores: object,
    labels: object,
    maps: object | None = None,
    masks: object | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, dict[str, float]]:
    """:func:`compute_metrics` for each category (sorted by name) plus ``"mean"``.

    ``categories[i]`` names the category of sample i. The mean is taken per metric over the
    categories, skipping NaN (a category whose test set has a single class); it is NaN only
    if every category is. Values are fractions in [0, 1].
    """
    category_array = np.asarray(list(categories), dtype=object)
    score_array, label_array = _binary_inputs(scores, labels)
    if category_array.shape != score_array.shape:
        raise ValueError(
            f"categories has {category_array.size} entries but there are {score_array.size} scores"
        )
    if maps is not None:
        if masks is None:
            raise ValueError("pixel metrics need masks: pass all-zero masks for normal images")
        map_array, mask_array = _pixel_inputs(maps, masks)
        if map_array.shape[0] != score_array.size:
            raise ValueError(
                f"{map_array.shape[0]} maps for {score_array.size} scores; they must match"
            )
    result: dict[str, dict[str, float]] = {}
    for name in sorted(set(category_array.tolist())):
        indices = np.flatnonzero(category_array == name)
        # A contiguous block is a view (no copy of the maps); otherwise gather.
        contiguous = indices[-1] - indices[0] + 1 == indices.size
        select = slice(int(indices[0]), int(indices[-1]) + 1) if contiguous else indices
        result[name] = compute_metrics(
            score_array[select],
            label_array[select],
            None if maps is None else map_array[select],
            None if maps is None else mask_array[select],
            fpr_limit,
        )
    names = [key for key in METRIC_NAMES if result and key in next(iter(result.values()))]
    mean: dict[str, float] = {}
    for key in names:
        values = np.array([metrics[key] for metrics in result.values()], dtype=np.float64)
        finite = values[~np.isnan(values)]
        mean[key] = float(finite.mean()) if finite.size else math.nan
    result["mean"] = mean
    return result
