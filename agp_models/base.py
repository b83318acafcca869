"""The one interface every anomaly-detection method implements.

The trainer, evaluator, predictor, exporter and tuner only ever talk to this interface, so
adding a method means one module plus one line in :mod:`agp_models.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import torch
from torch import Tensor, nn

Batch = dict[str, Any]
"""A collated batch from :mod:`agp_data`. Always present: ``image`` (B,3,H,W, normalised),
``mask`` (B,1,H,W, 0/1 float), ``label`` (B,), ``category`` (list[str]), ``index`` (B,) —
the position of the sample in its dataset (stable across epochs, used for feature caching),
``path`` (list[str]). Extras a method asks for through ``AnomalyModel.batch_extras``:

- ``"pseudo_anomaly"``: ``anomaly_image`` (B,3,H,W) — the same image with a synthesised
  defect — and ``anomaly_mask`` (B,1,H,W) its exact mask (all-zero when none was pasted).
- ``"prompt"``: ``prompt_image`` (B,3,H,W) — another normal training image of the same
  category.
"""


@dataclass(kw_only=True)
class BackboneConfig:
    """Which frozen timm network to use and how to load it."""

    name: str = "vit_small_patch16_224.dino"
    pretrained: str = "auto"  # auto | yes | no
    weights: str | None = None  # local state-dict path (agpctl resolves s3:// to a local copy)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    mean: list[float] | None = None  # overrides the backbone's normalisation
    std: list[float] | None = None


@dataclass(kw_only=True)
class MethodConfig:
    """Fields every method shares; each method subclasses it with its own defaults."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    layers: list[int] = field(default_factory=list)  # ViT: 1-indexed blocks; CNN: timm out_indices
    image_size: int = 256
    smoothing_sigma: float = 4.0  # Gaussian smoothing of evaluation maps in pixels, 0 = off
    score_pool: int = 16  # image score = max of the k×k (stride 1) average-pooled map; 0 = plain max
    lr: float = 1e-4
    weight_decay: float = 1e-4
    feature_cache: bool = True  # cache clean features of un-augmented training images
    grad_clip_norm: float = 0.0  # clip the trainable parameters' gradient norm to this; 0 = off


@dataclass
class Prediction:
    maps: Tensor  # (B, H, W) float32 anomaly maps at the input resolution, post-processed
    scores: Tensor  # (B,) image-level anomaly scores


class AnomalyModel(nn.Module):
    """Base class of all methods.

    The frozen backbone is deliberately *not* a registered sub-module: it never appears in
    ``state_dict()`` (checkpoints hold trainable and inference state only), is never wrapped
    by DDP and never reaches an optimiser. ``_apply`` forwards device/dtype moves to it.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    batch_extras: ClassVar[frozenset[str]] = frozenset()
    pseudo_anomaly_probability: ClassVar[float] = 0.5  # share of "pseudo_anomaly" items with a defect

    def __init__(self, cfg: MethodConfig, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        object.__setattr__(self, "backbone", backbone)
        backbone.eval()
        for p in backbone.parameters():
            p.requires_grad_(False)
        self._feature_cache: dict[int, Any] = {}
        self._cache_returns_tuple = False

    # -- the interface -----------------------------------------------------------------
    def training_step(self, batch: Batch, progress: float) -> dict[str, Tensor]:
        """One optimisation step's losses; ``progress`` in [0, 1] drives every schedule."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after every optimiser step (EMA teachers and the like)."""

    @torch.no_grad()
    def predict(self, images: Tensor, batch: Batch | None = None) -> Prediction:
        raise NotImplementedError

    @torch.no_grad()
    def fit_inference_state(self, normal_batches: Iterable[Batch]) -> None:
        """Compute state needed at test time from normal training images (prompt pools,
        score statistics). Stored as buffers so that it is part of the checkpoint."""

    def configure_optimizers(self, total_steps: int) -> list[tuple[torch.optim.Optimizer, Any]]:
        """(optimizer, per-step lr scheduler or None) pairs; every pair steps every step."""
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return [(opt, None)]

    def forward(self, batch: Batch, progress: float) -> dict[str, Tensor]:
        # DDP only synchronises gradients of work done through forward().
        return self.training_step(batch, progress)

    # -- shared helpers ----------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.backbone._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen, BN statistics included
        return self

    def cached(self, key_tensor: Tensor | None, images: Tensor, compute) -> Any:
        """``compute(images)`` for clean, un-augmented training images, memoised per sample
        index so the backbone runs once per image over the whole training run.

        ``compute`` must return a tensor or a tuple/list of tensors with batch dimension 0.
        Cached values live on the CPU in half precision.
        """
        if key_tensor is None or not self.cfg.feature_cache or not self.training:
            return compute(images)
        keys = [int(k) for k in key_tensor.tolist()]
        missing = [i for i, k in enumerate(keys) if k not in self._feature_cache]
        if missing:
            out = compute(images[missing])
            self._cache_returns_tuple = isinstance(out, (tuple, list))
            parts = out if self._cache_returns_tuple else (out,)
            for j, i in enumerate(missing):
                self._feature_cache[keys[i]] = tuple(p[j].detach().to("cpu", torch.float16) for p in parts)
        device = images.device
        # Stacking half-precision copies is not an autocast op (it raises under CPU bf16).
        with torch.autocast(device_type=device.type, enabled=False):
            stacked = tuple(
                torch.stack([self._feature_cache[k][n] for k in keys]).to(device, torch.float32)
                for n in range(len(self._feature_cache[keys[0]]))
            )
        return stacked if self._cache_returns_tuple else stacked[0]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

