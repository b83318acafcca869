"""Speed and peak memory of :mod:`agp_models.metrics` on an MVTec-AD-sized synthetic test set.

1,725 anomaly maps of 256×256 float32 (≈113 M pixels) split into the 15 MVTec-AD categories
with their real test-set sizes; about a quarter of the images are normal, the others carry 1–3
irregular defect blobs of widely varying size. Maps are smooth background noise plus a
signal that follows each blob with a random strength (some defects are nearly invisible), so
scores are continuous float32 with tens of millions of distinct values — the hard case for
exact, tie-aware metrics.

Every measurement runs in a fresh subprocess that loads the data from a temporary ``.npy``
file, so ``ru_maxrss`` is that measurement's own peak resident memory (the input arrays,
≈0.57 GB, included; the "above input" column subtracts them). "wall s" is elapsed time,
"CPU s" the process's CPU time: on a shared machine the second is the one to compare (the
metrics are single-threaded numpy).

Run: ``.venv/bin/python benchmarks/metrics_speed.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The generator does many tiny matrix products; BLAS threads only add contention there, and
# the metrics themselves are single-threaded numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

# The MVTec-AD test split: category -> number of test images (total 1,725).
MVTEC_TEST_SIZES = {
    "bottle": 83, "cable": 150, "capsule": 132, "carpet": 117, "grid": 78,
    "hazelnut": 110, "leather": 124, "metal_nut": 115, "pill": 167, "screw": 160,
    "tile": 117, "toothbrush": 42, "transistor": 100, "wood": 79, "zipper": 151,
}  # fmt: skip
MAP_SIZE = 256


def _bilinear_matrix(low: int, high: int) -> np.ndarray:
    """(high, low) matrix that upsamples a length-`low` signal bilinearly to length `high`."""
    positions = (np.arange(high) + 0.5) * low / high - 0.5
    left = np.clip(np.floor(positions).astype(int), 0, low - 1)
    right = np.clip(left + 1, 0, low - 1)
    frac = np.clip(positions - left, 0.0, 1.0)
    matrix = np.zeros((high, low))
    matrix[np.arange(high), left] += 1.0 - frac
    matrix[np.arange(high), right] += frac
    return matrix


def _smooth_noise(rng: np.random.Generator, low: int, up: np.ndarray) -> np.ndarray:
    return up @ rng.standard_normal((low, low)) @ up.T


def _add_blob(rng: np.random.Generator, mask: np.ndarray, anomaly_map: np.ndarray) -> None:
    """An ellipse of log-uniform size 2..70 px with a wobbly outline, drawn into its bounding
    box; the map gets a smooth bump of random strength (0.05: nearly invisible) over it."""
    cy, cx = rng.uniform(0, MAP_SIZE, size=2)
    semi_a, semi_b = np.exp(rng.uniform(np.log(2.0), np.log(70.0), size=2))
    angle = rng.uniform(0, np.pi)
    reach = 1.6 * max(semi_a, semi_b)  # the bump extends to radius² 1.3, the outline to 1.45
    top, bottom = int(max(0, cy - reach)), int(min(MAP_SIZE, cy + reach + 1))
    left, right = int(max(0, cx - reach)), int(min(MAP_SIZE, cx + reach + 1))
    if top >= bottom or left >= right:
        return
    dy, dx = np.mgrid[top:bottom, left:right].astype(np.float32)
    dy -= cy
    dx -= cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / semi_a
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / semi_b
    radius2 = u * u + v * v
    theta = np.arctan2(v, u)
    wobble = sum(
        rng.uniform(0, 0.15) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    mask[top:bottom, left:right] |= radius2 < 1.0 + wobble
    strength = rng.uniform(0.05, 1.5)
    anomaly_map[top:bottom, left:right] += strength * np.clip(1.3 - radius2, 0.0, 1.0)


def make_mvtec_like(seed: int = 0) -> dict[str, np.ndarray | list[str]]:
    """Synthetic MVTec-AD-sized test set: categories, image scores/labels, maps, masks."""
    rng = np.random.default_rng(seed)
    categories = [name for name, count in MVTEC_TEST_SIZES.items() for _ in range(count)]
    n_images = len(categories)
    maps = np.empty((n_images, MAP_SIZE, MAP_SIZE), dtype=np.float32)
    masks = np.zeros((n_images, MAP_SIZE, MAP_SIZE), dtype=bool)
    labels = rng.random(n_images) >= 0.27
    up8, up32 = _bilinear_matrix(8, MAP_SIZE), _bilinear_matrix(32, MAP_SIZE)
    for i in range(n_images):
        anomaly_map = 0.25 * _smooth_noise(rng, 32, up32) + 0.1 * _smooth_noise(rng, 8, up8)
        if labels[i]:
            for _ in range(rng.integers(1, 4)):
                _add_blob(rng, masks[i], anomaly_map)
        anomaly_map += 0.02 * rng.standard_normal((MAP_SIZE, MAP_SIZE))
        maps[i] = anomaly_map
    # A defect image whose blobs all fell outside the frame is relabelled normal.
    labels &= masks.reshape(n_images, -1).any(axis=1)
    scores = maps.reshape(n_images, -1).max(axis=1) + 0.05 * rng.standard_normal(n_images)
    return {
        "categories": categories,
        "scores": scores.astype(np.float32),
        "labels": labels,
        "maps": maps,
        "masks": masks,
    }


def _measure(task: str, data_dir: Path) -> dict[str, float]:
    """Runs in the child: load the data, time one task, report seconds and peak RSS."""
    sys.path.insert(0, str(REPO_ROOT))
    from agp_models import metrics

    categories = json.loads((data_dir / "categories.json").read_text())
    scores = np.load(data_dir / "scores.npy")
    labels = np.load(data_dir / "labels.npy")
    maps = np.load(data_dir / "maps.npy")
    masks = np.load(data_dir / "masks.npy")
    rss_input_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tasks = {
        "per_category_metrics (15 cat., all six)": lambda: metrics.per_category_metrics(
            categories, scores, labels, maps, masks
        ),
        "image_metrics (all 1,725 images)": lambda: metrics.image_metrics(scores, labels),
        "pixel_metrics (all pixels pooled)": lambda: metrics.pixel_metrics(maps, masks),
        "auroc (all pixels pooled)": lambda: metrics.auroc(maps, masks),
        "average_precision (all pixels pooled)": lambda: metrics.average_precision(maps, masks),
        "f1_max (all pixels pooled)": lambda: metrics.f1_max(maps, masks),
        "pro_score (all pixels pooled)": lambda: metrics.pro_score(maps, masks),
    }
    start, start_cpu = time.perf_counter(), time.process_time()
    result = tasks[task]()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    rss_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mean = result["mean"] if isinstance(result, dict) and "mean" in result else result
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_gb": rss_peak_kb / 2**20,
        "above_input_gb": (rss_peak_kb - rss_input_kb) / 2**20,
        "result": mean,
    }


TASKS = [
    "per_category_metrics (15 cat., all six)",
    "image_metrics (all 1,725 images)",
    "pixel_metrics (all pixels pooled)",
    "auroc (all pixels pooled)",
    "average_precision (all pixels pooled)",
    "f1_max (all pixels pooled)",
    "pro_score (all pixels pooled)",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--child", nargs=2, metavar=("TASK_INDEX", "DATA_DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(TASKS[int(args.child[0])], Path(args.child[1]))))
        return

    start = time.perf_counter()
    data = make_mvtec_like(args.seed)
    maps, masks = data["maps"], data["masks"]
    print(
        f"data: {maps.shape[0]} maps {maps.shape[1]}x{maps.shape[2]} float32 "
        f"({maps.size / 1e6:.1f} M pixels, {masks.mean() * 100:.2f}% anomalous, "
        f"{int((~data['labels']).sum())} normal images), generated in "
        f"{time.perf_counter() - start:.1f} s; {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(prefix="agp_metrics_bench_") as tmp:
        data_dir = Path(tmp)
        for name in ("scores", "labels", "maps", "masks"):
            np.save(data_dir / f"{name}.npy", data[name])
        (data_dir / "categories.json").write_text(json.dumps(data["categories"]))
        del data, maps, masks

        print(f"{'task':42s} {'wall s':>7s} {'CPU s':>7s} {'peak GB':>8s} {'above input':>12s}")
        for index, task in enumerate(TASKS):
            completed = subprocess.run(
                [sys.executable, __file__, "--child", str(index), str(data_dir)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            row = json.loads(completed.stdout.strip().splitlines()[-1])
            print(
                f"{task:42s} {row['seconds']:7.2f} {row['cpu_seconds']:7.2f} {row['peak_gb']:8.2f} "
                f"{row['above_input_gb']:12.2f}"
            )
            if index == 0:
                summary = row["result"]
        means = ", ".join(f"{key} {value * 100:.1f}" for key, value in summary.items())
        print(f"mean over categories: {means}")


if __name__ == "__main__":
    main()
