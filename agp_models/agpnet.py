"""AGPNet — attention-guided perturbation (spec: METHODS.md "AGPNet"; paper 000_694cbe08c2115663).

Training, per batch of normal images x:

1. Clean target F = Σ_l LN(f_l) (affine-free LN per layer) and prior attention A_p from the
   frozen backbone — memoised per sample through :meth:`AnomalyModel.cached`.
2. Mask M from A_p and/or the EMA teacher decoder's attention A_d (``attention_source``).
3. Feature branch: F̃ = F + ε ⊙ (α(t)·N(M) + β); loss MSE(D(F̃), F).
4. Image branch: B = top-r(t) pixels of the upsampled M, x̃ = x + B ⊙ N(0, σ²), backbone on x̃,
   feature noise on top; loss MSE(D(F̃_img), F).
5. Loss = ½ (feature + image).

Inference: S = ‖F − D(F)‖₂ per token → :func:`agp_models.postprocess.postprocess`.

Multi-resolution backbones (CNNs): layers with different grids or widths cannot be summed, so
each LN'd map is resized to the token grid (``token_stride``, default the coarsest stride)
and the maps are concatenated (``fusion='auto'`` picks sum for equal shapes, else concat).

No official AGPNet code is public; where the paper is silent the defaults follow ViTAD
(zhangzjn/ADer), which AGPNet builds on (METHODS.md "AGPNet"):

- layers: blocks 3, 6, 9 plus 12 of ``vit_small_patch16_224.dino``;
- recipes: ``paper`` = 500 epochs at batch 32, AdamW with ViTAD's lr rule 1e-4·batch/8 (so
  4e-4 at batch 32, and scaled again when the batch size is changed), ×0.1 at 40 % of the
  steps; ``fast`` = a short warm-up + cosine schedule (:data:`AGPNET_RECIPES`);
- evaluation maps smoothed with σ = 4 px, image score = max of the 16×16 average-pooled map.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agp_models.base import AnomalyModel, BackboneConfig, Batch, MethodConfig, Prediction
from agp_models.layers import LearnedPositionEmbedding, TransformerBlock, resize_to_grid
from agp_models.postprocess import postprocess
from agp_models.recipes import Recipe, schedule_of

__all__ = ["AGPNET_RECIPES", "AGPNet", "AGPNetConfig", "AttentionDecoder", "minmax_normalise"]

AGPNET_RECIPES: dict[str, Recipe] = {
    "paper": Recipe(epochs=500, batch_size=32, lr=1e-4, lr_reference_batch=8, lr_schedule="step",
                    lr_drop_at=0.4, lr_drop_factor=0.1,
                    source="paper: AdamW, batch 32, 500 epochs, ×0.1 at 40 %; lr 1e-4·batch/8 (ViTAD)"),
    "fast": Recipe(epochs=20, batch_size=16, lr=4e-4, lr_reference_batch=16, lr_schedule="cosine",
                   warmup_fraction=0.05, source="short budget: warm-up 5 %, cosine; see README 'Accuracy'"),
}

ATTENTION_SOURCES = ("prior", "decoder", "both")
NOISE_MODES = ("none", "random", "attention")
FUSIONS = ("auto", "sum", "concat")


@dataclass(kw_only=True)
class AGPNetConfig(MethodConfig):
    recipes: ClassVar[dict[str, Recipe]] = AGPNET_RECIPES

    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="vit_small_patch16_224.dino"))
    layers: list[int] = field(default_factory=lambda: [3, 6, 9, 12])
    image_size: int = 256
    # Feature fusion: "auto" = sum when all layers share grid and width (ViT), else concat.
    fusion: str = "auto"
    token_stride: int | None = None  # token grid = image_size / token_stride; None = coarsest layer
    layer_norm_eps: float = 1e-6
    # Decoder D: plain ViT. decoder_width None = the fused feature width (no projection);
    # otherwise linear in/out projections are added only when the widths differ.
    decoder_depth: int = 4
    decoder_width: int | None = 384
    decoder_heads: int = 6
    decoder_mlp_ratio: float = 4.0
    # Mean teacher (EMA copy of D) for the learned attention A_d.
    ema_momentum: float = 0.9999
    ema_every: int = 10
    # Mask M and perturbations (Table 5 ablations: none | random | attention).
    attention_source: str = "both"  # prior | decoder | both
    feature_noise: str = "attention"
    image_noise: str = "attention"
    noise_schedule: str = "ramp"  # ramp: α rises α_min→α_max until alpha_ramp_end; fixed: α_max
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    alpha_ramp_end: float = 0.8
    noise_floor: float = 0.1  # β
    image_sigma: float = 1.0  # σ_img, in normalised image space
    mask_ratio_start: float = 0.6
    mask_ratio_end: float = 1.0
    mask_ramp_start: float = 0.2
    mask_ramp_end: float = 0.8
    # Optimiser: AdamW; lr and its schedule come from the recipe (AGPNET_RECIPES) unless set.
    weight_decay: float = 1e-4
    # Evaluation maps (Common): σ=4 px smoothing, image score = max of 16×16 average pool.
    smoothing_sigma: float = 4.0
    score_pool: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):  # YAML round trip hands nested dicts
            self.backbone = BackboneConfig(**self.backbone)
        for name, value, allowed in (
            ("attention_source", self.attention_source, ATTENTION_SOURCES),
            ("feature_noise", self.feature_noise, NOISE_MODES),
            ("image_noise", self.image_noise, NOISE_MODES),
            ("fusion", self.fusion, FUSIONS),
            ("noise_schedule", self.noise_schedule, ("ramp", "fixed")),
        ):
            if value not in allowed:
                raise ValueError(f"agpnet.{name} must be one of {'|'.join(allowed)}, got {value!r}")


def minmax_normalise(x: Tensor, eps: float = 1e-12) -> Tensor:
    """N(·): per-sample min-max normalisation of (B, ...) to [0, 1]."""
    flat = x.reshape(x.shape[0], -1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(eps)).reshape(x.shape)


def _linear_ramp(progress: float, start: float, end: float, low: float, high: float) -> float:
    if end <= start:
        return high if progress >= end else low
    fraction = min(max((progress - start) / (end - start), 0.0), 1.0)
    return low + (high - low) * fraction


class AttentionDecoder(nn.Module):
    """Plain ViT decoder over the h×w feature tokens: (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int, width: int, depth: int, heads: int, mlp_ratio: float, grid: tuple[int, int]):
        super().__init__()
        self.proj_in = nn.Linear(channels, width) if width != channels else nn.Identity()
        self.pos_embed = LearnedPositionEmbedding(grid, width)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio=mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, channels)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, features: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        B, C, h, w = features.shape
        x = self.pos_embed(self.proj_in(features.flatten(2).transpose(1, 2)), (h, w))
        received: list[Tensor] = []
        for block in self.blocks:
            if return_attention:
                x, probs = block(x, return_attention=True)
                # Attention each token receives: column mean over the queries, then over heads.
                received.append(probs.mean(dim=2).mean(dim=1))
            else:
                x = block(x)
        out = self.head(self.norm(x)).transpose(1, 2).reshape(B, C, h, w)
        if return_attention:
            return out, torch.stack(received).mean(dim=0).reshape(B, h, w)
        return out


class AGPNet(AnomalyModel):
    name = "agpnet"
    config_class = AGPNetConfig
    cfg: AGPNetConfig

    def __init__(self, cfg: AGPNetConfig, backbone: nn.Module):
        super().__init__(cfg, backbone)
        channels, strides = list(backbone.channels), list(backbone.strides)
        fusion = cfg.fusion
        if fusion == "auto":
            fusion = "sum" if len(set(channels)) == 1 and len(set(strides)) == 1 else "concat"
        if fusion == "sum" and len(set(channels)) != 1:
            raise ValueError(f"agpnet.fusion='sum' needs equal layer widths, got {channels}; use 'concat'")
        self.fusion = fusion
        self.token_stride = int(cfg.token_stride or max(strides))
        self.grid = (cfg.image_size // self.token_stride, cfg.image_size // self.token_stride)
        self.feature_channels = channels[0] if fusion == "sum" else sum(channels)
        width = cfg.decoder_width or self.feature_channels
        self.decoder = AttentionDecoder(
            self.feature_channels, width, cfg.decoder_depth, cfg.decoder_heads, cfg.decoder_mlp_ratio, self.grid
        )
        # Mean teacher: registered (so it is checkpointed and resumed) but never optimised.
        self.teacher = copy.deepcopy(self.decoder)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self._needs_prior = cfg.attention_source in ("prior", "both")
        self._needs_teacher = cfg.attention_source in ("decoder", "both")

    # -- schedules (functions of progress in [0, 1]) ------------------------------------
    def feature_noise_alpha(self, progress: float) -> float:
        """α(t): linear α_min → α_max until alpha_ramp_end, then constant ('fixed': α_max)."""
        c = self.cfg
        if c.noise_schedule == "fixed":
            return c.alpha_max
        return _linear_ramp(progress, 0.0, c.alpha_ramp_end, c.alpha_min, c.alpha_max)

    def mask_ratio(self, progress: float) -> float:
        """r(t): fraction of pixels noised in the image branch, linear between the ramp ends."""
        c = self.cfg
        return _linear_ramp(progress, c.mask_ramp_start, c.mask_ramp_end, c.mask_ratio_start, c.mask_ratio_end)

    # -- features and attention ---------------------------------------------------------
    def fuse(self, maps: list[Tensor]) -> Tensor:
        """F = Σ_l LN(f_l) (or concat of LN(f_l) resized to the token grid), (B, C, h, w)."""
        normed = []
        for f in maps:
            f = F.layer_norm(f.permute(0, 2, 3, 1), (int(f.shape[1]),), eps=self.cfg.layer_norm_eps).permute(0, 3, 1, 2)
            normed.append(resize_to_grid(f, self.grid))  # no-op unless token_stride asks for another grid
        if self.fusion == "sum":
            return torch.stack(normed).sum(dim=0)
        return torch.cat(normed, dim=1)

    def prior_from_output(self, out: Any) -> Tensor:
        """A_p (B, h, w): ViT CLS attention (mean over heads and layers); CNN channel-mean |f_l|."""
        if out.attentions is not None:
            probs = torch.stack([a.float().mean(dim=1) for a in out.attentions]).mean(dim=0)
            h, w = int(out.features[0].shape[-2]), int(out.features[0].shape[-1])  # static when traced
            return resize_to_grid(probs.reshape(-1, 1, h, w), self.grid)[:, 0]
        # Layers differ in scale: each activation map is brought to [0, 1] before averaging.
        maps = [minmax_normalise(resize_to_grid(f.float().abs().mean(dim=1, keepdim=True), self.grid)) for f in out.features]
        return torch.stack(maps).mean(dim=0)[:, 0]

    def extract(self, images: Tensor, with_prior: bool = False) -> tuple[Tensor, ...]:
        """(F,) or (F, A_p) for a batch of images; backbone always without gradients."""
        with torch.no_grad():
            out = self.backbone(images, with_attention=with_prior and bool(self.backbone.is_vit))
            fused = self.fuse(out.features).float()
            if with_prior:
                return fused, self.prior_from_output(out).float()
            return (fused,)

    def teacher_attention(self, features: Tensor) -> Tensor:
        """A_d (B, h, w): attention received per token in the EMA teacher, on clean F."""
        with torch.no_grad():
            _, received = self.teacher(features, return_attention=True)
        return received.float()

    def attention_mask(self, features: Tensor, prior: Tensor | None) -> Tensor:
        """M in [0, 1], (B, h, w): per attention_source, each source min-max normalised."""
        parts: list[Tensor] = []
        if self._needs_prior:
            if prior is None:
                raise ValueError("attention_source needs the prior attention A_p")
            parts.append(minmax_normalise(prior))
        if self._needs_teacher:
            parts.append(minmax_normalise(self.teacher_attention(features)))
        return torch.stack(parts).mean(dim=0)

    def _guide(self, mode: str, mask: Tensor | None, like: Tensor) -> Tensor | None:
        if mode == "none":
            return None
        if mode == "random":  # Table 5 "random": a uniform random map on the token grid
            return torch.rand(like.shape[0], *self.grid, device=like.device, dtype=torch.float32)
        assert mask is not None
        return mask

    # -- perturbations ------------------------------------------------------------------
    def perturb_features(self, features: Tensor, guide: Tensor, progress: float) -> Tensor:
        """F̃ = F + ε ⊙ (α(t)·N(guide) + β), ε ~ N(0, I); guide (B, h, w)."""
        scale = self.feature_noise_alpha(progress) * minmax_normalise(guide) + self.cfg.noise_floor
        return features + torch.randn_like(features) * scale[:, None].to(features.dtype)

    def image_noise_mask(self, guide: Tensor, progress: float, size: tuple[int, int]) -> Tensor:
        """B (B, 1, H, W) in {0, 1}: the top-r(t) fraction of the upsampled guide's pixels."""
        up = F.interpolate(guide[:, None].float(), size=size, mode="bilinear", align_corners=False)
        flat = up.flatten(1)
        keep = int(round(self.mask_ratio(progress) * flat.shape[1]))
        binary = torch.zeros_like(flat)
        if keep > 0:
            top = flat.topk(keep, dim=1).indices
            binary.scatter_(1, top, 1.0)
        return binary.reshape(up.shape)

    def perturb_image(self, images: Tensor, guide: Tensor, progress: float) -> Tensor:
        """x̃ = x + B ⊙ N(0, σ_img²)."""
        binary = self.image_noise_mask(guide, progress, tuple(images.shape[-2:]))
        return images + binary.to(images.dtype) * torch.randn_like(images) * self.cfg.image_sigma

    # -- the interface ------------------------------------------------------------------
    def clean_features(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        images = batch["image"]
        with_prior = self._needs_prior and "attention" in (self.cfg.feature_noise, self.cfg.image_noise)
        # The cache stacks its fp16 CPU copies, which CPU autocast refuses ("Unexpected floating
        # ScalarType"): run the cache lookup outside autocast and the backbone inside it.
        device_type = images.device.type
        autocast_on = torch.is_autocast_enabled(device_type)
        autocast_dtype = torch.get_autocast_dtype(device_type)

        def compute(x: Tensor) -> tuple[Tensor, ...]:
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                return self.extract(x, with_prior=with_prior)

        with torch.autocast(device_type, enabled=False):
            out = self.cached(batch.get("index"), images, compute)
        return out[0], (out[1] if with_prior else None)

    def training_step(self, batch: Batch, progress: float) -> dict[str, Tensor]:
        c = self.cfg
        images = batch["image"]
        target, prior = self.clean_features(batch)
        needs_mask = "attention" in (c.feature_noise, c.image_noise)
        mask = self.attention_mask(target, prior) if needs_mask else None

        feature_guide = self._guide(c.feature_noise, mask, target)
        noisy = target if feature_guide is None else self.perturb_features(target, feature_guide, progress)
        loss_feature = F.mse_loss(self.decoder(noisy).float(), target)
        if c.image_noise == "none":
            # The image branch would only repeat the feature branch with a fresh ε.
            return {"loss": loss_feature, "loss_feature": loss_feature.detach(), "loss_image": torch.zeros_like(loss_feature).detach()}

        image_guide = self._guide(c.image_noise, mask, target)
        assert image_guide is not None
        perturbed_images = self.perturb_image(images, image_guide, progress)
        (image_features,) = self.extract(perturbed_images)
        feature_guide = self._guide(c.feature_noise, mask, target)
        if feature_guide is not None:
            image_features = self.perturb_features(image_features, feature_guide, progress)
        loss_image = F.mse_loss(self.decoder(image_features).float(), target)
        loss = 0.5 * (loss_feature + loss_image)
        return {"loss": loss, "loss_feature": loss_feature.detach(), "loss_image": loss_image.detach()}

    @torch.no_grad()
    def update_teacher(self) -> None:
        """θ_t ← m·θ_t + (1 − m)·θ_s for every parameter (buffers copied)."""
        m = self.cfg.ema_momentum
        for t, s in zip(self.teacher.parameters(), self.decoder.parameters()):
            t.mul_(m).add_(s.detach() * (1.0 - m))
        for t, s in zip(self.teacher.buffers(), self.decoder.buffers()):
            t.copy_(s)

    def after_step(self, step: int) -> None:
        """``step`` = optimiser steps done so far; the teacher moves every ``ema_every`` steps."""
        if self._needs_teacher and step > 0 and step % self.cfg.ema_every == 0:
            self.update_teacher()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def configure_optimizers(self, total_steps: int) -> list[tuple[torch.optim.Optimizer, Any]]:
        params = [p for p in self.decoder.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=schedule_of(self.cfg)["lr"], weight_decay=self.cfg.weight_decay)
        return [(optimizer, self.lr_scheduler(optimizer, total_steps))]

    def anomaly_tokens(self, images: Tensor) -> Tensor:
        """Raw map S = ‖F − D(F)‖₂ over channels, (B, h, w) on the token grid."""
        (features,) = self.extract(images)
        reconstruction = self.decoder(features).float()
        return (features - reconstruction).pow(2).sum(dim=1).sqrt()

    @torch.no_grad()
    def predict(self, images: Tensor, batch: Batch | None = None) -> Prediction:
        raw = self.anomaly_tokens(images)
        # Maps are float32 by contract, also when the networks ran under bf16/fp16 autocast.
        with torch.autocast(images.device.type, enabled=False):
            maps, scores = postprocess(raw.float(), self.cfg.image_size, self.cfg.smoothing_sigma, self.cfg.score_pool)
        return Prediction(maps=maps.float(), scores=scores.float())

