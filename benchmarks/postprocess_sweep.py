"""How much of a trained run's test accuracy is post-processing: its maps re-scored with other
smoothing and image-score rules, and its pixel metrics per defect type.

    .venv/bin/python benchmarks/postprocess_sweep.py --run runs/<run>
    .venv/bin/python benchmarks/postprocess_sweep.py --run runs/<run> --sigmas 0,4,8 --pools 0,16

The run's model predicts its test split once with smoothing off (the raw map upsampled to the
evaluation size); every variant is then recomputed from those maps: pixel metrics (P-AUROC,
PRO, P-AP) after Gaussian smoothing with each σ, image AUROC for each image-score rule (max of
the k×k average-pooled map of each σ; k = 0 is the plain max). The run's own setting is
marked. A diagnostic of where a gap comes from, on a test split: choosing a run's settings
from it would select on the test set — the defaults follow the methods' authors.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import agp_models  # noqa: E402,F401  (before timm)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from agp_models.metrics import auroc, pixel_metrics  # noqa: E402
from agp_models.postprocess import gaussian_smooth, image_scores  # noqa: E402


def raw_predictions(run_uri: str, batch_size: int):
    """The run's test predictions with smoothing off, and the run's own (σ, score σ, pool)."""
    from agp_data.splits import build_datasets, split_samples
    from agp_data.tiling import Tiling
    from agpctl import runs
    from agpctl.distributed import WorkerContext
    from agpctl.inference.scoring import predict_dataset

    run = runs.load_run(run_uri, torch.device("cpu"))
    cfg = run.cfg
    own = (cfg.model.smoothing_sigma, cfg.model.score_sigma, cfg.model.score_pool)
    run.model.cfg.smoothing_sigma, run.model.cfg.score_sigma = 0.0, None
    splits = split_samples(cfg.data, cfg.train.seed)
    _, _, test_set = build_datasets(cfg.data, splits, cfg.model.image_size, run.model.backbone.mean,
                                    run.model.backbone.std)
    predictions = predict_dataset(run.model, test_set, WorkerContext(), batch_size, cfg.train.precision,
                                  tiling=Tiling.from_config(cfg.data))
    return predictions.in_index_order(), own


def defect_type(path: str) -> str:
    """MVTec layout: test/<type>/<image>."""
    return Path(path).parent.name


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished run directory")
    parser.add_argument("--sigmas", default="0,2,4,8,12", help="Gaussian σ in pixels of the evaluation map")
    parser.add_argument("--pools", default="0,8,16,32", help="image score: max of the k×k average-pooled map")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 140)
    predictions, (own_sigma, own_score_sigma, own_pool) = raw_predictions(args.run, args.batch_size)
    raw = torch.from_numpy(predictions.maps)
    labels, masks = predictions.labels, predictions.masks
    own_score_sigma = own_sigma if own_score_sigma is None else own_score_sigma
    pools = [int(p) for p in _floats(args.pools)]

    table = Table(title=f"{args.run}: test split re-scored from raw maps (%); * = the run's setting")
    for column in ("σ", "P-AUROC", "PRO", "P-AP", *(f"I-AUROC pool {p}" for p in pools)):
        table.add_column(column, justify="right")
    smoothed_by_sigma = {}
    for sigma in _floats(args.sigmas):
        smoothed = gaussian_smooth(raw, sigma) if sigma > 0 else raw
        smoothed_by_sigma[sigma] = smoothed
        pixel = pixel_metrics(smoothed.numpy(), masks)
        cells = []
        for pool in pools:
            value = auroc(image_scores(smoothed, pool).numpy(), labels)
            mark = "*" if sigma == own_score_sigma and pool == own_pool else ""
            cells.append(f"{100 * value:.1f}{mark}")
        mark = "*" if sigma == own_sigma else ""
        table.add_row(f"{sigma:g}{mark}", f"{100 * pixel['p_auroc']:.1f}", f"{100 * pixel['pro']:.1f}",
                      f"{100 * pixel['p_ap']:.1f}", *cells)
    console.print(table)

    # Per defect type at the run's own σ: each type's images against all good ones.
    evaluation = smoothed_by_sigma.get(own_sigma)
    if evaluation is None:
        evaluation = gaussian_smooth(raw, own_sigma) if own_sigma > 0 else raw
    scores = image_scores(gaussian_smooth(raw, own_score_sigma) if own_score_sigma > 0 else raw, own_pool).numpy()
    by_type: dict[str, list[int]] = defaultdict(list)
    for index, path in enumerate(predictions.paths):
        by_type[defect_type(path)].append(index)
    good = np.asarray(by_type.get("good", []), dtype=int)
    per_type = Table(title=f"per defect type at the run's σ {own_sigma:g} (each type with the good images)")
    for column in ("type", "images", "defect px %", "I-AUROC", "P-AUROC", "PRO"):
        per_type.add_column(column, justify="left" if column == "type" else "right")
    for name in sorted(t for t in by_type if t != "good"):
        chosen = np.concatenate([good, np.asarray(by_type[name], dtype=int)])
        pixel = pixel_metrics(evaluation.numpy()[chosen], masks[chosen])
        share = 100 * masks[np.asarray(by_type[name])].mean()
        per_type.add_row(name, str(len(by_type[name])), f"{share:.1f}",
                         f"{100 * auroc(scores[chosen], labels[chosen]):.1f}",
                         f"{100 * pixel['p_auroc']:.1f}", f"{100 * pixel['pro']:.1f}")
    console.print(per_type)


if __name__ == "__main__":
    main()
