"""OneNIP: reconstruct (and restore) features with One Normal Image Prompt (Gao, ECCV 2024).

Pipeline (spec: METHODS.md "OneNIP"; paper: papers/002_ac5f695ae58b1165.txt):

1. Frozen CNN Φ (EfficientNet-b4, stride-2/4/8/16 maps) → every map resized to the token grid
   ``image_size / feature_stride`` (bilinear, align_corners=True, as the authors' neck; or
   ``feature_resize: area``) and concatenated: F (B, 272, 14, 14) at 224 px.
2. A transformer over the h·w tokens (linear 272→256, learned position embedding added to
   queries and keys of every attention, DETR style):
   - encoder: self-attention layers shared by target and prompt tokens;
   - decoder (``bidirectional``, Eq. 3): per block prompt→target cross-attention (prompt
     tokens are the queries, each masked from the k×k neighbourhood of its own position), MLP,
     target→prompt cross-attention; then a final prompt→target attention. The prompt stream
     is the reconstruction F̂ (output linear 256→272).
     ``unidirectional`` (Eq. 2, the "static prompt" ablation): UniAD's layer-wise query
     decoder whose queries are the encoded prompt p_e in every block.
3. Restoration stream: features Fᵃ of a synthetic anomaly image restored with the same
   prompt, L_res = MSE(F̂ᵃ, Fⁿ).
4. Refiner on E = |F − F̂|: 2 × [conv3×3 – BN – ReLU – ConvTranspose 2×], conv1×1, sigmoid,
   resized to the mask; Dice loss against the synthetic mask (all-zero for normal images).
5. Loss ½(L_rec + L_res) + λ·L_dice (one MSE over the stacked normal and synthetic samples,
   as the authors' code; the paper's L_rec + L_res with ``reconstruction_loss: sum``).

Inference: the prompt is the pool entry (one normal training image per category) of the test
image's known category when the batch names one the pool holds (``prompt_selection: auto``,
the default: a labelled test split as the authors' code; ``class`` insists on it), else the
entry whose pooled features are most cosine-similar to the test image's (the paper's §3.5;
``similarity`` always). S = (1 − α)·S_rec' + α·M̂ with S_rec = ‖F − F̂‖₂ min-max scaled
by the statistics of normal *training* images (``fusion_norm: train``, stored in the
checkpoint) — or, only when asked for (``fusion_norm: transductive``, the authors' code), by
the min and max of the maps being predicted in the same ``predict`` call (a test-set statistic:
results then depend on what is predicted together; the authors take min / max over the whole
test set and weight M̂ by the mid-range of S_rec instead of min-max scaling S_rec, which ranks
pixels in a similar but not identical way). Image score = max of the average-pooled S; maps
are not smoothed (the authors' evaluation; ``smoothing_sigma`` > 0 smooths them).

Official code vs paper (METHODS.md "OneNIP"), defaults follow the code, each paper variant is
a config value:

- backbone ``tf_efficientnet_b4.aa_in1k`` (the TF-ported AutoAugment weights, "same" padding),
  not timm's bare ``efficientnet_b4`` (a different network's weights);
- ``feature_resize: bilinear`` (align_corners=True) | ``area`` (this module's earlier default);
- ``smoothing_sigma: 0`` | 4 (the spec's common σ);
- ``reconstruction_loss: stacked`` (½(L_rec + L_res)) | ``sum`` (paper);
- ``dice_overlap_weight: 1`` (Dice numerator Σp·t + s) | 2 (paper Eq. 7);
- ``ffn_inner_dropout: false`` (no dropout between the FFN's layers) | true;
- ``refiner_init: xavier`` (xavier-uniform refiner convolutions) | ``default`` (PyTorch's);
- ``prompt_selection: auto`` (class on labelled data, similarity otherwise) | ``similarity`` | ``class``;
- ``fusion_norm: train`` stays the default (the code's transductive statistic is ``transductive``);
- recipes: ``paper`` = 1000 epochs, batch 64, AdamW lr 1e-4 (not scaled with the batch), ×0.1
  at 80 % of the steps; ``fast`` = a short warm-up + cosine schedule (:data:`ONENIP_RECIPES`).

Where the paper is silent the defaults follow the authors' code (gaobb/OneNIP): post-norm
layers with ReLU FFNs, a row/column learned position embedding initialised uniform in [0, 1),
xavier-uniform linear layers, the neighbourhood mask also in the encoder and in the
target→prompt attention, no mask on the final attention, feature jitter (scale 20) on the
training tokens (target and prompt), Dice smoothing 1, and a
synthetic defect on every training image (:attr:`OneNIP.pseudo_anomaly_probability`).
One deliberate difference: the authors' decoder block adds its MLP output (not the
target→prompt attention output) to the target stream, which leaves that attention unused; here
the target stream is updated with the attention output, as Eq. 3 of the paper says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agp_models.base import AnomalyModel, BackboneConfig, Batch, MethodConfig, Prediction
from agp_models.layers import Dropout, MultiHeadAttention, neighbourhood_mask, resize_to_grid
from agp_models.postprocess import postprocess
from agp_models.recipes import Recipe, schedule_of

__all__ = ["ONENIP_RECIPES", "OneNIP", "OneNIPConfig", "Refiner", "dice_loss", "onenip_attention_mask"]

ONENIP_RECIPES: dict[str, Recipe] = {
    "paper": Recipe(epochs=1000, batch_size=64, lr=1e-4, lr_schedule="step", lr_drop_at=0.8, lr_drop_factor=0.1,
                    source="paper §4.1 and gaobb/OneNIP: AdamW 1e-4, batch 64, 1000 epochs, ×0.1 at epoch 800"),
    "fast": Recipe(epochs=20, batch_size=16, lr=4e-4, lr_schedule="cosine", warmup_fraction=0.05,
                   source="short budget: warm-up 5 %, cosine; see README 'Accuracy'"),
}

_CATEGORY_SEPARATOR = 0  # NUL byte between category names in the uint8 pool buffer


@dataclass(kw_only=True)
class OneNIPConfig(MethodConfig):
    recipes: ClassVar[dict[str, Recipe]] = ONENIP_RECIPES

    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="tf_efficientnet_b4.aa_in1k"))
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # timm out_indices: strides 2/4/8/16
    image_size: int = 224
    feature_stride: int = 16  # token grid = image_size / feature_stride (14×14 at 224 px)
    # How each backbone map reaches the token grid: bilinear with align_corners=True (authors'
    # neck) | area (average over the covered pixels when shrinking).
    feature_resize: Literal["bilinear", "area"] = "bilinear"
    smoothing_sigma: float = 0.0  # authors' evaluation: unsmoothed maps
    width: int = 256
    heads: int = 8
    ffn: int = 1024
    dropout: float = 0.1
    ffn_inner_dropout: bool = False  # authors' code: no dropout between the FFN's two layers
    encoder_depth: int = 4
    decoder_depth: int = 4
    # Side of the square token window a query must not see around its own position. The
    # paper uses 7 at 224 px (14×14 tokens), i.e. image_size / 32 = half the token grid: keep
    # that ratio at other sizes (256 → 8, 320 → 10). The window reaches size // 2 tokens to
    # each side (as in the authors' code), so an even size acts like the next odd one.
    neighbourhood_size: int = 7
    mask_encoder: bool = True  # authors' code masks the encoder self-attention too
    mask_final_attention: bool = False  # authors' code: the final prompt→target attention is unmasked
    feature_jitter: float = 20.0  # UniAD jitter on training tokens: N(0,1)·‖f‖/C·scale; 0 = off
    feature_jitter_prob: float = 1.0
    decoder: str = "bidirectional"  # bidirectional (dynamic prompt) | unidirectional (static prompt)
    restoration: bool = True  # restoration stream + L_res
    refiner: bool = True  # supervised refiner + Dice loss; off: S = S_rec
    refiner_channels: int = 128
    refiner_init: Literal["xavier", "default"] = "xavier"  # authors' code: xavier-uniform convolutions
    # stacked: one MSE over the normal and synthetic samples together = ½(L_rec + L_res) (code);
    # sum: L_rec + L_res (paper).
    reconstruction_loss: Literal["stacked", "sum"] = "stacked"
    lam: float = 0.5  # λ, weight of the Dice loss
    dice_smooth: float = 1.0  # Laplace smoothing of the Dice ratio (authors' code: 1)
    dice_overlap_weight: float = 1.0  # Dice numerator w·Σp·t + s: authors' code 1, paper Eq. 7: 2
    fusion_alpha: float = 0.5  # α in S = (1 − α)·S_rec + α·M̂
    fusion_norm: str = "train"  # train | transductive
    # auto: the batch's known category when the pool holds it (authors' code on a labelled test
    # split), else similarity (paper §3.5, unlabelled images) | similarity | class
    prompt_selection: str = "auto"
    grad_clip_norm: float = 0.1  # authors' code (UniAD lineage): clip_max_norm 0.1

    def __post_init__(self) -> None:
        choices = {
            "decoder": ("bidirectional", "unidirectional"),
            "fusion_norm": ("train", "transductive"),
            "prompt_selection": ("auto", "similarity", "class"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"onenip.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.image_size % self.feature_stride != 0:
            raise ValueError(
                f"onenip.image_size {self.image_size} must be a multiple of feature_stride {self.feature_stride}"
            )
        if self.width % self.heads != 0:
            raise ValueError(f"onenip.width {self.width} must be divisible by heads {self.heads}")
        if not 0.0 <= self.fusion_alpha <= 1.0:
            raise ValueError(f"onenip.fusion_alpha must be in [0, 1], got {self.fusion_alpha}")
        if self.neighbourhood_size < 0:
            raise ValueError("onenip.neighbourhood_size must be >= 0 (0 = no mask)")


# -- pieces ----------------------------------------------------------------------------------
def dice_loss(pred: Tensor, target: Tensor, smooth: float = 1.0, overlap_weight: float = 2.0) -> Tensor:
    """Dice loss of Eq. 7 with Laplace smoothing, per sample, averaged over the batch:

        1 − (w·Σ p·t + s) / (Σ p² + Σ t² + s),  w = ``overlap_weight`` (Eq. 7: 2; authors' code: 1)

    ``pred``: probabilities, ``target``: 0/1 mask, same shape (B, …). With ``s > 0`` an
    all-zero target predicted as all zero costs 0 (a normal image predicted clean), while any
    predicted mass on a normal image costs ``1 − s / (Σ p² + s)``.
    """
    pred = pred.reshape(pred.shape[0], -1).float()
    target = target.reshape(target.shape[0], -1).float()
    overlap = (pred * target).sum(dim=1)
    total = pred.pow(2).sum(dim=1) + target.pow(2).sum(dim=1)
    return (1.0 - (overlap_weight * overlap + smooth) / (total + smooth)).mean()


def onenip_attention_mask(grid: tuple[int, int], size: int, device: torch.device | None = None) -> Tensor | None:
    """Bool (h·w, h·w), True = may attend: query i must not see the size×size window at i.

    ``size`` 0 means no mask (None). Window radius is ``size // 2``.
    """
    if size <= 0:
        return None
    h, w = grid
    allowed = ~neighbourhood_mask(h, w, 2 * (size // 2) + 1, device=device)
    if not bool(allowed.any(dim=1).all()):
        raise ValueError(
            f"onenip.neighbourhood_size {size} hides the whole {h}×{w} token grid from some token; "
            f"use a size below {max(h, w)} (about image_size / 32)"
        )
    return allowed


class _FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float):
        # ``dropout`` here is between the two layers (0 in the authors' code).
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.relu(self.fc1(x))))


class _CrossAttention(nn.Module):
    """Post-norm residual attention: ``norm(q + drop(attn(q + pos, k + pos, k)))``."""

    def __init__(self, width: int, heads: int, dropout: float, norm: bool = True):
        super().__init__()
        self.attn = MultiHeadAttention(width, heads, attn_drop=dropout)
        self.drop = Dropout(dropout)
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()

    def forward(self, query: Tensor, key: Tensor, pos: Tensor, mask: Tensor | None) -> Tensor:
        attended = self.attn(query + pos, key + pos, key, attn_mask=mask)
        return self.norm(query + self.drop(attended))


class _FeedForwardBlock(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float, inner_dropout: float = 0.0):
        super().__init__()
        self.ffn = _FeedForward(width, hidden, inner_dropout)
        self.drop = Dropout(dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.drop(self.ffn(x)))


class _EncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, dropout: float, inner_dropout: float = 0.0):
        super().__init__()
        self.self_attn = _CrossAttention(width, heads, dropout)
        self.ffn = _FeedForwardBlock(width, hidden, dropout, inner_dropout)

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor | None) -> Tensor:
        return self.ffn(self.self_attn(x, x, pos, mask))


class _BidirectionalBlock(nn.Module):
    """Eq. 3: p ← attn(p → x) (masked), MLP; x ← attn(x → p)."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float, inner_dropout: float = 0.0):
        super().__init__()
        self.prompt_to_target = _CrossAttention(width, heads, dropout)
        self.mlp = _FeedForwardBlock(width, hidden, dropout, inner_dropout)
        self.target_to_prompt = _CrossAttention(width, heads, dropout)

    def forward(self, prompt: Tensor, target: Tensor, pos: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        prompt = self.mlp(self.prompt_to_target(prompt, target, pos, mask))
        target = self.target_to_prompt(target, prompt, pos, mask)
        return prompt, target


class _UnidirectionalBlock(nn.Module):
    """Eq. 2 (UniAD's layer-wise query decoder, query = static prompt p_e):
    q' = attn(p_e → x_e); x_d ← FFN(attn(q' → x_d))."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float, inner_dropout: float = 0.0):
        super().__init__()
        self.prompt_to_memory = _CrossAttention(width, heads, dropout)
        self.query_to_stream = _CrossAttention(width, heads, dropout)
        self.ffn = _FeedForwardBlock(width, hidden, dropout, inner_dropout)

    def forward(self, prompt: Tensor, memory: Tensor, stream: Tensor, pos: Tensor, mask: Tensor | None) -> Tensor:
        query = self.prompt_to_memory(prompt, memory, pos, mask)
        return self.ffn(self.query_to_stream(query, stream, pos, mask))


class RowColumnPositionEmbedding(nn.Module):
    """Learned 2-D position embedding as in the authors' code (DETR's learned variant): a row
    table (h, D/2) and a column table (w, D/2), initialised uniform in [0, 1); token (i, j)
    gets [column j ; row i]. The large, all-positive initial values make positions clearly
    distinguishable to the attention from the first step."""

    def __init__(self, grid: tuple[int, int], dim: int):
        super().__init__()
        self.grid = grid
        self.row = nn.Parameter(torch.rand(grid[0], dim // 2))
        self.column = nn.Parameter(torch.rand(grid[1], dim - dim // 2))

    def table(self) -> Tensor:
        h, w = self.grid
        rows = self.row.unsqueeze(1).expand(h, w, -1)
        columns = self.column.unsqueeze(0).expand(h, w, -1)
        return torch.cat([columns, rows], dim=-1).reshape(1, h * w, -1)


class PromptTransformer(nn.Module):
    """(target features, prompt features) (B, C, h, w) each → reconstruction F̂ (B, C, h, w)."""

    def __init__(self, cfg: OneNIPConfig, channels: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.bidirectional = cfg.decoder == "bidirectional"
        self.mask_encoder = cfg.mask_encoder
        self.mask_final = cfg.mask_final_attention
        self.jitter, self.jitter_prob = cfg.feature_jitter, cfg.feature_jitter_prob
        width, heads, hidden, drop = cfg.width, cfg.heads, cfg.ffn, cfg.dropout
        inner = drop if cfg.ffn_inner_dropout else 0.0
        self.input_proj = nn.Linear(channels, width)
        self.pos_embed = RowColumnPositionEmbedding(grid, width)
        self.encoder = nn.ModuleList(_EncoderLayer(width, heads, hidden, drop, inner)
                                     for _ in range(cfg.encoder_depth))
        block = _BidirectionalBlock if self.bidirectional else _UnidirectionalBlock
        self.decoder = nn.ModuleList(block(width, heads, hidden, drop, inner) for _ in range(cfg.decoder_depth))
        # final prompt→target attention (bidirectional) / output norm (both)
        self.final_attention = _CrossAttention(width, heads, drop, norm=False) if self.bidirectional else None
        self.final_norm = nn.LayerNorm(width)
        self.output_proj = nn.Linear(width, channels)
        self.register_buffer("attention_mask", onenip_attention_mask(grid, cfg.neighbourhood_size), persistent=False)
        for module in self.modules():  # authors: xavier_uniform for every linear layer
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _jitter(self, tokens: Tensor) -> Tensor:
        """UniAD feature jitter: Gaussian noise scaled by each token's norm / C (training only)."""
        if not self.training or self.jitter <= 0 or float(torch.rand(())) > self.jitter_prob:
            return tokens
        scale = tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1] * self.jitter
        return tokens + torch.randn_like(tokens) * scale

    def forward(self, target: Tensor, prompt: Tensor) -> Tensor:
        """``prompt`` may hold fewer samples than ``target`` when ``target`` is several
        streams stacked (normal + synthetic): it is repeated to match."""
        b_target, channels, h, w = target.shape
        tokens = torch.cat([target, prompt], dim=0).flatten(2).transpose(1, 2)  # (Bt+Bp, N, C)
        tokens = self.input_proj(self._jitter(tokens))
        pos = self.pos_embed.table().to(tokens.dtype)
        mask = self.attention_mask
        for layer in self.encoder:  # shared by target and prompt tokens
            tokens = layer(tokens, pos, mask if self.mask_encoder else None)
        x, p = tokens[:b_target], tokens[b_target:]
        if p.shape[0] != b_target:
            p = p.repeat(b_target // p.shape[0], 1, 1)
        if self.bidirectional:
            for block in self.decoder:
                p, x = block(p, x, pos, mask)
            out = self.final_attention(p, x, pos, mask if self.mask_final else None)
        else:
            out = x
            for block in self.decoder:
                out = block(p, x, out, pos, mask)
        out = self.output_proj(self.final_norm(out))
        return out.transpose(1, 2).reshape(b_target, channels, h, w)


class Refiner(nn.Module):
    """E = |F − F̂| (B, C, h, w) → anomaly logits (B, 1, 4h, 4w):
    2 × [conv3×3 – BN – ReLU – ConvTranspose2d(2, stride 2)], then conv1×1 → 1 channel."""

    def __init__(self, in_channels: int, channels: int = 128, blocks: int = 2, init: str = "default"):
        super().__init__()
        stages = []
        for k in range(blocks):
            stages += [
                nn.Conv2d(in_channels if k == 0 else channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
            ]
        self.body = nn.Sequential(*stages)
        self.head = nn.Conv2d(channels, 1, kernel_size=1)
        if init == "xavier":  # authors' code: xavier-uniform weights, zero biases
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                    nn.init.xavier_uniform_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    def forward(self, errors: Tensor) -> Tensor:
        return self.head(self.body(errors))


def _encode_names(names: list[str]) -> Tensor:
    data = bytes([_CATEGORY_SEPARATOR]).join(n.encode("utf-8") for n in names)
    return torch.tensor(list(data), dtype=torch.uint8)


def _decode_names(buffer: Tensor, count: int) -> list[str]:
    if count == 0:
        return []
    return bytes(buffer.cpu().tolist()).decode("utf-8").split(chr(_CATEGORY_SEPARATOR))


# -- the method ------------------------------------------------------------------------------
class OneNIP(AnomalyModel):
    name = "onenip"
    config_class = OneNIPConfig
    batch_extras = frozenset({"pseudo_anomaly", "prompt"})
    # The authors' data pipeline gives every training image a synthetic defect (the normal
    # stream already supplies the all-zero masks); a trainer building the pseudo-anomaly
    # extra should use this as SynthesisConfig.probability.
    pseudo_anomaly_probability: ClassVar[float] = 1.0

    _POOL_BUFFERS = ("pool_features", "pool_descriptors", "pool_category_bytes")

    def __init__(self, cfg: OneNIPConfig, backbone: nn.Module):
        super().__init__(cfg, backbone)
        self.cfg: OneNIPConfig = cfg
        side = cfg.image_size // cfg.feature_stride
        self.grid = (side, side)
        self.channels = int(sum(backbone.channels))
        self.transformer = PromptTransformer(cfg, self.channels, self.grid)
        self.refiner = Refiner(self.channels, cfg.refiner_channels, init=cfg.refiner_init) if cfg.refiner else None
        # Inference state (filled by fit_inference_state, saved in the checkpoint).
        self.register_buffer("pool_features", torch.zeros(0, self.channels, side, side))
        self.register_buffer("pool_descriptors", torch.zeros(0, self.channels))
        self.register_buffer("pool_category_bytes", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("rec_low", torch.tensor(0.0))
        self.register_buffer("rec_high", torch.tensor(1.0))

    # -- features ------------------------------------------------------------------------
    def extract(self, images: Tensor) -> Tensor:
        """Concatenated multi-level backbone features on the token grid, (B, C, h, w) float32."""
        with torch.no_grad():
            out = self.backbone(images)
            if self.cfg.feature_resize == "bilinear":
                maps = [F.interpolate(f.float(), size=self.grid, mode="bilinear", align_corners=True)
                        for f in out.features]
            else:
                maps = [resize_to_grid(f.float(), self.grid) for f in out.features]
            return torch.cat(maps, dim=1)

    def reconstruct(self, target: Tensor, prompt: Tensor) -> Tensor:
        return self.transformer(target, prompt)

    def refine(self, errors: Tensor, size: tuple[int, int]) -> Tensor:
        """Refiner probabilities resized (bilinearly, as logits) to ``size``: (B, 1, *size)."""
        assert self.refiner is not None
        logits = self.refiner(errors)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)

    # -- training ------------------------------------------------------------------------
    def _require(self, batch: Batch, key: str, extra: str) -> Tensor:
        if key not in batch:
            raise KeyError(f"onenip needs batch[{key!r}]: build the training data with extras {{'{extra}'}}")
        return batch[key]

    def training_step(self, batch: Batch, progress: float) -> dict[str, Tensor]:
        cfg = self.cfg
        images = batch["image"]
        b = images.shape[0]
        normal = self.cached(batch.get("index"), images, self.extract)
        prompt_images = self._require(batch, "prompt_image", "prompt")
        # The prompt is another clean training image: cacheable by its dataset index when given.
        prompt = self.cached(batch.get("prompt_index"), prompt_images, self.extract)

        with_anomaly = cfg.restoration or cfg.refiner
        if with_anomaly:
            anomaly_images = self._require(batch, "anomaly_image", "pseudo_anomaly")
            anomaly_masks = self._require(batch, "anomaly_mask", "pseudo_anomaly").float()
            anomalous = anomaly_masks.flatten(1).amax(dim=1) > 0
            synthetic = normal.clone()  # samples without a pasted defect are their clean self
            picked = anomalous.nonzero().flatten()
            if picked.numel() > 0:
                synthetic[picked] = self.extract(anomaly_images[picked])
            targets = torch.cat([normal, synthetic], dim=0)
        else:
            targets = normal

        recon = self.reconstruct(targets, prompt)
        zero = recon.new_zeros(())
        loss_rec = F.mse_loss(recon[:b], normal)
        loss_res = F.mse_loss(recon[b:], normal) if cfg.restoration else zero
        # Both streams hold b samples, so the code's one MSE over all 2b is their mean.
        reconstruction = 0.5 * (loss_rec + loss_res) if cfg.reconstruction_loss == "stacked" and cfg.restoration \
            else loss_rec + loss_res
        loss_dice = zero
        if self.refiner is not None:
            size = tuple(anomaly_masks.shape[-2:])
            pred = self.refine((targets - recon).abs(), size)
            truth = torch.cat([torch.zeros_like(anomaly_masks), anomaly_masks], dim=0)
            loss_dice = dice_loss(pred, truth, cfg.dice_smooth, cfg.dice_overlap_weight)
        loss = reconstruction + cfg.lam * loss_dice
        return {"loss": loss, "loss_rec": loss_rec.detach(), "loss_res": loss_res.detach(),
                "loss_dice": loss_dice.detach()}

    def configure_optimizers(self, total_steps: int) -> list[tuple[torch.optim.Optimizer, Any]]:
        params = self.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=schedule_of(self.cfg)["lr"], weight_decay=self.cfg.weight_decay)
        return [(optimizer, self.lr_scheduler(optimizer, total_steps))]

    # -- inference state -------------------------------------------------------------------
    @property
    def pool_categories(self) -> list[str]:
        return _decode_names(self.pool_category_bytes, int(self.pool_features.shape[0]))

    @staticmethod
    def _descriptor(features: Tensor) -> Tensor:
        return F.normalize(features.mean(dim=(2, 3)), dim=1)

    def select_prompts(self, features: Tensor, batch: Batch | None = None) -> Tensor:
        """Pool index per sample (B,): the sample's own category with ``prompt_selection: class``
        (and with ``auto`` when the batch names categories the pool holds), else the highest
        cosine similarity of spatially pooled features."""
        if self.pool_features.shape[0] == 0:
            raise RuntimeError("onenip has no prompt pool: call fit_inference_state(normal training batches) first")
        selection = self.cfg.prompt_selection
        if selection == "auto":
            known = batch is not None and "category" in batch and all(c in self.pool_categories for c in batch["category"])
            selection = "class" if known else "similarity"
        if selection == "class":
            if batch is None or "category" not in batch:
                raise ValueError("onenip prompt_selection 'class' needs batch['category'] at prediction time")
            names = self.pool_categories
            unknown = sorted({c for c in batch["category"] if c not in names})
            if unknown:
                raise ValueError(
                    f"onenip: no prompt for categories {unknown}; the prompt pool holds {names}. "
                    "Use prompt_selection 'similarity' or refit the inference state with these categories"
                )
            return torch.tensor([names.index(c) for c in batch["category"]], device=features.device)
        similarity = self._descriptor(features) @ self.pool_descriptors.t()
        return similarity.argmax(dim=1)

    def reconstruction_error(self, images: Tensor, batch: Batch | None = None) -> tuple[Tensor, Tensor]:
        """(F, F̂) for test images with their selected pool prompts."""
        features = self.extract(images)
        prompt = self.pool_features.index_select(0, self.select_prompts(features, batch))
        return features, self.reconstruct(features, prompt)

    @torch.no_grad()
    def fit_inference_state(self, normal_batches: Iterable[Batch]) -> None:
        """Prompt pool (the first normal image of each category met, categories sorted by
        name) and the min / max of S_rec over all normal training pixels (fusion_norm 'train').

        Two passes over ``normal_batches`` (a one-shot iterator is materialised first)."""
        if iter(normal_batches) is normal_batches:  # generator: cannot be iterated twice
            normal_batches = list(normal_batches)
        was_training = self.training
        self.eval()
        try:
            first: dict[str, Tensor] = {}
            for batch in normal_batches:
                missing = [i for i, c in enumerate(batch["category"]) if c not in first]
                if not missing:
                    continue
                device = self.pool_features.device
                features = self.extract(batch["image"][missing].to(device))
                for j, i in enumerate(missing):
                    first.setdefault(batch["category"][i], features[j])
            if not first:
                raise ValueError("onenip.fit_inference_state got no normal images")
            names = sorted(first)
            pool = torch.stack([first[n] for n in names])
            self.pool_features = pool
            self.pool_descriptors = self._descriptor(pool)
            self.pool_category_bytes = _encode_names(names).to(pool.device)

            low, high = float("inf"), float("-inf")
            for batch in normal_batches:
                features, recon = self.reconstruction_error(batch["image"].to(pool.device), batch)
                rec = (features - recon).pow(2).sum(dim=1).sqrt()
                low, high = min(low, float(rec.min())), max(high, float(rec.max()))
            self.rec_low = torch.tensor(low, device=pool.device)
            self.rec_high = torch.tensor(high, device=pool.device)
        finally:
            self.train(was_training)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Pool buffers have a data-dependent first dimension: take the checkpoint's shape.
        for name in self._POOL_BUFFERS:
            key = prefix + name
            if key in state_dict:
                current = getattr(self, name)
                setattr(self, name, torch.empty_like(state_dict[key], device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- prediction --------------------------------------------------------------------
    @torch.no_grad()
    def anomaly_maps(self, images: Tensor, batch: Batch | None = None) -> dict[str, Tensor]:
        """Raw maps at the input resolution (B, H, W), before smoothing:

        ``rec`` — S_rec min-max scaled (train statistics or, transductive, those of these
        images), ``refiner`` — M̂ (absent when the refiner is off), ``fused`` — the final S.
        """
        size = (int(images.shape[-2]), int(images.shape[-1]))
        features, recon = self.reconstruction_error(images, batch)
        rec = (features - recon).pow(2).sum(dim=1).sqrt()  # (B, h, w)
        if self.cfg.fusion_norm == "transductive":
            low, high = rec.min(), rec.max()  # statistics of the maps predicted together
        else:
            low, high = self.rec_low, self.rec_high
        rec = (rec - low) / (high - low).clamp_min(1e-12)
        rec = F.interpolate(rec.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
        out = {"rec": rec}
        if self.refiner is not None:
            refined = self.refine((features - recon).abs(), size).squeeze(1)
            alpha = self.cfg.fusion_alpha
            out["refiner"] = refined
            out["fused"] = (1.0 - alpha) * rec + alpha * refined
        else:
            out["fused"] = rec
        return out

    @torch.no_grad()
    def predict(self, images: Tensor, batch: Batch | None = None) -> Prediction:
        if images.shape[-1] != self.cfg.image_size or images.shape[-2] != self.cfg.image_size:
            raise ValueError(
                f"onenip was built for {self.cfg.image_size}×{self.cfg.image_size} images, got "
                f"{tuple(images.shape[-2:])}"
            )
        raw = self.anomaly_maps(images, batch)["fused"]
        maps, scores = postprocess(raw, self.cfg.image_size, self.cfg.smoothing_sigma, self.cfg.score_pool)
        return Prediction(maps=maps, scores=scores)
