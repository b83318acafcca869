"""Shared transformer pieces for the reconstruction networks of all methods.

Everything here is generic and free of method logic:

- :class:`MultiHeadAttention`: self- or cross-attention with an optional boolean/additive mask,
  using PyTorch's fused ``scaled_dot_product_attention`` unless the attention probabilities
  are asked for (then the explicit softmax is computed — same numbers, up to rounding).
- :class:`Mlp`, :class:`TransformerBlock` (pre-norm ViT block whose forward can also return
  its attention probabilities).
- Position embeddings: :class:`LearnedPositionEmbedding` (2-D grid, resampled when the grid
  changes) and :func:`sincos_2d_position_embedding` (fixed).
- :func:`neighbourhood_mask`: which token pairs lie within a k×k window of each other.
- :func:`dropout` / :class:`Dropout`: dropout whose CPU masks cost a quarter of torch's (see
  :func:`dropout`); every dropout of the methods goes through it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Dropout",
    "LearnedPositionEmbedding",
    "Mlp",
    "MultiHeadAttention",
    "TransformerBlock",
    "dropout",
    "neighbourhood_mask",
    "sincos_2d_position_embedding",
    "torch_dropout_masks",
]


# Dropout masks on the CPU are drawn as 16-bit uniforms, four per 64-bit random word.
_MASK_LEVELS = 1 << 16
_fast_cpu_masks = True


@contextlib.contextmanager
def torch_dropout_masks() -> Iterator[None]:
    """Within the block, CPU dropout draws its masks with torch's own ``bernoulli_`` (the
    random stream of ``F.dropout``), e.g. to replay steps recorded before :func:`dropout`."""
    global _fast_cpu_masks
    previous, _fast_cpu_masks = _fast_cpu_masks, False
    try:
        yield
    finally:
        _fast_cpu_masks = previous


def _draws_cpu_masks(x: Tensor, p: float) -> bool:
    return p > 0.0 and x.device.type == "cpu" and _fast_cpu_masks


def _cpu_drop_mask(shape: torch.Size, p: float) -> tuple[Tensor, float] | None:
    """(bool mask of the elements to drop, scale of the kept ones), or None where 16-bit
    uniforms cannot represent ``p`` (below 1/131072 or above 1 − 1/131072)."""
    threshold = round(p * _MASK_LEVELS)
    if not 0 < threshold < _MASK_LEVELS:
        return None
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    uniforms = words.view(torch.int16)[:count].view(shape)  # each uniform on -32768 .. 32767
    drop = uniforms < threshold - _MASK_LEVELS // 2  # P(drop) = threshold / 65536
    return drop, _MASK_LEVELS / (_MASK_LEVELS - threshold)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout``, with cheaper masks on the CPU.

    Why: torch's CPU dropout draws one double per element through ``bernoulli_``, serially, at
    about 10 ns per element; OneNIP's attention dropout over B·heads·N·N probabilities took a
    quarter of its training step. Here one 64-bit random word gives four elements a 16-bit
    uniform each, and an element is dropped when its uniform falls below p rounded to 1/65536
    (0.1 → 0.1000061); the kept ones are scaled by 1/(1 − that p), so the expectation is
    exactly the input's, as with ``F.dropout``. Same distribution up to that rounding, another
    random stream (still seeded by ``torch.manual_seed``). Other devices use ``F.dropout``
    (fused kernels there).
    """
    if not training or p == 0.0:
        return x
    if _draws_cpu_masks(x, p):
        masked = _cpu_drop_mask(x.shape, p)
        if masked is not None:
            drop, scale = masked
            return torch.where(drop, 0.0, x).mul_(scale)
    return F.dropout(x, p, True)


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout` (same state dict: none)."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def _additive_mask(attn_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Boolean masks follow SDPA's convention (True = may attend); float masks are added."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        zeros = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
        return zeros.masked_fill(~attn_mask, float("-inf"))
    return attn_mask.to(dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head attention: ``query`` attends to ``key``/``value`` (default: itself).

    ``attn_mask``: (Nq, Nk) or broadcastable to (B, heads, Nq, Nk); bool (True = allowed) or
    additive float. With ``return_attention=True`` also returns the probabilities
    (B, heads, Nq, Nk) after softmax (before dropout).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        kv_dim: int | None = None,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        kv_dim = kv_dim or dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = Dropout(proj_drop)

    def _heads(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return x.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        attn_mask: Tensor | None = None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        key = query if key is None else key
        value = key if value is None else value
        B, Nq, C = query.shape
        # Keys/values shared by the whole batch (batch dimension 1, e.g. a learned reference)
        # are projected once and broadcast, not once per image.
        q, k, v = self._heads(self.q(query)), self._heads(self.k(key)), self._heads(self.v(value))
        if k.shape[0] != B:
            k = k.expand(B, -1, -1, -1)
        if v.shape[0] != B:
            v = v.expand(B, -1, -1, -1)
        drop_p = self.attn_drop if self.training else 0.0
        probs: Tensor | None = None
        # SDPA's own dropout on the CPU is torch's bernoulli_ mask (see `dropout`): there the
        # explicit softmax path with our masks is about twice as fast.
        if return_attention or _draws_cpu_masks(q, drop_p):
            logits = (q * self.scale) @ k.transpose(-2, -1)
            mask = _additive_mask(attn_mask, logits.dtype)
            if mask is not None:
                logits = logits + mask
            probs = logits.softmax(dim=-1)
            out = dropout(probs, drop_p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop_p)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, Nq, C)))
        return (out, probs) if return_attention else out  # type: ignore[return-value]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)
        self.drop = Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + Attn(LN(x)), then x + MLP(LN(x)).

    ``forward(x, return_attention=True)`` returns ``(x, probs)`` with probs (B, heads, N, N).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiHeadAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        if return_attention:
            attended, probs = self.attn(self.norm1(x), attn_mask=attn_mask, return_attention=True)
        else:
            attended, probs = self.attn(self.norm1(x), attn_mask=attn_mask), None
        x = x + attended
        x = x + self.mlp(self.norm2(x))
        return (x, probs) if return_attention else x  # type: ignore[return-value]


class LearnedPositionEmbedding(nn.Module):
    """Learned (1, h*w, dim) embedding for a token grid, added to row-major tokens.

    A different grid at run time (other image size) gets the table resampled bicubically.
    """

    def __init__(self, grid: tuple[int, int], dim: int, init_std: float = 0.02):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.weight = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim))
        nn.init.trunc_normal_(self.weight, std=init_std)

    def table(self, grid: tuple[int, int]) -> Tensor:
        if tuple(grid) == self.grid:
            return self.weight
        h0, w0 = self.grid
        dim = self.weight.shape[-1]
        as_map = self.weight.reshape(1, h0, w0, dim).permute(0, 3, 1, 2)
        resized = F.interpolate(as_map, size=tuple(grid), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)

    def forward(self, tokens: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        return tokens + self.table(grid or self.grid).to(tokens.dtype)


def sincos_2d_position_embedding(h: int, w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sin-cos embedding (h*w, dim): half the channels encode y, half x (MAE style)."""
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out_y = ys.reshape(-1, 1) * omega.reshape(1, -1)
    out_x = xs.reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)


def neighbourhood_mask(h: int, w: int, size: int, device: torch.device | None = None) -> Tensor:
    """Bool (h*w, h*w): True where token j lies in the size×size window centred on token i.

    ``size`` is odd (3, 5, 7 …); use ``~mask`` to forbid a token from seeing its neighbourhood.
    """
    if size % 2 != 1:
        raise ValueError(f"neighbourhood size must be odd, got {size}")
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    radius = size // 2
    return ((ys[:, None] - ys[None, :]).abs() <= radius) & ((xs[:, None] - xs[None, :]).abs() <= radius)


def resize_to_grid(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) → (B, C, *size): area average when shrinking (every input pixel counts),
    bilinear when growing.

    The spatial sizes are read as Python ints: while tracing for export they are constants
    (the image size is fixed), so the pooling kernel is static and ONNX keeps a dynamic batch.
    """
    height, width = int(x.shape[-2]), int(x.shape[-1])
    if (height, width) == tuple(size):
        return x
    fy, fx = height // size[0], width // size[1]
    if fy >= 1 and fx >= 1 and height == fy * size[0] and width == fx * size[1]:
        return F.avg_pool2d(x, kernel_size=(fy, fx))  # exact factor: the same as adaptive pooling
    if height >= size[0] and width >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
