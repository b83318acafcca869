"""RLR — Reconstruct features from a Learnable Reference (He et al., 2024).

Per feature level an independent transformer reconstructs the (locally averaged) backbone
features of an image, but its attention never copies the input through:

- LCA (local cross attention): queries from the tokens Y, keys *and values* from a learnable
  reference R (one vector per grid position), each query restricted to the reference tokens
  of its local window — the output is a convex mix of reference values only.
- MLKA (masked learnable key attention): queries from Y, keys from R, values from Y, each
  query masked from its own neighbourhood window — a token's output never contains the
  values of itself or its neighbours.

Block k:  Z_k = LN(MLKA(Y, R) + α·LCA(Y, R)),  Y_k = LN(FFN(Z_k) + Z_k), no residual around
the attention;  Y_0 = Linear(F + jitter) + P,  F_out = Linear(LN(Y_K)) (the authors' code; the
paper's Y_0 = FFN(F + jitter), F_out = FFN(Y_K) with ``embedding: ffn``, ``output_head: ffn``).
Loss per level MSE + (1 − cos); anomaly map per level mean_c (F_out − F)² + (1 − cos),
upsampled to the input size and averaged over levels (spec: ../shared/METHODS.md, "RLR").

Official code vs paper (METHODS.md "RLR"), defaults follow the code, each paper variant is a
config value:

- backbone ``tf_efficientnet_b6.aa_in1k`` (timm's bare ``tf_efficientnet_b6`` now resolves to
  the Noisy-Student weights);
- ``embedding: linear``: one linear layer, 2-D sin-cos positions added once to the tokens and
  once to the reference (a free (h·w, C) parameter with its own linear layer), never re-added
  per block | ``ffn``: the paper's FFN embedding (Eq. 6), positions added to queries and keys
  in every block, the reference a free (h·w, width) parameter;
- ``output_head: norm_linear`` (LayerNorm then Linear) | ``ffn``;
- ``smoothing_sigma: 0`` (pixel metrics on the unsmoothed map) with ``score_sigma: 4`` (image
  score = max of the σ=4-smoothed map) | ``smoothing_sigma: 4, score_sigma: null`` (both smoothed);
- recipes: ``paper`` = 200 epochs, batch 4, Adam lr 1e-4, constant | ``fast`` (:data:`RLR_RECIPES`).
  The authors report the best epoch on the test set; agp evaluates the last epoch.

Choices where paper and code are silent (all config fields):

- Window sizes come from ``window_sizes`` keyed by the grid side (spec: {16: 5, 32: 7,
  64: 11}); other grids use ``window_for_grid``: w = 2·⌊(g/8 + 2)/2 + ½⌋ + 1, which reproduces
  exactly those three values (w ≈ 3 + g/8, made odd), clamped so that MLKA leaves every query
  at least one visible key.
- Feature jitter as UniAD: per token, noise ~ N(0, (scale·‖f‖₂/C)²) added on the raw
  (pooled) backbone features before the input FFN; applied per sample with ``jitter_prob``.
- ``embedding: ffn``: the reference lives directly in the hidden space, a parameter of shape
  (h·w, width) per level (the paper's projected R_h), initialised N(0, 1) to match the scale of
  the layer-normed tokens; 2-D sin-cos positions are added DETR-style to the attention inputs
  that form queries and keys (Y + P for queries, R + P for keys), never to values.
- FFN = Linear → GELU → Linear with hidden ``ffn_ratio·width``; the input FFN maps C → width
  and the output FFN width → C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agp_models.base import AnomalyModel, Batch, BackboneConfig, MethodConfig, Prediction
from agp_models.layers import MultiHeadAttention, Mlp, neighbourhood_mask, sincos_2d_position_embedding
from agp_models.postprocess import postprocess
from agp_models.recipes import Recipe, schedule_of

__all__ = [
    "RLR",
    "RLR_RECIPES",
    "RLRBlock",
    "RLRConfig",
    "LevelReconstructor",
    "feature_jitter",
    "max_masked_window",
    "window_for_grid",
]

ATTENTION_KINDS = ("cross", "self")

RLR_RECIPES: dict[str, Recipe] = {
    "paper": Recipe(epochs=200, batch_size=4, lr=1e-4, lr_schedule="constant",
                    source="paper §4.1 and hlr7999/RLR: Adam 1e-4, batch 4, 200 epochs"),
    "fast": Recipe(epochs=10, batch_size=8, lr=4e-4, lr_schedule="cosine", warmup_fraction=0.05,
                   source="short budget: warm-up 5 %, cosine; see README 'Accuracy'"),
}


@dataclass(kw_only=True)
class RLRConfig(MethodConfig):
    recipes: ClassVar[dict[str, Recipe]] = RLR_RECIPES
    retired_fields: ClassVar[dict[str, str]] = {
        "batch_size": "it was never used; the batch size is train.batch_size (the paper recipe's is 4)",
    }

    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="tf_efficientnet_b6.aa_in1k"))
    # timm features_only out_indices; tf_efficientnet_b6 reductions are [2, 4, 8, 16, 32], so
    # 2, 3 = strides 8 and 16 (72 and 200 channels).
    layers: list[int] = field(default_factory=lambda: [2, 3])
    image_size: int = 256
    smoothing_sigma: float = 0.0  # authors' code: pixel metrics on the unsmoothed map ...
    score_sigma: float | None = 4.0  # ... image score from the σ=4-smoothed map
    score_pool: int = 0  # RLR: image score = max of the (smoothed) map
    weight_decay: float = 0.0  # plain Adam, as the paper
    embedding: Literal["linear", "ffn"] = "linear"  # linear + positions once (code) | FFN (paper Eq. 6)
    output_head: Literal["norm_linear", "ffn"] = "norm_linear"  # LayerNorm → Linear (code) | FFN (paper)
    aggregation_kernel: int = 3  # local neighbourhood average pooling (stride 1); ≤1 = off
    widths: list[int] = field(default_factory=lambda: [256, 512])  # hidden width per level
    heads: int = 8
    num_blocks: int = 4
    ffn_ratio: float = 4.0
    dropout: float = 0.0
    window_sizes: dict[int, int] = field(default_factory=lambda: {16: 5, 32: 7, 64: 11})
    alpha: float = 2.0  # weight of LCA against MLKA
    jitter: bool = True
    jitter_scale: float = 4.0
    jitter_prob: float = 1.0
    # Ablations (paper Table 3 and §4.4):
    attention_residual: bool = False  # residual connection around the attention (shortcut)
    attention: str = "cross"  # "cross": keys (and LCA values) from the reference; "self": from Y
    mlka: bool = True  # the masked learnable key attention branch
    lca_local: bool = True  # LCA restricted to the local window (False: global cross attention)


# -- windows and jitter ------------------------------------------------------------------


def window_for_grid(grid: int) -> int:
    """Default window for a grid side ``grid`` not listed in ``window_sizes``.

    w = 2·⌊(g/8 + 2)/2 + ½⌋ + 1 gives 5, 7, 11 at 16, 32, 64 (the spec's values) and grows
    about like 3 + g/8 elsewhere (3 at g = 4, 5 at g = 8); it is then clamped to the largest
    odd window that still leaves every MLKA query a visible key (``max_masked_window``).
    """
    if grid < 1:
        raise ValueError(f"RLR: feature grid side must be ≥ 1, got {grid}")
    window = 2 * math.floor((grid / 8 + 2) / 2 + 0.5) + 1
    return max(1, min(window, max_masked_window(grid)))


def max_masked_window(grid: int) -> int:
    """Largest odd window w such that masking a w×w neighbourhood leaves keys visible.

    A query at index i on a side of n cells sees all of that side masked iff r = w//2 ≥
    max(i, n−1−i); the most exposed (central) query needs r < ⌈(n−1)/2⌉. 0 = impossible.
    """
    radius = math.ceil((grid - 1) / 2) - 1
    return 2 * radius + 1 if radius >= 0 else 0


def feature_jitter(tokens: Tensor, scale: float, prob: float) -> Tensor:
    """UniAD feature jitter: tokens (B, N, C) + ε·scale·‖token‖₂/C, ε ~ N(0, I), applied to
    each sample with probability ``prob``."""
    channels = tokens.shape[-1]
    norms = tokens.norm(dim=-1, keepdim=True) / channels
    noise = torch.randn_like(tokens) * norms * scale
    if prob < 1.0:
        keep = (torch.rand(tokens.shape[0], 1, 1, device=tokens.device) < prob).to(tokens.dtype)
        noise = noise * keep
    return tokens + noise


# -- network ---------------------------------------------------------------------------


class RLRBlock(nn.Module):
    """Z = LN(MLKA(Y, R) + α·LCA(Y, R)); Y' = LN(FFN(Z) + Z).

    - MLKA: Q from Y + P, K from R + P, V from Y; ``mlka_visible`` hides each token's own
      neighbourhood window.
    - LCA: Q from Y + P, K from R + P, V from R; ``lca_visible`` keeps only the window.

    Ablations: ``residual`` adds Y inside the first LN (the shortcut the paper removes);
    ``use_reference=False`` ("self" attention) takes keys and LCA values from Y instead of R;
    ``use_mlka=False`` drops the MLKA branch. A visibility mask of None means no mask.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        ffn_ratio: float,
        alpha: float,
        use_mlka: bool,
        use_reference: bool,
        residual: bool,
        dropout: float,
    ):
        super().__init__()
        self.alpha = alpha
        self.use_reference = use_reference
        self.residual = residual
        attention = dict(attn_drop=dropout, proj_drop=dropout)
        self.mlka = MultiHeadAttention(width, heads, **attention) if use_mlka else None
        self.lca = MultiHeadAttention(width, heads, **attention)
        self.norm_attention = nn.LayerNorm(width)
        self.ffn = Mlp(width, int(round(width * ffn_ratio)), drop=dropout)
        self.norm_ffn = nn.LayerNorm(width)

    def forward(
        self,
        y: Tensor,
        reference: Tensor | None,
        pos: Tensor | None,
        mlka_visible: Tensor | None,
        lca_visible: Tensor | None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        # y: (B, N, width); reference, pos: (1, N, width), broadcast over the batch. pos None:
        # the positions were added once, to the embedded tokens and reference (authors' code).
        queries = y if pos is None else y + pos
        if self.use_reference:
            assert reference is not None
            keys = reference if pos is None else reference + pos
            lca_values = reference  # (1, N, width): MultiHeadAttention projects it once for the batch
        else:
            keys, lca_values = queries, y
        probs: dict[str, Tensor] = {}
        if return_attention:
            lca_out, probs["lca"] = self.lca(queries, keys, lca_values, lca_visible, return_attention=True)
        else:
            lca_out = self.lca(queries, keys, lca_values, lca_visible)
        mixed = self.alpha * lca_out
        if self.mlka is not None:
            if return_attention:
                mlka_out, probs["mlka"] = self.mlka(queries, keys, y, mlka_visible, return_attention=True)
            else:
                mlka_out = self.mlka(queries, keys, y, mlka_visible)
            mixed = mixed + mlka_out
        if self.residual:
            mixed = mixed + y
        z = self.norm_attention(mixed)
        out = self.norm_ffn(self.ffn(z) + z)
        return (out, probs) if return_attention else out


class LevelReconstructor(nn.Module):
    """The reconstruction network of one feature level: (B, N, C) tokens -> (B, N, C)."""

    def __init__(self, cfg: RLRConfig, channels: int, width: int, grid: tuple[int, int], window: int):
        super().__init__()
        height, grid_width = grid
        self.grid = grid
        self.window = window
        local = neighbourhood_mask(height, grid_width, window)
        if cfg.mlka and not bool((~local).any(dim=1).all()):
            raise ValueError(
                f"RLR: window {window} masks the whole {height}×{grid_width} grid for MLKA; "
                f"set window_sizes[{max(grid)}] ≤ {max_masked_window(max(grid))} (or mlka: false)"
            )
        # Masks are shared by all blocks of the level (True = may attend), never checkpointed.
        self.register_buffer("mlka_visible", ~local if cfg.mlka else None, persistent=False)
        self.register_buffer("lca_visible", local if cfg.lca_local else None, persistent=False)
        self.register_buffer(
            "pos", sincos_2d_position_embedding(height, grid_width, width)[None], persistent=False
        )
        hidden = int(round(width * cfg.ffn_ratio))
        self.positions_once = cfg.embedding == "linear"
        if self.positions_once:
            self.input_embed: nn.Module = nn.Linear(channels, width)
        else:
            self.input_embed = Mlp(channels, hidden, width, drop=cfg.dropout)
        if cfg.output_head == "norm_linear":
            self.output_head: nn.Module = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, channels))
        else:
            self.output_head = Mlp(width, hidden, channels, drop=cfg.dropout)
        # The "self" ablation never reads the reference: leave it out so that DDP sees no
        # parameter without a gradient. With the linear embedding the reference lives in
        # feature space and has its own embedding layer (authors' code).
        use_reference = cfg.attention == "cross"
        reference_width = channels if self.positions_once else width
        self.reference = nn.Parameter(torch.randn(height * grid_width, reference_width)) if use_reference else None
        self.reference_embed = nn.Linear(channels, width) if use_reference and self.positions_once else None
        self.blocks = nn.ModuleList(
            RLRBlock(
                width,
                cfg.heads,
                cfg.ffn_ratio,
                cfg.alpha,
                use_mlka=cfg.mlka,
                use_reference=use_reference,
                residual=cfg.attention_residual,
                dropout=cfg.dropout,
            )
            for _ in range(cfg.num_blocks)
        )

    def forward(self, tokens: Tensor, return_attention: bool = False):
        y = self.input_embed(tokens)
        reference = self.reference[None] if self.reference is not None else None
        block_pos: Tensor | None = self.pos
        if self.positions_once:
            y = y + self.pos
            if reference is not None:
                assert self.reference_embed is not None
                reference = self.reference_embed(reference) + self.pos
            block_pos = None
        attentions: list[dict[str, Tensor]] = []
        for block in self.blocks:
            if return_attention:
                y, probs = block(y, reference, block_pos, self.mlka_visible, self.lca_visible, return_attention=True)
                attentions.append(probs)
            else:
                y = block(y, reference, block_pos, self.mlka_visible, self.lca_visible)
        out = self.output_head(y)
        return (out, attentions) if return_attention else out


# -- the method ------------------------------------------------------------------------


def _level_map(reconstruction: Tensor, target: Tensor) -> Tensor:
    """(B, N, C) pair -> (B, N): mean_c (F_out − F)² + (1 − cos)."""
    squared = (reconstruction - target).pow(2).mean(dim=-1)
    cosine = F.cosine_similarity(reconstruction, target, dim=-1)
    return squared + (1.0 - cosine)


class RLR(AnomalyModel):
    name = "rlr"
    config_class = RLRConfig

    def __init__(self, cfg: RLRConfig, backbone: nn.Module):
        super().__init__(cfg, backbone)
        if cfg.attention not in ATTENTION_KINDS:
            raise ValueError(f"RLR: attention must be one of {ATTENTION_KINDS}, got {cfg.attention!r}")
        channels = list(backbone.channels)
        if len(cfg.widths) != len(channels):
            raise ValueError(
                f"RLR: widths {cfg.widths} must give one width per feature level ({len(channels)} layers {cfg.layers})"
            )
        self.window_sizes = {int(k): int(v) for k, v in cfg.window_sizes.items()}
        self.grids = self._probe_grids(cfg.image_size)
        self.levels = nn.ModuleList(
            LevelReconstructor(cfg, c, w, grid, self.window_for(grid))
            for c, w, grid in zip(channels, cfg.widths, self.grids)
        )

    @torch.no_grad()
    def _probe_grids(self, image_size: int) -> list[tuple[int, int]]:
        # Run the backbone once: padding conventions ("same" vs symmetric) decide the grid.
        param = next(self.backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        probe = torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype)
        return [(int(f.shape[-2]), int(f.shape[-1])) for f in self.backbone(probe).features]

    def window_for(self, grid: tuple[int, int]) -> int:
        side = max(grid)
        return self.window_sizes.get(side, window_for_grid(side))

    # -- features ------------------------------------------------------------------------
    def extract(self, images: Tensor) -> tuple[Tensor, ...]:
        """Clean backbone features, locally averaged: one (B, C, h, w) map per level."""
        features = self.backbone(images).features
        k = self.cfg.aggregation_kernel
        if k > 1:
            features = [F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False) for f in features]
        return tuple(features)

    def reconstruct(self, features: tuple[Tensor, ...] | list[Tensor], jitter: bool = False) -> list[tuple[Tensor, Tensor]]:
        """Per level (target tokens, reconstructed tokens), each (B, N, C)."""
        pairs = []
        for level, feature in zip(self.levels, features):
            # A static shape check; skipped while tracing for export, where it is constant.
            if not torch.jit.is_tracing() and tuple(feature.shape[-2:]) != level.grid:
                raise ValueError(
                    f"RLR: feature grid {tuple(feature.shape[-2:])} differs from the trained {level.grid}; "
                    f"feed images of image_size={self.cfg.image_size}"
                )
            target = feature.flatten(2).transpose(1, 2)
            source = feature_jitter(target, self.cfg.jitter_scale, self.cfg.jitter_prob) if jitter else target
            pairs.append((target, level(source)))
        return pairs

    # -- the interface ---------------------------------------------------------------------
    def training_step(self, batch: Batch, progress: float) -> dict[str, Tensor]:
        features = self.cached(batch.get("index"), batch["image"], self.extract)
        if isinstance(features, Tensor):
            features = (features,)
        losses: dict[str, Tensor] = {}
        total = None
        for i, (target, rec) in enumerate(self.reconstruct(features, jitter=self.cfg.jitter and self.training)):
            mse = F.mse_loss(rec, target)
            cos = (1.0 - F.cosine_similarity(rec, target, dim=-1)).mean()
            level_loss = mse + cos
            losses[f"loss_level{i}"] = level_loss
            total = level_loss if total is None else total + level_loss
        assert total is not None
        return {"loss": total, **losses}

    def raw_map(self, images: Tensor) -> Tensor:
        """(B, H, W) anomaly map before smoothing: per-level maps upsampled to the input size
        and averaged over levels."""
        features = self.extract(images)
        size = (self.cfg.image_size, self.cfg.image_size)  # inputs are image_size (grid check)
        maps = []
        for feature, (target, rec) in zip(features, self.reconstruct(features)):
            level = _level_map(rec, target).unflatten(1, feature.shape[-2:])[:, None]
            maps.append(F.interpolate(level, size=size, mode="bilinear", align_corners=False))
        return torch.stack(maps).mean(dim=0)[:, 0]

    @torch.no_grad()
    def predict(self, images: Tensor, batch: Batch | None = None) -> Prediction:
        raw = self.raw_map(images)
        maps, scores = postprocess(raw, self.cfg.image_size, self.cfg.smoothing_sigma, self.cfg.score_pool,
                                   self.cfg.score_sigma)
        return Prediction(maps=maps, scores=scores)

    def configure_optimizers(self, total_steps: int) -> list[tuple[torch.optim.Optimizer, Any]]:
        # One Adam per level: each reconstruction network is trained on its own loss only
        # (the total is a sum of independent terms, so its gradient per level is exactly
        # that level's), and per-level optimiser state keeps the steps independent.
        lr = schedule_of(self.cfg)["lr"]
        pairs = []
        for level in self.levels:
            optimizer = torch.optim.Adam([p for p in level.parameters() if p.requires_grad], lr=lr,
                                         weight_decay=self.cfg.weight_decay)
            pairs.append((optimizer, self.lr_scheduler(optimizer, total_steps)))
        return pairs
