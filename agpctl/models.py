"""A run's model: built from its configuration, on a device, at a precision.

Every wing builds models through here (training, evaluation, prediction, export), so a
run's model is rebuilt the same way wherever it is used.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from typing import Any

import numpy as np
import torch

from agp_data import storage
from agp_models.base import AnomalyModel
from agp_models.registry import method_class
from agpctl.config import RunConfig


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def build_model(cfg: RunConfig, device: torch.device | None = None) -> AnomalyModel:
    """The method named by ``cfg.method`` with its frozen backbone.

    Random parts (a randomly initialised backbone included) are drawn from ``train.seed``
    alone, so a run's backbone can be rebuilt bit-identically for evaluation even when no
    pretrained weights were available.
    """
    # Deferred: timm costs ~2 s of every command's start-up, and only building a model needs it.
    from agp_models.backbones import build_backbone

    model_cfg = cfg.model
    backbone_cfg = model_cfg.backbone
    if backbone_cfg.weights and storage.is_s3(backbone_cfg.weights):
        backbone_cfg = type(backbone_cfg)(**{**vars(backbone_cfg), "weights": storage.local_copy(backbone_cfg.weights)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        backbone = build_backbone(backbone_cfg, model_cfg.layers, model_cfg.image_size)
        model = method_class(cfg.method)(model_cfg, backbone)
    return model.to(device or torch.device("cpu"))


def resolve_pretrained(cfg: RunConfig) -> list[str]:
    """Builds the model once so that configuration mistakes show before any cluster work
    starts, and pins ``pretrained: auto`` to what actually happened, so that evaluation later
    rebuilds exactly the same backbone. Returns the warnings raised while building."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(cfg)
    backbone_cfg = cfg.model.backbone
    if backbone_cfg.pretrained == "auto":
        backbone_cfg.pretrained = "yes" if (model.backbone.pretrained and not backbone_cfg.weights) else "no"
    return [str(w.message) for w in caught]


def backbone_summary(model: AnomalyModel) -> dict[str, Any]:
    backbone = model.backbone
    return {
        "name": backbone.name,
        "pretrained": bool(backbone.pretrained),
        "weight_source": backbone.weight_source,
    }


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def device_name(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)`` or ``cpu``: what the run header shows."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` as bf16 where the device runs it natively, else fp32; other values as given."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Sample ids are bookkeeping (feature-cache keys, result order): reading them on the host
# must not wait for the device.
HOST_FIELDS = frozenset({"index", "prompt_index"})


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k not in HOST_FIELDS else v
            for k, v in batch.items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def loader_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
