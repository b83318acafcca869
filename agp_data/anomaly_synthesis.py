"""Pseudo-anomaly synthesis: CutPaste (patch / scar) and Perlin-noise texture blending.

Methods that learn from synthetic defects (OneNIP's restoration stream and refiner) get an
image with a defect pasted in *and its exact mask*. "Exact" is a hard guarantee here:

    (image != anomalous).any(channel)  ==  mask        (pixel for pixel)

The mask is computed as ``region ∧ changed``: the region the generator pasted into,
restricted to the pixels whose value actually changed. A pasted patch that happens to
reproduce the background (a flat area copied onto a flat area, a texture pixel equal to the
image pixel) therefore leaves no label behind: an invisible "defect" is not a defect, and
labelling it would teach the segmentation head noise. Pixels of the region that changed by
less than ``SynthesisConfig.min_change`` grey levels (in every channel) are put back to their
original value, so the equivalence above still holds. If a draw changes fewer than
``min_area`` of the pixels it is redrawn; after ``max_attempts`` draws a rectangle is
inverted (``255 - v`` never equals ``v``), so a sample chosen to carry an anomaly always does.

Everything random comes from the ``numpy.random.Generator`` passed in: the same generator
state gives the same image and mask (pure numpy + Pillow, safe in DataLoader workers).

Anomaly kinds (DRAEM / CutPaste, with the parameter ranges of the OneNIP authors' code,
lengths given at 224 px and scaled with the image):
- CutPaste patch: a rectangle of 2–15 % of the image area, aspect 0.3–3.3, cut from the same
  image, colour-jittered (brightness, contrast, saturation, hue), optionally rotated, pasted
  at another random place.
- CutPaste scar: a thin rectangle (2–16 × 10–25 px), jittered, rotated by ±45°, pasted.
- Perlin: a Perlin-noise field (lattice 2^1..2^5 cells, slightly rotated) thresholded at 0.5
  gives the region; it is filled with a texture blended with the image,
  ``out = (1 − β)·texture + β·image`` with opacity ``β ∈ [0, 0.8)``. Textures come from a
  DTD-style folder (any images, recursively) or, without one, are generated procedurally
  (noise, stripes, checkerboard, gradients, flat colour). Three random colour/intensity
  augmentations are applied to each texture.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from agp_data import storage
from agp_data.errors import DataError
from agp_data.images import IMAGE_EXTENSIONS, is_image_file, read_image

_REFERENCE_SIZE = 224.0  # scar sizes below are in pixels at this image size


@dataclass
class SynthesisConfig:
    """How pseudo anomalies are drawn. Lengths are relative so one config fits any size."""

    probability: float = 0.5  # chance that a sample gets an anomaly; others keep an all-zero mask
    cutpaste_weight: float = 0.5  # P(CutPaste) vs P(Perlin + texture)
    scar_weight: float = 0.5  # within CutPaste: P(scar) vs P(patch)
    texture_root: str | None = None  # DTD-style folder (or s3:// prefix) of images; None = procedural
    # CutPaste patch
    patch_area_min: float = 0.02  # fraction of the image area
    patch_area_max: float = 0.15
    patch_aspect_min: float = 0.3  # width / height
    patch_aspect_max: float = 3.3
    patch_rotation: float = 0.0  # max |angle| in degrees (CutPaste paper: none)
    # CutPaste scar, in pixels at 224 px (scaled with the image size)
    scar_width_min: float = 2.0
    scar_width_max: float = 16.0
    scar_length_min: float = 10.0
    scar_length_max: float = 25.0
    scar_rotation: float = 45.0  # max |angle| in degrees
    # colour jitter of pasted patches (torchvision ColorJitter semantics)
    jitter_brightness: float = 0.4
    jitter_contrast: float = 0.4
    jitter_saturation: float = 0.4
    jitter_hue: float = 0.1  # fraction of a full turn
    # Perlin
    perlin_scale_min_exp: int = 1  # lattice cells per side = 2**k, k uniform in [min, max]
    perlin_scale_max_exp: int = 5
    perlin_threshold: float = 0.5
    perlin_rotation: float = 5.0  # max |angle| in degrees
    opacity_min: float = 0.0  # β: weight of the original image inside the region
    opacity_max: float = 0.8
    texture_augmentations: int = 3  # random colour augmentations applied to each texture
    # exactness / retries
    min_change: int = 1  # a region pixel counts as changed if some channel moved >= this many levels
    min_area: float = 0.0002  # fraction of the image that must change, else redraw
    max_attempts: int = 8

    def __post_init__(self) -> None:
        for name in ("probability", "cutpaste_weight", "scar_weight"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SynthesisConfig.{name} must be in [0, 1], got {value}")
        if not 0.0 <= self.opacity_min <= self.opacity_max < 1.0:
            raise ValueError("SynthesisConfig needs 0 <= opacity_min <= opacity_max < 1")
        if self.perlin_scale_min_exp < 1 or self.perlin_scale_max_exp < self.perlin_scale_min_exp:
            raise ValueError("SynthesisConfig needs 1 <= perlin_scale_min_exp <= perlin_scale_max_exp")
        if self.min_change < 1:
            raise ValueError("SynthesisConfig.min_change must be >= 1")


# -- public entry point --------------------------------------------------------------------
def synthesize(
    image: np.ndarray,
    rng: np.random.Generator,
    cfg: SynthesisConfig | None = None,
    textures: Sequence[str | np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(anomalous uint8 HxWx3 image, bool HxW mask)`` for an RGB uint8 image.

    ``textures``: texture images (paths or HxWx3 uint8 arrays) for the Perlin kind; when
    ``None`` the files under ``cfg.texture_root`` are used, and without a root (or with an
    empty list) textures are generated. With probability ``1 - cfg.probability`` the image
    is returned unchanged with an all-zero mask.
    """
    cfg = cfg or SynthesisConfig()
    image = _check_image(image)
    height, width = image.shape[:2]
    if rng.random() >= cfg.probability:
        return image.copy(), np.zeros((height, width), dtype=bool)
    if textures is None and cfg.texture_root:
        textures = list_texture_files(cfg.texture_root)

    min_pixels = max(1, int(round(cfg.min_area * height * width)))
    for _ in range(max(1, cfg.max_attempts)):
        if rng.random() < cfg.cutpaste_weight:
            kind = _cutpaste_scar if rng.random() < cfg.scar_weight else _cutpaste_patch
            region, content = kind(image, rng, cfg)
        else:
            region, content = _perlin_texture(image, rng, cfg, textures)
        out, mask = _composite(image, region, content, cfg.min_change)
        if mask.sum() >= min_pixels:
            return out, mask
    # Every draw was (nearly) invisible, e.g. a flat image: invert a rectangle instead.
    region = np.zeros((height, width), dtype=bool)
    rh, rw = max(1, height // 8), max(1, width // 8)
    top, left = int(rng.integers(0, height - rh + 1)), int(rng.integers(0, width - rw + 1))
    region[top : top + rh, left : left + rw] = True
    return _composite(image, region, 255 - image, 1)


@functools.lru_cache(maxsize=8)
def _cached_listing(root: str) -> tuple[str, ...]:
    return tuple(path for path in storage.list_files(root) if is_image_file(path))


def list_texture_files(root: str) -> list[str]:
    """All image files under ``root`` (local folder or ``s3://`` prefix), recursively, sorted
    so that draws are reproducible. Listed once per process."""
    files = _cached_listing(str(root))
    if not files:
        raise DataError(f"texture folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) or does not "
                        "exist; point texture_root at a DTD-style folder or leave it empty for generated textures")
    return list(files)


# -- compositing ---------------------------------------------------------------------------
def _check_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"synthesize expects an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    return image


def _composite(image: np.ndarray, region: np.ndarray, content: np.ndarray, min_change: int):
    """Write ``content`` into ``region``; keep only pixels that visibly changed (exact mask)."""
    out = image.copy()
    out[region] = content[region]
    diff = np.abs(out.astype(np.int16) - image.astype(np.int16)).max(axis=-1)
    mask = region & (diff >= min_change)
    out[region & ~mask] = image[region & ~mask]  # sub-threshold changes are undone
    return out, mask


def _paste(canvas_shape, piece: np.ndarray, alpha: np.ndarray, top: int, left: int):
    """Place ``piece`` (h,w,3) with opacity mask ``alpha`` at (top, left), clipped to the canvas."""
    height, width = canvas_shape
    content = np.zeros((height, width, 3), dtype=np.uint8)
    region = np.zeros((height, width), dtype=bool)
    ph, pw = alpha.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + ph, height), min(left + pw, width)
    if y1 <= y0 or x1 <= x0:
        return region, content
    sub_alpha = alpha[y0 - top : y1 - top, x0 - left : x1 - left]
    region[y0:y1, x0:x1] = sub_alpha
    content[y0:y1, x0:x1] = piece[y0 - top : y1 - top, x0 - left : x1 - left]
    return region, content


def _rotate(piece: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate about the centre onto a canvas that holds the whole result (nearest neighbour).

    Returns the rotated piece and its alpha (True where the rotated piece has content).
    """
    h, w = piece.shape[:2]
    if abs(degrees) < 1e-6:
        return piece, np.ones((h, w), dtype=bool)
    theta = math.radians(degrees)
    cos, sin = abs(math.cos(theta)), abs(math.sin(theta))
    out_h = int(math.ceil(h * cos + w * sin))
    out_w = int(math.ceil(w * cos + h * sin))
    yy, xx = np.mgrid[0:out_h, 0:out_w].astype(np.float64)
    yy -= (out_h - 1) / 2.0
    xx -= (out_w - 1) / 2.0
    c, s = math.cos(theta), math.sin(theta)
    src_x = c * xx + s * yy + (w - 1) / 2.0  # inverse rotation of the output grid
    src_y = -s * xx + c * yy + (h - 1) / 2.0
    ix, iy = np.rint(src_x).astype(np.int64), np.rint(src_y).astype(np.int64)
    alpha = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    rotated = np.zeros((out_h, out_w, 3), dtype=np.uint8)
    rotated[alpha] = piece[iy[alpha], ix[alpha]]
    return rotated, alpha


# -- colour helpers ------------------------------------------------------------------------
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def _hue_rotate(rgb: np.ndarray, turns: float) -> np.ndarray:
    """Rotate the hue of float RGB (…,3) in [0,255] by ``turns`` of a full circle (YIQ)."""
    angle = 2 * math.pi * turns
    rotation = np.array([[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]])
    matrix = _YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ
    return rgb @ matrix.T


def _grey(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _color_jitter(piece: np.ndarray, rng: np.random.Generator, cfg: SynthesisConfig) -> np.ndarray:
    x = piece.astype(np.float64)
    b = rng.uniform(1 - cfg.jitter_brightness, 1 + cfg.jitter_brightness)
    c = rng.uniform(1 - cfg.jitter_contrast, 1 + cfg.jitter_contrast)
    s = rng.uniform(1 - cfg.jitter_saturation, 1 + cfg.jitter_saturation)
    h = rng.uniform(-cfg.jitter_hue, cfg.jitter_hue)
    x = x * b
    mean_grey = _grey(x).mean()
    x = (x - mean_grey) * c + mean_grey
    grey = _grey(x)[..., None]
    x = (x - grey) * s + grey
    x = _hue_rotate(x, h)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# -- CutPaste ------------------------------------------------------------------------------
def _cut_and_paste(image, rng, cfg, patch_h: int, patch_w: int, max_rotation: float):
    height, width = image.shape[:2]
    patch_h, patch_w = int(min(max(patch_h, 1), height)), int(min(max(patch_w, 1), width))
    top = int(rng.integers(0, height - patch_h + 1))
    left = int(rng.integers(0, width - patch_w + 1))
    piece = _color_jitter(image[top : top + patch_h, left : left + patch_w], rng, cfg)
    piece, alpha = _rotate(piece, rng.uniform(-max_rotation, max_rotation) if max_rotation > 0 else 0.0)
    ph, pw = alpha.shape
    # fully inside the image when it fits; a (rotated) piece larger than the image is clipped
    paste_top = int(rng.integers(min(0, height - ph), max(0, height - ph) + 1))
    paste_left = int(rng.integers(min(0, width - pw), max(0, width - pw) + 1))
    return _paste((height, width), piece, alpha, paste_top, paste_left)


def _cutpaste_patch(image, rng, cfg):
    height, width = image.shape[:2]
    area = rng.uniform(cfg.patch_area_min, cfg.patch_area_max) * height * width
    # CutPaste draws the aspect from (min, 1) or (1, max) with equal chance
    aspect = rng.uniform(cfg.patch_aspect_min, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, cfg.patch_aspect_max)
    patch_w = int(round(math.sqrt(area * aspect)))
    patch_h = int(round(math.sqrt(area / aspect)))
    return _cut_and_paste(image, rng, cfg, patch_h, patch_w, cfg.patch_rotation)


def _cutpaste_scar(image, rng, cfg):
    height, width = image.shape[:2]
    scale = min(height, width) / _REFERENCE_SIZE
    scar_w = max(1, int(round(rng.uniform(cfg.scar_width_min, cfg.scar_width_max) * scale)))
    scar_h = max(2, int(round(rng.uniform(cfg.scar_length_min, cfg.scar_length_max) * scale)))
    return _cut_and_paste(image, rng, cfg, scar_h, scar_w, cfg.scar_rotation)


# -- Perlin noise --------------------------------------------------------------------------
def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(
    shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator, degrees: float = 0.0
) -> np.ndarray:
    """2-D gradient (Perlin) noise, roughly in [-1, 1], periodic over ``cells`` lattice cells.

    A random unit gradient sits on each lattice point; each pixel blends the dot products of
    its four surrounding gradients with the offsets to them, weighted by the quintic fade
    ``6t⁵ − 15t⁴ + 10t³``. The lattice wraps around, so the sampling grid can be rotated by
    ``degrees`` without running off it.
    """
    height, width = shape
    cells_y, cells_x = max(1, int(cells[0])), max(1, int(cells[1]))
    angles = rng.uniform(0.0, 2 * math.pi, size=(cells_y, cells_x))
    grad = np.stack([np.sin(angles), np.cos(angles)], axis=-1)  # (gy, gx) per lattice point
    y = (np.arange(height) + 0.5) / height * cells_y
    x = (np.arange(width) + 0.5) / width * cells_x
    yy, xx = np.meshgrid(y, x, indexing="ij")
    if degrees:
        theta = math.radians(degrees)
        cy, cx = cells_y / 2.0, cells_x / 2.0
        dy, dx = yy - cy, xx - cx
        yy = cy + math.cos(theta) * dy + math.sin(theta) * dx
        xx = cx - math.sin(theta) * dy + math.cos(theta) * dx
    y0, x0 = np.floor(yy), np.floor(xx)
    fy, fx = yy - y0, xx - x0
    i0, j0 = y0.astype(np.int64) % cells_y, x0.astype(np.int64) % cells_x
    i1, j1 = (i0 + 1) % cells_y, (j0 + 1) % cells_x

    def corner(i, j, oy, ox):
        g = grad[i, j]
        return g[..., 0] * oy + g[..., 1] * ox

    n00 = corner(i0, j0, fy, fx)
    n01 = corner(i0, j1, fy, fx - 1)
    n10 = corner(i1, j0, fy - 1, fx)
    n11 = corner(i1, j1, fy - 1, fx - 1)
    u, v = _fade(fx), _fade(fy)
    top = n00 * (1 - u) + n01 * u
    bottom = n10 * (1 - u) + n11 * u
    return math.sqrt(2.0) * (top * (1 - v) + bottom * v)


def _perlin_texture(image, rng, cfg, textures):
    height, width = image.shape[:2]
    cells = (
        2 ** int(rng.integers(cfg.perlin_scale_min_exp, cfg.perlin_scale_max_exp + 1)),
        2 ** int(rng.integers(cfg.perlin_scale_min_exp, cfg.perlin_scale_max_exp + 1)),
    )
    noise = perlin_noise((height, width), cells, rng, rng.uniform(-cfg.perlin_rotation, cfg.perlin_rotation))
    region = noise > cfg.perlin_threshold
    texture = _augment_texture(_pick_texture(rng, (height, width), textures), rng, cfg.texture_augmentations)
    beta = rng.uniform(cfg.opacity_min, cfg.opacity_max)
    blended = (1.0 - beta) * texture.astype(np.float64) + beta * image.astype(np.float64)
    return region, np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# -- textures ------------------------------------------------------------------------------
def _load_texture(path: str, size: tuple[int, int]) -> np.ndarray:
    image = read_image(path)  # RGB uint8; DataError naming the file if unreadable
    return np.asarray(image.resize((size[1], size[0]), Image.BILINEAR), dtype=np.uint8)


def _resize_array(texture: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if texture.shape[:2] == size:
        return texture.astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(texture.astype(np.uint8)))
    return np.asarray(img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR), dtype=np.uint8)


def _pick_texture(rng, size, textures) -> np.ndarray:
    if textures:
        choice = textures[int(rng.integers(0, len(textures)))]
        if isinstance(choice, np.ndarray):
            return _resize_array(choice, size)
        return _load_texture(choice, size)
    return generate_texture(size, rng)


def _random_colour(rng) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def generate_texture(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A procedural HxWx3 uint8 texture: noise, stripes, checkerboard, gradient or flat colour."""
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    a, b = _random_colour(rng), _random_colour(rng)
    kind = int(rng.integers(0, 6))
    if kind == 0:  # multi-octave Perlin "marble" between two colours
        field = sum(
            perlin_noise(size, (2**o, 2**o), rng) / (o + 1) for o in range(int(rng.integers(1, 3)), 6)
        )
        t = (field - field.min()) / (np.ptp(field) + 1e-9)
    elif kind == 1:  # sinusoidal stripes at a random angle and period
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(4, max(5.0, min(height, width) / 3))
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (math.cos(angle) * xx + math.sin(angle) * yy) / period)
    elif kind == 2:  # rotated checkerboard
        angle = rng.uniform(0, math.pi)
        cell = rng.uniform(3, max(4.0, min(height, width) / 4))
        u = math.cos(angle) * xx + math.sin(angle) * yy
        v = -math.sin(angle) * xx + math.cos(angle) * yy
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float64)
    elif kind == 3:  # linear gradient
        angle = rng.uniform(0, 2 * math.pi)
        t = math.cos(angle) * xx + math.sin(angle) * yy
        t = (t - t.min()) / (np.ptp(t) + 1e-9)
    elif kind == 4:  # pixel noise
        t = rng.random((height, width))
    else:  # flat colour with mild grain
        t = np.clip(rng.normal(0.0, 0.08, (height, width)), 0, 1)
    texture = (1 - t)[..., None] * a + t[..., None] * b
    return np.clip(np.rint(texture), 0, 255).astype(np.uint8)


def _gamma(x, rng):
    g = rng.uniform(0.5, 2.0, size=3)
    return 255.0 * (x / 255.0) ** g


def _brightness(x, rng):
    return x * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)


def _hue_saturation(x, rng):
    grey = _grey(x)[..., None]
    return _hue_rotate((x - grey) * rng.uniform(0.5, 1.5) + grey, rng.uniform(-0.2, 0.2))


def _solarize(x, rng):
    threshold = rng.uniform(32, 128)
    return np.where(x >= threshold, 255.0 - x, x)


def _posterize(x, rng):
    bits = int(rng.integers(2, 7))
    step = 2 ** (8 - bits)
    return np.floor(np.clip(x, 0, 255) / step) * step


def _flip(x, rng):
    return x[:, ::-1] if rng.random() < 0.5 else x[::-1]


def _invert(x, rng):
    return 255.0 - x


def _autocontrast(x, rng):
    lo = x.min(axis=(0, 1), keepdims=True)
    hi = x.max(axis=(0, 1), keepdims=True)
    return (x - lo) * 255.0 / np.maximum(hi - lo, 1e-6)


def _equalize(x, rng):
    out = np.empty_like(x)
    for ch in range(3):
        values = np.clip(x[..., ch], 0, 255).astype(np.uint8)
        hist = np.bincount(values.ravel(), minlength=256)
        cdf = np.cumsum(hist).astype(np.float64)
        cdf = (cdf - cdf.min()) * 255.0 / max(cdf.max() - cdf.min(), 1.0)
        out[..., ch] = cdf[values]
    return out


_TEXTURE_AUGMENTATIONS: tuple[Callable, ...] = (
    _gamma, _brightness, _hue_saturation, _solarize, _posterize, _flip, _invert, _autocontrast, _equalize,
)


def _augment_texture(texture: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    x = texture.astype(np.float64)
    count = min(max(count, 0), len(_TEXTURE_AUGMENTATIONS))
    for idx in rng.choice(len(_TEXTURE_AUGMENTATIONS), size=count, replace=False):
        x = np.clip(_TEXTURE_AUGMENTATIONS[int(idx)](x, rng), 0, 255)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
