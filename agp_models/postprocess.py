"""Post-processing shared by every method's ``predict``: raw maps -> evaluation maps + scores.

raw (B, h, w) --bilinear--> (B, S, S) --Gaussian σ--> maps (pixel metrics)
                                     --Gaussian σ_score--> --pool + max--> scores (B,)

Everything here is plain torch on tensors with no Python branching on tensor *values*
(only on shapes and on the Python numbers ``sigma``/``pool``), so it traces into ONNX and
TorchScript unchanged.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["upsample", "gaussian_kernel1d", "gaussian_smooth", "image_scores", "postprocess"]

GAUSSIAN_TRUNCATE = 4.0  # kernel radius = round(4σ), as scipy.ndimage.gaussian_filter


def _size_pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def upsample(maps: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False) of (B, h, w) maps to (B, size, size) or (B, H, W)."""
    resized = F.interpolate(
        maps.unsqueeze(1), size=_size_pair(size), mode="bilinear", align_corners=False
    )
    return resized.squeeze(1)


def gaussian_kernel1d(sigma: float, truncate: float = GAUSSIAN_TRUNCATE) -> Tensor:
    """Normalised 1-D Gaussian of radius ``int(truncate * sigma + 0.5)`` (scipy's rule), float64."""
    radius = int(truncate * float(sigma) + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / float(sigma)) ** 2)
    return weights / weights.sum()


def _symmetric_indices(length: int, radius: int, device: torch.device) -> Tensor:
    """Source index of every position in [-radius, length + radius) under scipy's 'reflect'
    boundary (d c b a | a b c d | d c b a): the signal repeats with period 2·length, mirrored.
    torch's F.pad 'reflect' is scipy's 'mirror' (the edge sample is not repeated), so it
    cannot be used; the index form also handles a radius larger than the map."""
    positions = torch.arange(-radius, length + radius, device=device).remainder(2 * length)
    return torch.where(positions >= length, 2 * length - 1 - positions, positions)


def gaussian_smooth(maps: Tensor, sigma: float, truncate: float = GAUSSIAN_TRUNCATE) -> Tensor:
    """Separable Gaussian blur of (B, H, W) maps, equal to ``scipy.ndimage.gaussian_filter``
    applied to each map with its defaults (mode 'reflect', truncate 4.0). σ <= 0: identity."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, truncate).to(device=maps.device, dtype=maps.dtype)
    radius = (kernel.numel() - 1) // 2
    height, width = maps.shape[-2], maps.shape[-1]
    padded = maps.unsqueeze(1)  # (B, 1, H, W)
    padded = padded.index_select(3, _symmetric_indices(width, radius, maps.device))
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    blurred = blurred.index_select(2, _symmetric_indices(height, radius, maps.device))
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1))
    return blurred.squeeze(1)


def image_scores(maps: Tensor, pool: int = 16) -> Tensor:
    """Image score = max of the pool×pool (stride 1, no padding) average-pooled map.

    ``pool`` 0 or 1 is the plain max. A window larger than the map is clamped to the map's
    height/width (a map smaller than the window in both directions scores its mean)."""
    if pool <= 1:
        return maps.flatten(1).amax(dim=1)
    with warnings.catch_warnings():
        # Under tracing the sizes are traced values and min() freezes the window into the
        # graph. That is correct: an exported model has a fixed evaluation size.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        window = (min(pool, maps.shape[-2]), min(pool, maps.shape[-1]))
    pooled = F.avg_pool2d(maps.unsqueeze(1), kernel_size=window, stride=1)
    return pooled.flatten(1).amax(dim=1)


def postprocess(
    raw_maps: Tensor, image_size: int | tuple[int, int], sigma: float, pool: int, score_sigma: float | None = None
) -> tuple[Tensor, Tensor]:
    """(B, h, w) raw maps -> ((B, S, S) evaluation maps, (B,) image scores).

    The evaluation map (pixel metrics) is smoothed with ``sigma``, the map the image score is
    taken from with ``score_sigma`` (None: the same map). RLR's authors evaluate pixels on
    the unsmoothed map and score images on a σ=4-smoothed one."""
    upsampled = upsample(raw_maps, image_size)
    maps = gaussian_smooth(upsampled, sigma)
    if score_sigma is None or score_sigma == sigma:
        return maps, image_scores(maps, pool)
    return maps, image_scores(gaussian_smooth(upsampled, score_sigma), pool)
