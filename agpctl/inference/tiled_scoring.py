"""Scoring whole images tile by tile: cut, score the tiles in batches, stitch the maps back,
take the image score from the stitched map with the method's own rule.

Used by evaluation (:func:`agpctl.inference.scoring.predict_dataset` with a tiling: test
split, thresholds, validation) and by the detector (predict, the Python API, serve), so a
tiled run is scored the same way everywhere. Cutting and stitching are
:mod:`agp_data.tiling`'s, shared with the torch-free ONNX runtime.

The image score follows :func:`agp_models.postprocess.postprocess` on the stitched map: a
tile's map already carries the evaluation smoothing (``smoothing_sigma``); where the method
scores images on a more smoothed map (``score_sigma``), the stitched map is smoothed by the
difference (Gaussians compose: σ² = σ_eval² + σ_extra²), then pooled (``score_pool``) and
maxed. Pixel values of both are in model-input pixels, scaled to working-resolution pixels
when a tile is resized to the model's input.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from agp_data.tiled import resize_tiles, working_shapes
from agp_data.tiling import Tiling, cut_tiles, stitch
from agp_models.base import AnomalyModel
from agp_models.postprocess import gaussian_smooth, image_scores
from agpctl.models import autocast

# Maps and masks of one evaluation held in memory at once, in pixels (float32 map + bool mask:
# 5 bytes each, about 1.3 GiB). A larger tiled test split is evaluated on max-pooled maps.
MAX_EVALUATION_PIXELS = 2**28


def tile_batches(image: torch.Tensor, tiling: Tiling, size: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(N, 3, size, size) model inputs of a normalised (3, H, W) image and the tiles' origins."""
    pixels = image.permute(1, 2, 0).cpu().numpy()
    tiles, origins = cut_tiles(pixels, tiling)
    return resize_tiles(torch.from_numpy(tiles).permute(0, 3, 1, 2), size), origins


def score_tiles(model: AnomalyModel, tiles: torch.Tensor, batch_size: int, precision: str, device: torch.device,
                category: str | None = None) -> torch.Tensor:
    """(N, S, S) float32 maps of ``tiles`` (N, 3, S, S), ``batch_size`` at a time, on the CPU.
    ``category`` (when known) travels in the batch, as for whole images."""
    maps = []
    with torch.no_grad():
        for start in range(0, len(tiles), batch_size):
            chunk = tiles[start:start + batch_size].to(device, non_blocking=True)
            batch = {"image": chunk, "category": [category] * len(chunk)} if category is not None else None
            with autocast(precision, device):
                maps.append(model.predict(chunk, batch).maps.float().cpu())
    return torch.cat(maps)


def stitch_tile_maps(maps: torch.Tensor, origins: list[tuple[int, int]], height: int, width: int,
                     tiling: Tiling) -> np.ndarray:
    """The (H, W) float32 map of an image from its tiles' (N, S, S) maps."""
    if maps.shape[-1] != tiling.tile:
        maps = F.interpolate(maps[:, None], size=(tiling.tile, tiling.tile), mode="bilinear",
                             align_corners=False)[:, 0]
    return stitch(maps.numpy(), origins, height, width, tiling)


def image_score(full_map: np.ndarray, cfg: Any, tiling: Tiling) -> float:
    """The method's image score of a stitched (H, W) map (see the module docstring)."""
    scale = tiling.tile / float(cfg.image_size)
    sigma = float(cfg.smoothing_sigma or 0.0)
    score_sigma = getattr(cfg, "score_sigma", None)
    scored = torch.from_numpy(full_map)[None]
    if score_sigma is not None and float(score_sigma) > sigma:
        scored = gaussian_smooth(scored, math.sqrt(float(score_sigma) ** 2 - sigma**2) * scale)
    pool = int(cfg.score_pool)
    pool = max(1, round(pool * scale)) if pool > 1 else pool
    return float(image_scores(scored, pool)[0])


def score_image(model: AnomalyModel, image: torch.Tensor, tiling: Tiling, batch_size: int, precision: str,
                device: torch.device, category: str | None = None) -> tuple[np.ndarray, float]:
    """(stitched (H, W) float32 map, image score) of one normalised (3, H, W) image."""
    tiles, origins = tile_batches(image, tiling, int(model.cfg.image_size))
    maps = score_tiles(model, tiles, batch_size, precision, device, category)
    full_map = stitch_tile_maps(maps, origins, int(image.shape[-2]), int(image.shape[-1]), tiling)
    return full_map, image_score(full_map, model.cfg, tiling)


def evaluation_shape(shapes: list[tuple[int, int]], max_pixels: int = MAX_EVALUATION_PIXELS) -> tuple[int, int]:
    """The one (height, width) every map of an evaluation is kept at: the images' working size
    (the largest, when sizes differ), reduced by a whole factor when all of them together would
    exceed ``max_pixels``."""
    height = max(h for h, _ in shapes)
    width = max(w for _, w in shapes)
    factor = math.ceil(math.sqrt(len(shapes) * height * width / max_pixels))
    if factor <= 1:
        return height, width
    return math.ceil(height / factor), math.ceil(width / factor)


def fit_to_shape(full_map: np.ndarray, mask: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``full_map`` and ``mask`` at ``shape``: as they are when they have it; smaller by max
    pooling (a defect pixel and the map's peak survive); larger bilinear / nearest."""
    if full_map.shape == shape:
        return full_map, mask
    map_tensor = torch.from_numpy(full_map)[None, None]
    mask_tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    if full_map.shape[0] >= shape[0] and full_map.shape[1] >= shape[1]:
        map_tensor = F.adaptive_max_pool2d(map_tensor, shape)
        mask_tensor = F.adaptive_max_pool2d(mask_tensor, shape)
    else:
        map_tensor = F.interpolate(map_tensor, size=shape, mode="bilinear", align_corners=False)
        mask_tensor = F.interpolate(mask_tensor, size=shape, mode="nearest")
    return map_tensor[0, 0].numpy(), mask_tensor[0, 0].numpy() > 0.5


def dataset_shapes(dataset: Dataset, tiling: Tiling) -> list[tuple[int, int]]:
    """Working (height, width) of every item: ``dataset.shapes`` when it has them, else from its
    samples' file headers (a wrapper with k items per sample: item i shows sample i mod n)."""
    shapes = getattr(dataset, "shapes", None)
    if shapes is not None and len(shapes) == len(dataset):
        return list(shapes)
    samples = list(dataset.samples)
    per_sample = working_shapes(samples, tiling)
    return [per_sample[i % len(samples)] for i in range(len(dataset))]


def score_shard(model: AnomalyModel, dataset: Dataset, shard: list[int], device: torch.device, batch_size: int,
                precision: str, tiling: Tiling, on_image: Callable[[int, int], None] | None = None,
                loader_workers: int = 0, keep_maps: bool = True) -> dict[str, Any]:
    """The fields of :class:`agpctl.inference.scoring.Predictions` for the whole images
    ``shard`` of ``dataset`` (items: normalised ``image`` 3×H×W at the working resolution,
    ``mask`` 1×H×W, ``label``, ``category``, ``index``, ``path``). Maps are kept at
    :func:`evaluation_shape` of the whole dataset, so every rank's shard stacks alike."""
    shapes = dataset_shapes(dataset, tiling) if keep_maps else []
    shape = evaluation_shape(shapes) if shapes else None
    if shape is not None and any(h > shape[0] or w > shape[1] for h, w in shapes):
        warnings.warn(f"tiled evaluation of {len(dataset)} images keeps max-pooled {shape[0]}×{shape[1]} maps "
                      f"for the pixel metrics (at most {MAX_EVALUATION_PIXELS} pixels in memory)", stacklevel=2)
    loader = torch.utils.data.DataLoader(Subset(dataset, shard), batch_size=None, shuffle=False,
                                         num_workers=loader_workers)
    model.eval()
    fields: dict[str, list] = {name: [] for name in ("indices", "scores", "maps", "masks", "labels", "categories",
                                                     "paths")}
    for done, item in enumerate(loader, start=1):
        full_map, score = score_image(model, item["image"], tiling, batch_size, precision, device, item["category"])
        fields["indices"].append(int(item["index"]))
        fields["scores"].append(score)
        fields["labels"].append(int(item["label"]))
        fields["categories"].append(item["category"])
        fields["paths"].append(item["path"])
        if shape is not None:
            kept_map, kept_mask = fit_to_shape(full_map, item["mask"][0].numpy() > 0.5, shape)
            fields["maps"].append(kept_map.astype(np.float32, copy=False))
            fields["masks"].append(kept_mask)
        if on_image is not None:
            on_image(done, len(shard))
    empty = shape is None or not fields["maps"]
    return {
        "indices": np.asarray(fields["indices"], dtype=np.int64),
        "scores": np.asarray(fields["scores"], dtype=np.float32),
        "maps": np.zeros((0, 0, 0), np.float32) if empty else np.stack(fields["maps"]),
        "masks": np.zeros((0, 0, 0), bool) if empty else np.stack(fields["masks"]),
        "labels": np.asarray(fields["labels"], dtype=np.int64),
        "categories": fields["categories"],
        "paths": fields["paths"],
    }
