"""Run configuration: plain dataclasses with a YAML round trip.

Precedence: dataclass defaults < ``--config run.yaml`` < command-line flags. The resolved
config is saved with every run as ``config.yaml`` and is enough to rebuild the model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from agp_data.config import DataConfig, SyntheticConfig
from agp_models.base import MethodConfig
from agp_models.recipes import resolve_recipe as resolve_method_recipe
from agp_models.registry import method_class, method_names
from agpctl.errors import UserError

__all__ = ["ClusterConfig", "DataConfig", "RunConfig", "StorageConfig", "SyntheticConfig", "TrainConfig",
           "auto_gpus_per_worker", "check_choices", "coerce_value", "method_config_class", "parse_value",
           "requested_gpus", "resolve_recipe"]

# auto: bf16 autocast where the device runs it natively (CUDA with bf16; CPUs with AMX or
# AVX512-BF16), else fp32 (agpctl.models.resolve_precision).
Precision = Literal["auto", "fp32", "bf16"]
# none | synthetic (held-out normals + pseudo anomalies on them) | test (the test split:
# selecting on it leaks the test set; sweeps warn about it).
ValidationMode = Literal["none", "synthetic", "test"]


# paper: the paper's epochs, batch size and lr schedule; fast: a short schedule for a fixed
# budget. Each method owns its recipes (agp_models.recipes); resolve_recipe fills them in.
RecipeName = Literal["paper", "fast"]


@dataclass(kw_only=True)
class TrainConfig:
    recipe: RecipeName = "fast"
    epochs: int | None = None  # None: the recipe's (resolve_recipe records the value used)
    batch_size: int | None = None  # None: the recipe's
    eval_batch_size: int = 16
    precision: Precision = "auto"
    seed: int = 0
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch is always saved)
    keep_checkpoints: int = 2
    threshold_quantile: float = 0.99  # auto threshold = this quantile of held-out normal scores
    # Per-epoch validation, reported as val/i_auroc, val/p_auroc, val/pro, val/objective.
    validation: ValidationMode = "synthetic"
    validate_every: int = 1  # epochs between validations (the last epoch always validates)
    # Experiment tracking besides the run's history.jsonl (agpctl.training.tracking; rank 0).
    tensorboard: bool = False  # TensorBoard event files in <run>/tensorboard/
    mlflow: str | None = None  # an MLflow tracking URI, e.g. http://mlflow:5000


@dataclass(kw_only=True)
class ClusterConfig:
    address: str | None = None  # None: embedded local Ray; ray://host:10001; http://host:8265
    workers: int = 1
    # auto: 1 per worker when the (local or remote) Ray cluster has GPUs, else 0;
    # resolved against the live cluster (auto_gpus_per_worker), the saved config stays auto.
    gpus_per_worker: float | Literal["auto"] = "auto"
    # None (auto): the embedded local Ray shares the machine's CPUs among the workers; a
    # remote cluster reserves 1 per worker. Torch uses as many threads as CPUs reserved.
    cpus_per_worker: float | None = None
    max_failures: int = 0
    # The embedded Ray's dashboard (http://127.0.0.1:8265 while the command runs): off by
    # default, its processes cost seconds of start-up; remote clusters keep their own.
    dashboard: bool = False
    # A one-worker run on the embedded Ray trains in the agpctl process itself (Ray Train's
    # local mode): no Ray instance, controller or worker actor to start, 4 s instead of ~16 s
    # before the first step on 2 cores. True: in a Ray Train worker actor, as multi-worker
    # runs do (also implied by --dashboard and --max-failures, which need the worker group).
    worker_actor: bool = False


@dataclass(kw_only=True)
class StorageConfig:
    out: str = "runs"  # local dir or s3://bucket/prefix (Ray Train storage_path)
    name: str | None = None  # run name; default <method>-<dataset>-<timestamp>
    s3_endpoint: str | None = None  # else AWS_ENDPOINT_URL; credentials never go here


def _without_retired_fields(model_cls: type[MethodConfig], model_raw: Any, source: str) -> Any:
    """A saved or written config may hold fields an older version had: they are dropped with
    a one-line warning so the run still loads. Given now (``source`` "command line", i.e.
    ``--set``), such a field is a mistake like any unknown one."""
    if not isinstance(model_raw, dict):
        return model_raw  # _build says what is wrong with it
    retired = sorted(set(model_raw) & set(model_cls.retired_fields))
    if not retired:
        return model_raw
    if source == "command line":
        name = retired[0]
        raise UserError(f"model.{name} is no longer a field: {model_cls.retired_fields[name]}")
    from agpctl.console import print_warning  # deferred: configs are also read where nothing prints

    for name in retired:
        print_warning(f"{source}: model.{name} is ignored: {model_cls.retired_fields[name]}")
    return {k: v for k, v in model_raw.items() if k not in retired}


@dataclass(kw_only=True)
class RunConfig:
    method: str = "agpnet"
    model: MethodConfig | None = None  # the method's own config class; None = its defaults
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = method_config_class(self.method)()

    # -- YAML round trip ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "RunConfig":
        if not isinstance(raw, dict):
            raise UserError(f"{source}: expected a mapping at the top level")
        method = raw.get("method", "agpnet")
        model_cls = method_config_class(method)
        values = dict(raw)
        model_raw = values.pop("model", None) or {}
        model_raw = _without_retired_fields(model_cls, model_raw, source)
        cfg = _build(cls, {k: v for k, v in values.items()}, source, skip={"model"})
        cfg.model = _build(model_cls, model_raw, f"{source}: model")
        return cfg

    @classmethod
    def from_yaml(cls, text: str, source: str = "config") -> "RunConfig":
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{source}: not valid YAML ({exc.__class__.__name__}); fix the syntax") from None
        return cls.from_dict(raw, source)

    def with_overrides(self, overrides: dict[str, Any]) -> "RunConfig":
        """Apply dotted-path overrides (``train.epochs``, ``model.backbone.name``)."""
        raw = self.to_dict()
        for path, value in overrides.items():
            if path == "method" and value != raw["method"]:
                # a different method has different fields: keep only the shared ones
                shared = {f.name for f in dataclasses.fields(MethodConfig)}
                raw["model"] = {k: v for k, v in raw["model"].items() if k in shared}
            _set_path(raw, path, value)
        return RunConfig.from_dict(raw, "command line")


def auto_gpus_per_worker(cluster_gpus: float) -> float:
    """``gpus_per_worker: auto`` on a cluster with ``cluster_gpus`` GPUs in all."""
    return 1.0 if cluster_gpus >= 1 else 0.0


def requested_gpus(cluster: ClusterConfig, cluster_gpus: float) -> float:
    """GPUs per worker, ``auto`` resolved against ``cluster_gpus``."""
    value = cluster.gpus_per_worker
    return auto_gpus_per_worker(cluster_gpus) if value == "auto" else float(value)


def resolve_recipe(cfg: RunConfig) -> RunConfig:
    """Fills what ``cfg`` leaves unset (epochs, batch size, lr, lr schedule) from its method's
    recipe ``train.recipe``, in place, so that the saved config records every value a run
    used; values already set (flags, YAML, a resumed run's config) stay. Idempotent."""
    try:
        epochs, batch_size = resolve_method_recipe(cfg.model, cfg.train.recipe, cfg.train.epochs,
                                                   cfg.train.batch_size)
    except ValueError as exc:
        raise UserError(f"train.recipe: {exc}") from None
    cfg.train.epochs, cfg.train.batch_size = epochs, batch_size
    return cfg


def method_config_class(method: str) -> type[MethodConfig]:
    if method not in method_names():
        raise UserError(f"unknown method {method!r}; choose one of: {', '.join(method_names())}")
    return method_class(method).config_class


def parse_value(text: str) -> Any:
    """A command-line value in YAML syntax: ``3``, ``0.5``, ``[3,6]``, ``true``, ``abc``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(raw: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    node = raw
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            if key in node and node[key] is None:
                node[key] = {}
            else:
                raise UserError(f"unknown config field {path!r}")
        node = node[key]
    node[keys[-1]] = value


def _build(cls, raw: Any, source: str, skip: set[str] = frozenset()):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping for {cls.__name__}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names - set(skip))
    if unknown:
        raise UserError(
            f"{source}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in raw.items():
        if name in skip:
            continue
        kwargs[name] = coerce_value(hints[name], value, f"{source}: {name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # a section's own checks (a method config's __post_init__)
        raise UserError(f"{source}: {exc}") from None


def coerce_value(hint: Any, value: Any, where: str) -> Any:
    """``value`` as the type ``hint`` names (YAML and command-line text included); a value
    outside a ``Literal``'s choices or of the wrong type is a :class:`UserError` naming ``where``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(arg, value, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return _build(hint, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [parse_value(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [coerce_value(inner, v, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{where}: expected true/false, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected a number, got {value!r}") from None
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise UserError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def check_choices(section: Any, where: str = "") -> None:
    """Every ``Literal`` field of ``section`` and its sub-sections holds one of its choices.

    Building a config from YAML or flags already checks them; this catches values set on the
    dataclasses directly (by code, or by a sweep's fixed settings)."""
    hints = typing.get_type_hints(type(section))
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        hint = hints[item.name]
        path = f"{where}.{item.name}" if where else item.name
        if dataclasses.is_dataclass(value):
            check_choices(value, path)
        elif typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
            choices = ", ".join(map(str, typing.get_args(hint)))
            raise UserError(f"{path} {value!r}: use one of {choices}")
