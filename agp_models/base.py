"""The one interface every anomaly-detection method implements.

The trainer, evaluator, predictor, exporter and tuner only ever talk to this interface, so
adding a method means one module plus one line in :mod:`agp_models.registry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Literal

import torch
from torch import Tensor, nn

from agp_models.recipes import Recipe, lr_scheduler, schedule_of

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
    """Fields every method shares; each method subclasses it with its own defaults and recipes."""

    recipes: ClassVar[dict[str, Recipe]] = {}  # by name: "paper", "fast" (agp_models.recipes)
    # Fields older versions had and saved configs may still hold: name -> why it is ignored now.
    retired_fields: ClassVar[dict[str, str]] = {}

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    layers: list[int] = field(default_factory=list)  # ViT: 1-indexed blocks; CNN: timm out_indices
    image_size: int = 256
    smoothing_sigma: float = 4.0  # Gaussian smoothing of evaluation maps in pixels, 0 = off
    # Smoothing of the map the image score is taken from; None = the evaluation map's (smoothing_sigma).
    score_sigma: float | None = None
    score_pool: int = 16  # image score = max of the k×k (stride 1) average-pooled map; 0 = plain max
    # Optimiser and schedule: None = the run's recipe (agp_models.recipes), resolved into the saved config.
    lr: float | None = None
    lr_schedule: Literal["constant", "step", "cosine"] | None = None
    warmup_fraction: float | None = None  # of all steps
    lr_drop_at: float | None = None  # step schedule: fraction of the steps after which lr ×lr_drop_factor
    lr_drop_factor: float | None = None
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
        self._feature_cache = FeatureCache()

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
        opt = torch.optim.AdamW(params, lr=schedule_of(self.cfg)["lr"], weight_decay=self.cfg.weight_decay)
        return [(opt, self.lr_scheduler(opt, total_steps))]

    def lr_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        """The recipe's per-step lr schedule (warm-up, constant / step / cosine) for ``optimizer``."""
        return lr_scheduler(optimizer, self.cfg, total_steps)

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
        Cached values are kept in half precision (:class:`FeatureCache`) and returned as float32.
        """
        if key_tensor is None or not self.cfg.feature_cache or not self.training:
            return compute(images)
        return self._feature_cache.lookup(key_tensor, images, compute)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]



class FeatureCache:
    """Clean training features by sample index, in one preallocated half-precision tensor
    per output, on the images' device when it fits there (one gather per step instead of
    stacking per-sample tensors; no host copies on a GPU).

    Capacity grows by doubling as larger sample indices arrive. On CUDA the cache stays on
    the GPU while it takes at most ``gpu_fraction`` of the device's free memory, else it
    lives in pinned host memory.
    """

    def __init__(self, gpu_fraction: float = 0.25):
        self.gpu_fraction = gpu_fraction
        self.parts: list[Tensor] = []
        self.filled = torch.zeros(0, dtype=torch.bool)  # on the host: which indices hold features
        self.returns_tuple = False

    def __len__(self) -> int:
        return int(self.filled.sum())

    def __iter__(self):
        return iter(torch.nonzero(self.filled).flatten().tolist())

    def lookup(self, key_tensor: Tensor, images: Tensor, compute) -> Any:
        keys = key_tensor.detach().to("cpu", torch.long)  # sample ids travel on the host (agpctl keeps them there)
        missing = torch.nonzero(~self._filled_for(keys)).flatten()
        if len(missing):
            out = compute(images[missing.to(images.device)])
            self.returns_tuple = isinstance(out, (tuple, list))
            parts = out if self.returns_tuple else (out,)
            self._store(keys[missing], [p.detach() for p in parts], images.device)
        device = images.device
        index = keys.to(self.parts[0].device, non_blocking=True)
        # Gathering half-precision copies is not an autocast op (it raises under CPU bf16).
        with torch.autocast(device_type=device.type, enabled=False):
            stacked = tuple(part.index_select(0, index).to(device, torch.float32, non_blocking=True)
                            for part in self.parts)
        return stacked if self.returns_tuple else stacked[0]

    def _filled_for(self, keys: Tensor) -> Tensor:
        inside = keys < len(self.filled)
        result = torch.zeros(len(keys), dtype=torch.bool)
        result[inside] = self.filled[keys[inside]]
        return result

    def _store(self, keys: Tensor, values: list[Tensor], device: torch.device) -> None:
        needed = int(keys.max()) + 1
        if not self.parts or needed > len(self.filled):
            self._grow(max(needed, 2 * len(self.filled)), values, device)
        index = keys.to(self.parts[0].device)
        for part, value in zip(self.parts, values):
            part.index_copy_(0, index, value.to(part.device, torch.float16))
        self.filled[keys] = True

    def _grow(self, capacity: int, values: list[Tensor], device: torch.device) -> None:
        shapes = [tuple(v.shape[1:]) for v in values]
        home = self._home(capacity, shapes, device)
        grown = [torch.zeros((capacity, *shape), dtype=torch.float16, device=home) for shape in shapes]
        if home.type == "cpu" and device.type == "cuda":
            grown = [g.pin_memory() for g in grown]
        for new, old in zip(grown, self.parts):
            new[: len(old)] = old.to(home)
        filled = torch.zeros(capacity, dtype=torch.bool)
        filled[: len(self.filled)] = self.filled
        self.parts, self.filled = grown, filled

    def _home(self, capacity: int, shapes: list[tuple[int, ...]], device: torch.device) -> torch.device:
        if device.type != "cuda":
            return torch.device("cpu")
        nbytes = 2 * capacity * sum(math.prod(shape) for shape in shapes)
        free, _ = torch.cuda.mem_get_info(device)
        return device if nbytes <= self.gpu_fraction * free else torch.device("cpu")
