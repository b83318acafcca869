"""Training recipes: how long, at which batch size and with which learning-rate schedule a
method trains.

Each method config lists its recipes (``MethodConfig.recipes``): ``paper`` is the paper's
epochs, batch size and schedule (lr scaled with the batch size where the authors scale it),
``fast`` a short schedule for a fixed budget (warm-up, a larger lr, cosine decay). A run picks
one by name; every value the user sets explicitly (epochs, batch size, lr, any schedule field)
wins over the recipe's, and :func:`resolve_recipe` writes the resolved values back into the
config so that the saved run records exactly what trained it.

The schedule is one multiplier of the base lr per optimiser step (:func:`lr_factor`), so it
is the same function of training progress for 5 epochs or 500.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LR_SCHEDULES", "RECIPE_NAMES", "Recipe", "lr_factor", "lr_scheduler", "resolve_recipe", "schedule_of"]

RECIPE_NAMES = ("paper", "fast")
LR_SCHEDULES = ("constant", "step", "cosine")
# The method-config fields a recipe fills when they are left unset (None).
SCHEDULE_FIELDS = ("lr_schedule", "warmup_fraction", "lr_drop_at", "lr_drop_factor")
# Recipe used when a method config is used outside a run (no recipe was resolved).
STANDALONE_RECIPE = "paper"


@dataclass(frozen=True, kw_only=True)
class Recipe:
    epochs: int
    batch_size: int
    lr: float
    # The lr above is for this batch size and scales linearly with it (lr·batch/reference);
    # None: the lr is used as is at every batch size.
    lr_reference_batch: int | None = None
    lr_schedule: str = "constant"  # constant | step | cosine
    warmup_fraction: float = 0.0  # of all steps: lr rises linearly from ~0 to lr
    lr_drop_at: float = 1.0  # step: lr ×lr_drop_factor once this fraction of the steps is done
    lr_drop_factor: float = 1.0
    source: str = ""  # where the values come from (paper, code, or the measurement that chose them)

    def lr_for(self, batch_size: int) -> float:
        if self.lr_reference_batch is None:
            return self.lr
        return self.lr * batch_size / self.lr_reference_batch


def lr_factor(step: int, total_steps: int, schedule: str, warmup_fraction: float = 0.0,
              drop_at: float = 1.0, drop_factor: float = 1.0) -> float:
    """Multiplier of the base lr for optimiser step ``step`` (0-based) of ``total_steps``.

    Warm-up: linear from 1/warmup_steps up to 1 over the first ``warmup_fraction`` of the steps.
    Then ``constant`` 1; ``step`` 1 and ``drop_factor`` from ``drop_at`` of the steps on;
    ``cosine`` half a cosine from 1 to 0 over the steps after the warm-up.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    total = max(1, int(total_steps))
    warmup = int(round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "step":
        return drop_factor if step >= round(drop_at * total) else 1.0
    if schedule == "cosine":
        span = max(1, total - warmup)
        done = min(max(step - warmup, 0), span) / span
        return 0.5 * (1.0 + math.cos(math.pi * done))
    return 1.0


def recipe_of(cfg: Any, name: str) -> Recipe:
    recipes = type(cfg).recipes
    if name not in recipes:
        raise ValueError(f"recipe {name!r} is not one of {', '.join(recipes) or 'none'} for {type(cfg).__name__}")
    return recipes[name]


def resolve_recipe(cfg: Any, name: str, epochs: int | None, batch_size: int | None) -> tuple[int, int]:
    """Fills the unset (None) lr and schedule fields of ``cfg`` from recipe ``name`` and
    returns (epochs, batch size): the given ones, else the recipe's. The lr of a recipe that
    scales with the batch is scaled to the batch size actually used. Idempotent."""
    recipe = recipe_of(cfg, name)
    epochs = recipe.epochs if epochs is None else int(epochs)
    batch_size = recipe.batch_size if batch_size is None else int(batch_size)
    if cfg.lr is None:
        cfg.lr = recipe.lr_for(batch_size)
    for field_name in SCHEDULE_FIELDS:
        if getattr(cfg, field_name) is None:
            setattr(cfg, field_name, getattr(recipe, field_name))
    return epochs, batch_size


def schedule_of(cfg: Any) -> dict[str, Any]:
    """lr and schedule of ``cfg``; fields still unset (a config used outside a run) come from
    its :data:`STANDALONE_RECIPE` at the recipe's own batch size."""
    recipe = type(cfg).recipes.get(STANDALONE_RECIPE)
    values: dict[str, Any] = {}
    for field_name in ("lr", *SCHEDULE_FIELDS):
        value = getattr(cfg, field_name)
        if value is None:
            if recipe is None:
                raise ValueError(f"{type(cfg).__name__}.{field_name} is unset and the method has no recipe")
            value = recipe.lr_for(recipe.batch_size) if field_name == "lr" else getattr(recipe, field_name)
        values[field_name] = value
    return values


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int
                 ) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step scheduler of ``cfg``'s schedule (the optimiser was built with its lr)."""
    values = schedule_of(cfg)
    schedule, warmup = values["lr_schedule"], values["warmup_fraction"]
    drop_at, drop_factor = values["lr_drop_at"], values["lr_drop_factor"]
    lr_factor(0, total_steps, schedule)  # an unknown schedule fails here, not at the first step

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, schedule, warmup, drop_at, drop_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
