"""Recipes: each method's paper and fast schedules, resolved into the run's config; flags win."""

from __future__ import annotations

import math

import pytest
import torch

from agp_models.agpnet import AGPNetConfig
from agp_models.onenip import OneNIPConfig
from agp_models.recipes import Recipe, lr_factor, lr_scheduler, resolve_recipe
from agp_models.rlr import RLRConfig
from agpctl.cli.run_flags import config_from_options
from agpctl.config import RunConfig, resolve_recipe as resolve_run_recipe
from agpctl.errors import UserError


def _rates(schedule: str, total: int, **kwargs) -> list[float]:
    return [lr_factor(step, total, schedule, **kwargs) for step in range(total)]


def test_lr_factor_warmup_then_cosine_step_or_constant():
    cosine = _rates("cosine", 100, warmup_fraction=0.1)
    assert cosine[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # linear warm-up to 1
    assert cosine[10] == pytest.approx(1.0) and cosine[55] == pytest.approx(0.5, abs=0.02)
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:])) and cosine[-1] < 0.001
    step = _rates("step", 100, drop_at=0.4, drop_factor=0.1)
    assert step[39] == 1.0 and step[40] == 0.1 and step[99] == 0.1
    assert set(_rates("constant", 10)) == {1.0}
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0, 10, "linear")


def test_paper_recipes_are_the_papers():
    agpnet, onenip, rlr = (c.recipes["paper"] for c in (AGPNetConfig, OneNIPConfig, RLRConfig))
    assert (agpnet.epochs, agpnet.batch_size, agpnet.lr_for(32), agpnet.lr_schedule, agpnet.lr_drop_at) == \
        (500, 32, 4e-4, "step", 0.4)
    assert (onenip.epochs, onenip.batch_size, onenip.lr_for(64), onenip.lr_schedule, onenip.lr_drop_at) == \
        (1000, 64, 1e-4, "step", 0.8)
    assert (rlr.epochs, rlr.batch_size, rlr.lr_for(4), rlr.lr_schedule) == (200, 4, 1e-4, "constant")
    for cls in (AGPNetConfig, OneNIPConfig, RLRConfig):
        fast = cls.recipes["fast"]
        assert fast.lr_schedule == "cosine" and fast.warmup_fraction > 0 and fast.epochs < cls.recipes["paper"].epochs


def test_resolution_fills_only_what_is_unset_and_scales_lr_with_batch():
    cfg = AGPNetConfig()
    assert resolve_recipe(cfg, "paper", None, None) == (500, 32)
    assert (cfg.lr, cfg.lr_schedule, cfg.lr_drop_at, cfg.warmup_fraction) == (4e-4, "step", 0.4, 0.0)
    assert resolve_recipe(cfg, "fast", None, None) == (20, 16)  # idempotent: the resolved values stay
    assert (cfg.lr, cfg.lr_schedule) == (4e-4, "step")
    small = AGPNetConfig()
    assert resolve_recipe(small, "paper", 3, 8) == (3, 8) and small.lr == pytest.approx(1e-4)  # 1e-4·8/8
    fixed = OneNIPConfig(lr=5e-3, lr_schedule="constant")
    assert resolve_recipe(fixed, "paper", None, 2) == (1000, 2)
    assert (fixed.lr, fixed.lr_schedule, fixed.lr_drop_at) == (5e-3, "constant", 0.8)
    with pytest.raises(ValueError, match="recipe 'slow'"):
        resolve_recipe(RLRConfig(), "slow", None, None)


def test_recipe_flag_records_every_resolved_value_and_flags_override_it():
    cfg = config_from_options({"method": "onenip", "recipe": "paper"})
    assert (cfg.train.recipe, cfg.train.epochs, cfg.train.batch_size) == ("paper", 1000, 64)
    saved = RunConfig.from_yaml(cfg.to_yaml())
    assert (saved.model.lr, saved.model.lr_schedule, saved.model.lr_drop_at, saved.model.lr_drop_factor) == \
        (1e-4, "step", 0.8, 0.1)
    flagged = config_from_options({"method": "agpnet", "recipe": "paper", "epochs": 7, "batch_size": 4})
    assert (flagged.train.epochs, flagged.train.batch_size, flagged.model.lr) == (7, 4, pytest.approx(5e-5))
    assert config_from_options({"method": "rlr", "lr": 3e-3}).model.lr == 3e-3
    default = config_from_options({"method": "rlr"})  # fast is the default recipe
    assert (default.train.recipe, default.train.epochs, default.train.validation) == ("fast", 10, "synthetic")
    # A resumed run's config is already resolved: another recipe changes nothing in it.
    resumed = resolve_run_recipe(RunConfig.from_yaml(default.to_yaml()).with_overrides({"train.recipe": "paper"}))
    assert (resumed.train.epochs, resumed.train.batch_size, resumed.model.lr) == (10, 8, default.model.lr)
    with pytest.raises(UserError, match="recipe: .slow. is not one of"):
        RunConfig.from_dict({"method": "rlr", "train": {"recipe": "slow"}})


def test_scheduler_follows_the_config_and_methods_use_it():
    cfg = AGPNetConfig(lr=1.0, lr_schedule="cosine", warmup_fraction=0.2, lr_drop_at=1.0, lr_drop_factor=1.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = lr_scheduler(optimizer, cfg, total_steps=10)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_factor(s, 10, "cosine", 0.2) for s in range(10)])
    assert seen[0] == pytest.approx(0.5) and seen[2] == pytest.approx(1.0) and math.isclose(max(seen), 1.0)


def test_recipe_is_a_frozen_value():
    recipe = Recipe(epochs=1, batch_size=2, lr=1e-3, lr_reference_batch=4)
    assert recipe.lr_for(8) == pytest.approx(2e-3)
    with pytest.raises(Exception):
        recipe.epochs = 2  # type: ignore[misc]
