"""Accuracy of each method on a real MVTec-layout dataset, next to classic baselines.

    .venv/bin/python benchmarks/accuracy.py                              # all methods, fast recipe
    .venv/bin/python benchmarks/accuracy.py --methods agpnet --budget-minutes 30
    .venv/bin/python benchmarks/accuracy.py --recipe paper --backbone paper --root /data/mvtec_ad  # GPU

Each method trains through the application itself (``launch_training``: a one-worker Ray
Train job in local mode, per-epoch synthetic validation on held-out normal images), is
evaluated on the test split, and one table is printed: method, recipe, epochs, training wall
time (the epochs' own seconds, from the run's history.jsonl; validation and test evaluation
excluded), I-AUROC / P-AUROC / PRO / P-AP in %, and the last validation I-AUROC / P-AUROC.

Defaults: ``../shared/data/magnetic_tile`` with the ImageNet MobileNetV2 of
``../shared/weights`` (timm ``mobilenetv2_100``, TF "same" padding, mean = std = 0.5, stages
2,3 = strides 8 and 16, 256 px) — the setting the reference rows were measured in.
``--backbone paper`` keeps each method's own (paper) backbone, layers and image size instead.

``--budget-minutes M``: before each run, one epoch is timed in-process (the first epoch fills
the feature cache, so a few steps of a second epoch give the steady pace, plus one
validation), and the recipe's epochs are replaced by as many as fit M minutes of training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import agp_models  # noqa: E402,F401  (before timm)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from agpctl import runs  # noqa: E402
from agpctl.config import RunConfig, parse_value, resolve_recipe  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_ROOT = SHARED / "data" / "magnetic_tile"
DEFAULT_WEIGHTS = SHARED / "weights" / "mobilenetv2_100_imagenet.pt"
METHODS = ("agpnet", "onenip", "rlr")
# Measured on magnetic_tile/tile with the same MobileNetV2 weights, strides 8+16, 256 px, σ=4
# (../shared/data/README.md): I-AUROC, P-AUROC, PRO in %; P-AP was not reported.
REFERENCES = {
    "PatchCore (10 % coreset)": (86.6, 81.3, 75.2, None),
    "PaDiM (100 channels)": (95.0, 78.5, 72.7, None),
}
# The MobileNetV2 setting: the weights file's backbone and the layers the references used.
MOBILENET = {
    "model.backbone.name": "mobilenetv2_100", "model.backbone.kwargs": {"pad_type": "same"},
    "model.backbone.mean": [0.5, 0.5, 0.5], "model.backbone.std": [0.5, 0.5, 0.5],
    "model.layers": [2, 3], "model.image_size": 256,
}
# Per method, what the MobileNetV2 setting needs beyond the common fields: OneNIP's token grid
# at stride 16 (16×16 at 256 px) with the paper's neighbourhood ratio image_size / 32.
MOBILENET_METHOD = {
    "onenip": {"model.feature_stride": 16, "model.neighbourhood_size": 8},
}


@dataclass
class Result:
    method: str
    recipe: str
    epochs: int
    train_seconds: float
    metrics: dict[str, float]
    validation: dict[str, float] = field(default_factory=dict)
    run: str = ""


def run_config(method: str, args: argparse.Namespace, out: str, epochs: int | None = None) -> RunConfig:
    overrides: dict[str, Any] = {
        "data.dataset": "mvtec", "data.root": str(Path(args.root).resolve()), "train.recipe": args.recipe,
        "train.validation": "synthetic", "train.seed": args.seed, "storage.out": out,
        "storage.name": f"{method}-{args.recipe}", "data.loader_workers": args.loader_workers,
    }
    if args.backbone == "mobilenet":
        overrides.update(MOBILENET)
        overrides.update(MOBILENET_METHOD.get(method, {}))
        overrides["model.backbone.weights"] = str(Path(args.weights).resolve())
    if epochs is not None:
        overrides["train.epochs"] = epochs
    for item in args.set or ():
        key, _, value = item.partition("=")
        overrides[key] = parse_value(value)
    return RunConfig(method=method).with_overrides(overrides)


def epochs_for_budget(cfg: RunConfig, budget_s: float, probe_steps: int = 5) -> tuple[int, dict[str, float]]:
    """Epochs of ``cfg`` that fit ``budget_s`` seconds of training, from an in-process probe:
    one full epoch (it fills the feature and decoded-image caches), ``probe_steps`` steps of
    the next after its first step (the steady pace) and one validation; returns (epochs, the
    timings)."""
    import torch
    from torch.utils.data import DataLoader

    from agp_data.anomaly_synthesis import SynthesisConfig
    from agp_data.splits import build_datasets, split_samples
    from agp_data.training_view import TrainingView
    from agpctl.distributed import WorkerContext
    from agpctl.models import build_model, seed_everything
    from agpctl.training.steps import Trainer
    from agpctl.training.worker import build_validation_set, finalise_inference_state, validate
    from agpctl.training.progress import ProgressSender

    cfg = resolve_recipe(cfg)
    ctx = WorkerContext()
    seed_everything(cfg.train.seed)
    model = build_model(cfg, ctx.device)
    splits = split_samples(cfg.data, cfg.train.seed)
    train_set, val_set, test_set = build_datasets(cfg.data, splits, cfg.model.image_size, model.backbone.mean,
                                                  model.backbone.std)
    base = train_set
    if model.batch_extras:
        synthesis = SynthesisConfig(probability=model.pseudo_anomaly_probability, texture_root=cfg.data.texture_root)
        train_set = TrainingView(train_set, model.batch_extras, synthesis=synthesis, seed=cfg.train.seed)
    # Persistent workers as in the run itself: they keep the decoded-image cache the first
    # epoch filled; a new worker per epoch would decode again and double OneNIP's estimate.
    loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True,
                        num_workers=cfg.data.loader_workers, persistent_workers=cfg.data.loader_workers > 0,
                        generator=torch.Generator().manual_seed(0))
    trainer = Trainer(model, model, cfg, steps_per_epoch=len(loader), ctx=ctx)
    started = time.perf_counter()
    trainer.train_epoch(loader)
    first = time.perf_counter() - started
    # The steady pace: steps of the second epoch after its first (which waits for the
    # loader's prefetch at the epoch boundary, a cost the real epoch pays once, not per step).
    steps = max(1, min(probe_steps, len(loader) - 1))
    batches = iter(loader)
    trainer.train_epoch(batch for _, batch in zip(range(1), batches))
    started = time.perf_counter()
    trainer.train_epoch(batch for _, batch in zip(range(steps), batches))
    steady = (time.perf_counter() - started) / steps * len(loader)
    started = time.perf_counter()
    validation_set = build_validation_set(cfg, val_set, test_set)
    if validation_set is not None:
        finalise_inference_state(model, base, val_set, cfg, ctx, ProgressSender(None, enabled=False))
        validate(model, validation_set, cfg, ctx)
    per_validation = (time.perf_counter() - started) / max(1, cfg.train.validate_every)
    left = budget_s - first - per_validation
    epochs = 1 + max(0, math.floor(left / (steady + per_validation)))
    return epochs, {"first_epoch_s": first, "steady_epoch_s": steady, "validation_s": per_validation}


def train_and_evaluate(cfg: RunConfig, quiet: bool) -> Result:
    from agpctl.training.launch import launch_training

    outcome = launch_training(cfg, console=Console(stderr=True), quiet=quiet)
    history = runs.read_history(outcome["run"])
    validated = [record["val"] for record in history if "val" in record]
    return Result(method=cfg.method, recipe=cfg.train.recipe, epochs=int(cfg.train.epochs),
                  train_seconds=sum(record["seconds"] for record in history),
                  metrics=outcome["metrics"].get("mean", {}), validation=validated[-1] if validated else {},
                  run=outcome["run"])


def _percent(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def results_table(results: list[Result], title: str) -> Table:
    table = Table(title=title)
    for column in ("method", "recipe", "epochs", "train min", "I-AUROC", "P-AUROC", "PRO", "P-AP",
                   "val I-AUROC", "val P-AUROC"):
        table.add_column(column, justify="left" if column in ("method", "recipe") else "right")
    for r in results:
        m, v = r.metrics, r.validation
        table.add_row(r.method, r.recipe, str(r.epochs), f"{r.train_seconds / 60:.1f}",
                      *(_percent(m.get(k)) for k in ("i_auroc", "p_auroc", "pro", "p_ap")),
                      _percent(v.get("i_auroc")), _percent(v.get("p_auroc")))
    for name, values in REFERENCES.items():
        table.add_row(name, "magnetic_tile", "—", "—", *("—" if x is None else f"{x:.1f}" for x in values), "—", "—")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: agpnet, onenip, rlr")
    parser.add_argument("--recipe", choices=("fast", "paper"), default="fast")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="an MVTec-layout dataset root")
    parser.add_argument("--backbone", choices=("mobilenet", "paper"), default="mobilenet",
                        help="mobilenet: the offline ImageNet MobileNetV2 (--weights); paper: each method's own")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="MobileNetV2 state dict")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="training minutes per method: the recipe's epochs are replaced by as many as fit")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per method (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config field, for every method")
    parser.add_argument("--out", default=None, help="where the runs are written (default: a temporary folder)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if not Path(args.root).is_dir():
        parser.error(f"--root {args.root} is not a folder")
    console = Console(width=None if sys.stdout.isatty() else 160)  # a log file gets the whole table
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="agp-accuracy-") as tmp:
        out = args.out or tmp
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            epochs = args.epochs
            if args.budget_minutes is not None and epochs is None:
                epochs, timing = epochs_for_budget(run_config(method, args, out), 60 * args.budget_minutes)
                console.print(f"{method}: {args.budget_minutes:g} min → {epochs} epochs "
                              + " ".join(f"{k} {v:.1f}" for k, v in timing.items()))
            results.append(train_and_evaluate(run_config(method, args, out, epochs), args.quiet))
            console.print(f"{method}: run {results[-1].run}")
    where = f"{Path(args.root).name}, backbone {args.backbone}, recipe {args.recipe}"
    console.print(results_table(results, f"accuracy on {where} (test split, %)"))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=1, default=float))


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
