"""The step loop (agpctl.training.steps.Trainer): losses summed on the device and read at
progress ticks, non-finite losses caught, epoch means exact."""

from __future__ import annotations

import pytest
import torch

from agp_models.base import AnomalyModel, MethodConfig
from agpctl.config import RunConfig
from agpctl.distributed import WorkerContext
from agpctl.training.steps import Trainer


class Scripted(AnomalyModel):
    """A one-parameter model whose loss per step is scripted."""

    name = "scripted"
    config_class = MethodConfig

    def __init__(self, losses: list[float]):
        super().__init__(MethodConfig(), torch.nn.Identity())
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.script = list(losses)

    def training_step(self, batch, progress):
        value = self.script.pop(0)
        loss = self.weight * value
        return {"loss": loss, "half": loss / 2}

    def configure_optimizers(self, total_steps):
        return [(torch.optim.SGD([self.weight], lr=0.0), None)]


def _trainer(losses: list[float]) -> Trainer:
    model = Scripted(losses)
    cfg = RunConfig().with_overrides({"train.epochs": 1})
    return Trainer(model, model, cfg, steps_per_epoch=len(losses), ctx=WorkerContext())


def test_epoch_means_are_the_mean_of_every_step():
    trainer = _trainer([1.0, 2.0, 6.0])
    means = trainer.train_epoch([{}] * 3, sync_interval=3600.0)
    assert means["loss"] == pytest.approx(3.0) and means["half"] == pytest.approx(1.5)
    assert trainer.state.step == 3 and trainer.state.epoch == 1


def test_progress_ticks_get_the_latest_losses():
    seen = []
    _trainer([1.0, 2.0, 6.0]).train_epoch([{}] * 3, on_step=lambda i, v: seen.append((i, v["loss"])),
                                          sync_interval=0.0)
    assert seen == [(1, 1.0), (2, 2.0), (3, 6.0)]
    quiet = []
    _trainer([1.0, 2.0]).train_epoch([{}] * 2, on_step=lambda i, v: quiet.append(i), sync_interval=3600.0)
    assert quiet == []  # no tick came due: no host sync during the epoch


@pytest.mark.parametrize("interval", [0.0, 3600.0])
def test_a_non_finite_loss_stops_the_run_naming_where(interval):
    trainer = _trainer([1.0, float("nan"), 1.0, 1.0])
    with pytest.raises(FloatingPointError, match="loss became nan .*lower --lr") as caught:
        trainer.train_epoch([{}] * 4, sync_interval=interval)
    message = str(caught.value)
    assert ("at step 2" in message) if interval == 0.0 else ("between steps 1 and 4" in message)
