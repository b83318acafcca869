"""The command-line flags of a training run; each maps to exactly one config field.

Shared by ``agpctl train`` and ``agpctl tune`` (which fixes them for every trial).
"""

from __future__ import annotations

from typing import Any, Callable

import click

from agp_data import storage
from agpctl.config import RunConfig, parse_value, resolve_recipe
from agpctl.errors import UserError


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"expected three comma-separated numbers like 0.5,0.5,0.5, got {text!r}") from None
    if len(values) != 3:
        raise UserError(f"expected three comma-separated numbers (one per RGB channel), got {text!r}")
    return values


def _key_values(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise UserError(f"--backbone-kwargs expects key=value pairs like pad_type=same, got {part!r}")
        key, value = part.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated integers like 3,6,9,12, got {text!r}") from None


def _gpus(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--gpus-per-worker: expected a number or auto, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# (flag, config path, click option kwargs, converter)
RUN_FLAGS: list[tuple[str, str, dict[str, Any], Callable[[Any], Any] | None]] = [
    ("--method", "method", {"help": "agpnet | onenip | rlr (default agpnet)"}, None),
    ("--dataset", "data.dataset", {"help": "synthetic | mvtec | visa | btad | mvtec3d | folder"}, None),
    ("--root", "data.root", {"help": "dataset folder or s3://bucket/prefix"}, None),
    ("--categories", "data.categories", {"help": "comma-separated categories (default: all)"}, _names),
    ("--normal-dir", "data.normal_dir", {"help": "folder layout: normal images"}, None),
    ("--abnormal-dir", "data.abnormal_dir", {"help": "folder layout: defective images"}, None),
    ("--mask-dir", "data.mask_dir", {"help": "folder layout: defect masks"}, None),
    ("--per-category", "data.per_category", {"is_flag": True, "default": None, "help": "one model per category (one-class setting)"}, None),
    ("--shots", "data.shots", {"type": int, "help": "few-shot: k normal images per category, expanded 32-fold"}, None),
    ("--val-fraction", "data.val_fraction", {"type": float, "help": "normal training images held out for thresholds (default 0.1)"}, None),
    ("--loader-workers", "data.loader_workers", {"type": int, "help": "DataLoader processes per training worker"}, None),
    ("--cache-dir", "data.cache_dir", {"help": "local cache for s3:// images"}, None),
    ("--decoded-cache-mb", "data.decoded_cache_mb", {"type": int, "help": "decoded training images kept in memory per loader process, MiB (default 2048; 0 = decode every epoch)"}, None),
    ("--texture-root", "data.texture_root", {"help": "DTD-style texture folder for pseudo-anomalies (default: generated textures)"}, None),
    ("--strict-data", "data.strict", {"is_flag": True, "default": None, "help": "stop on mask problems (missing masks of defect images, masks of another size) instead of warning"}, None),
    ("--tile", "data.tile", {"type": int, "metavar": "SIZE", "help": "large images: cut into SIZE-pixel tiles at native (or --tile-working-size) resolution; eval, predict and export use the same tiling"}, None),
    ("--tile-overlap", "data.tile_overlap", {"type": float, "metavar": "F", "help": "fraction neighbouring tiles overlap, in [0, 0.9) (default 0.25)"}, None),
    ("--tile-working-size", "data.tile_working_size", {"type": int, "metavar": "PX", "help": "resize images so the longer side is PX before tiling (default: native resolution)"}, None),
    ("--recipe", "train.recipe", {"type": click.Choice(["paper", "fast"]), "help": "training recipe of the method: paper (the paper's epochs, batch size, lr schedule) or fast (a short warm-up + cosine schedule; default); --epochs, --batch-size, --lr override it"}, None),
    ("--epochs", "train.epochs", {"type": int, "help": "default: the recipe's"}, None),
    ("--batch-size", "train.batch_size", {"type": int, "help": "default: the recipe's"}, None),
    ("--eval-batch-size", "train.eval_batch_size", {"type": int}, None),
    ("--precision", "train.precision", {"type": click.Choice(["auto", "fp32", "bf16"]), "help": "auto (default): bf16 where the device runs it natively (CUDA; CPUs with AMX or AVX512-BF16), else fp32"}, None),
    ("--seed", "train.seed", {"type": int}, None),
    ("--checkpoint-every", "train.checkpoint_every", {"type": int, "help": "epochs between checkpoints"}, None),
    ("--validation", "train.validation", {"type": click.Choice(["none", "synthetic", "test"]), "help": "per-epoch validation: synthetic (default: held-out normal images plus synthesised defects), none, or test (the test split: leaks it)"}, None),
    ("--validate-every", "train.validate_every", {"type": int, "help": "epochs between validations (the last epoch always validates; default 1)"}, None),
    ("--keep-checkpoints", "train.keep_checkpoints", {"type": int}, None),
    ("--tensorboard", "train.tensorboard", {"is_flag": True, "default": None, "help": "also write TensorBoard event files to <run>/tensorboard/ (pip install 'agp[tensorboard]' to view them)"}, None),
    ("--mlflow", "train.mlflow", {"metavar": "URI", "help": "also log params, per-epoch metrics and the test table to this MLflow tracking server"}, None),
    ("--lr", "model.lr", {"type": float, "help": "learning rate (default: the recipe's, scaled with the batch size where the method's authors scale it)"}, None),
    ("--image-size", "model.image_size", {"type": int}, None),
    ("--layers", "model.layers", {"help": "ViT blocks (1-indexed) or CNN stages, e.g. 3,6,9,12"}, _ints),
    ("--backbone", "model.backbone.name", {"help": "any timm model name"}, None),
    ("--pretrained", "model.backbone.pretrained", {"type": click.Choice(["auto", "yes", "no"]), "help": "auto: hub weights when reachable, else random init with a warning"}, None),
    ("--weights", "model.backbone.weights", {"help": "backbone state dict: local path or s3://"}, None),
    ("--backbone-kwargs", "model.backbone.kwargs", {"help": "timm.create_model kwargs, e.g. pad_type=same"}, _key_values),
    ("--mean", "model.backbone.mean", {"help": "normalisation mean, e.g. 0.5,0.5,0.5"}, _floats),
    ("--std", "model.backbone.std", {"help": "normalisation std"}, _floats),
    ("--workers", "cluster.workers", {"type": int, "help": "Ray Train workers (DDP)"}, None),
    ("--gpus-per-worker", "cluster.gpus_per_worker", {"help": "GPUs per training worker, or auto (default): 1 when the Ray cluster has GPUs, else 0"}, _gpus),
    ("--cpus-per-worker", "cluster.cpus_per_worker", {"type": float, "help": "CPUs reserved per worker, also its torch threads (default: the embedded Ray's CPUs shared by the workers; 1 on a remote cluster)"}, None),
    ("--max-failures", "cluster.max_failures", {"type": int, "help": "worker failures to recover from (restart from the last checkpoint)"}, None),
    ("--address", "cluster.address", {"help": "ray://host:10001 or http://host:8265 (default: embedded local Ray)"}, None),
    ("--dashboard", "cluster.dashboard", {"is_flag": True, "default": None, "help": "start the embedded Ray's dashboard (off by default: it slows start-up); its address is printed"}, None),
    ("--worker-actor", "cluster.worker_actor", {"is_flag": True, "default": None, "help": "train a one-worker local run (or each one-worker sweep trial) in a Ray Train worker actor, as multi-worker runs do (default: in this process / in the trial, which starts in seconds)"}, None),
    ("--out", "storage.out", {"help": "where runs are written: folder or s3://bucket/prefix (default runs)"}, None),
    ("--name", "storage.name", {"help": "run name (default <method>-<dataset>-<time>)"}, None),
    ("--s3-endpoint", "storage.s3_endpoint", {"help": "S3-compatible endpoint URL (else AWS_ENDPOINT_URL)"}, None),
]


def _param_name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def run_options(func):
    """Decorates a click command with every run flag plus --config and --set."""
    for flag, _, kwargs, _ in reversed(RUN_FLAGS):
        func = click.option(flag, _param_name(flag), **{"default": None, **kwargs})(func)
    func = click.option("--set", "set_values", multiple=True, metavar="KEY=VALUE",
                        help="any config field, e.g. --set model.alpha_max=0.5 (YAML values)")(func)
    func = click.option("--config", "config_path", help="run.yaml to start from (flags override it)")(func)
    return func


def config_from_options(options: dict[str, Any]) -> RunConfig:
    """defaults < --config YAML < --set < explicit flags, then the recipe fills what is left unset."""
    path = options.get("config_path")
    if path:
        storage.configure_s3(options.get("s3_endpoint"))  # --config may itself be on that endpoint
        if not storage.exists(path):
            raise UserError(f"config file {path} not found")
        cfg = RunConfig.from_yaml(storage.read_text(path), source=path)
    else:
        cfg = RunConfig(method=options.get("method") or "agpnet")
    overrides: dict[str, Any] = {}
    if options.get("method"):
        overrides["method"] = options["method"]
    for item in options.get("set_values") or ():
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_value(value.strip())
    for flag, config_path, _, convert in RUN_FLAGS:
        value = options.get(_param_name(flag))
        if value is None or config_path == "method":
            continue
        overrides[config_path] = convert(value) if convert else value
    if overrides:
        cfg = cfg.with_overrides(overrides)
    return resolve_recipe(cfg)
