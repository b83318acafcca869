"""The built-in generated dataset: procedurally drawn industrial surfaces and parts.

Five categories (``CATEGORIES``), two kinds:

- textures: ``fabric`` (plain weave), ``metal`` (brushed sheet with a specular band), ``tile``
  (terrazzo-like stone with grains);
- objects on a background: ``screw`` (threaded shank, slotted head), ``washer`` (brass ring).

Normal images of a category share its appearance and vary in texture realisation, position,
rotation, lighting and sensor noise. Defective test images carry one of ``DEFECT_TYPES`` —
scratch, spot, crack, missing piece, stain — of varied size and contrast. The mask of a defect
is *exactly* the set of pixels it changed: the defect is drawn on the final (lit, noisy,
quantised) clean image, and pixels of its region that the drawing changed by less than
``MIN_DEFECT_DELTA`` grey levels are pushed by that much, so every region pixel differs from
the clean image and no pixel outside it does (:func:`render_pair` returns both images).

Everything is seeded through ``numpy.random.SeedSequence([seed, category, split, index])``: the
same parameters give byte-identical files, and a category's images do not depend on how many
other categories or images are generated.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from agp_data import storage
from agp_data.errors import DataError

GENERATOR_VERSION = 1
CATEGORIES = ("fabric", "metal", "tile", "screw", "washer")
DEFECT_TYPES = ("scratch", "spot", "crack", "missing_piece", "stain")
MIN_DEFECT_DELTA = 10  # grey levels (of 255) every defect pixel differs by, at least
DEFAULT_PARAMS = {"categories": 3, "train": 40, "test": 20, "size": 128, "seed": 0}
MANIFEST = "dataset.json"
_SPLIT_CODES = {"train": 0, "test": 1}


# --------------------------------------------------------------------------------------------
# Small numeric helpers
# --------------------------------------------------------------------------------------------
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y + 0.5, x + 0.5  # pixel centres


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean unit-std Gaussian-filtered noise of correlation length ``sigma`` pixels.

    Large sigmas are filtered at reduced resolution and upsampled: same look, far less work.
    """
    factor = max(1, int(sigma // 3))
    small = max(4, -(-size // factor))
    noise = rng.standard_normal((small, small)).astype(np.float32)
    noise = ndimage.gaussian_filter(noise, sigma / factor, mode="wrap")
    if factor > 1:
        noise = ndimage.zoom(noise, factor, order=1, mode="grid-wrap", grid_mode=True)[:size, :size]
    return (noise - noise.mean()) / (noise.std() + 1e-8)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _scale(size: int) -> float:
    """Line widths etc. are designed at 128 px and scale with the image."""
    return size / 128.0


# --------------------------------------------------------------------------------------------
# Scenes: the clean picture of one part
# --------------------------------------------------------------------------------------------
@dataclass
class _Scene:
    surface: np.ndarray  # H×W×3 float, before lighting and noise
    alpha: np.ndarray | None = None  # object coverage in [0, 1] (None: a texture)
    background: np.ndarray | None = None  # what is behind the object


def _fabric(rng: np.random.Generator, size: int) -> _Scene:
    y, x = _grid(size)
    angle = np.deg2rad(rng.uniform(-2.0, 2.0))
    period = size / 12.0 * rng.uniform(0.97, 1.03)
    phase_x, phase_y = rng.uniform(0, 2 * period, 2)
    u = (np.cos(angle) * x + np.sin(angle) * y + phase_x) / period
    v = (-np.sin(angle) * x + np.cos(angle) * y + phase_y) / period
    a = u - np.floor(u) - 0.5  # position across the warp thread
    b = v - np.floor(v) - 0.5  # position across the weft thread
    warp_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    warp_shade = np.sqrt(np.clip(1 - (2 * a) ** 2, 0, 1)) * (1 - 0.35 * (2 * b) ** 2)
    weft_shade = np.sqrt(np.clip(1 - (2 * b) ** 2, 0, 1)) * (1 - 0.35 * (2 * a) ** 2)
    shade = 0.25 + 0.75 * np.where(warp_on_top, warp_shade, weft_shade)
    tint = rng.uniform(0.97, 1.03, 3)
    warp_colour = np.array([0.20, 0.32, 0.58]) * tint
    weft_colour = np.array([0.58, 0.64, 0.78]) * tint
    colour = np.where(warp_on_top[..., None], warp_colour, weft_colour)
    fibres = 1 + 0.06 * _smooth_noise(rng, size, 0.7 * _scale(size))
    slubs = 1 + 0.04 * _smooth_noise(rng, size, size / 10)
    return _Scene(colour * (shade * fibres * slubs)[..., None])


def _metal(rng: np.random.Generator, size: int) -> _Scene:
    y, _ = _grid(size)
    # Brushing: noise strongly correlated along x, barely along y.
    streaks = rng.standard_normal((size, size)).astype(np.float32)
    streaks = ndimage.gaussian_filter1d(streaks, 0.6 * _scale(size), axis=0, mode="wrap")
    streaks = ndimage.gaussian_filter1d(streaks, size / 6, axis=1, mode="wrap")
    streaks = (streaks - streaks.mean()) / (streaks.std() + 1e-8)
    fine = _smooth_noise(rng, size, 0.5 * _scale(size))
    base = np.array([0.58, 0.59, 0.62]) * rng.uniform(0.97, 1.03)
    band_centre = rng.uniform(0.3, 0.7) * size
    specular = 0.12 * np.exp(-(((y - band_centre) / (0.25 * size)) ** 2))
    surface = base * (1 + 0.10 * streaks + 0.03 * fine)[..., None] + specular[..., None]
    return _Scene(surface)


def _tile(rng: np.random.Generator, size: int) -> _Scene:
    mottling = (
        0.5 * _smooth_noise(rng, size, size / 6)
        + 0.3 * _smooth_noise(rng, size, size / 12)
        + 0.2 * _smooth_noise(rng, size, size / 24)
    )
    base = np.array([0.74, 0.70, 0.63]) * rng.uniform(0.97, 1.03)
    surface = base * (1 + 0.07 * mottling)[..., None]
    grain_sigma = 1.1 * _scale(size)
    dark = np.clip((_smooth_noise(rng, size, grain_sigma) - 1.5) * 3, 0, 1)[..., None]
    light = np.clip((_smooth_noise(rng, size, grain_sigma) - 1.7) * 3, 0, 1)[..., None]
    dark_colour = np.array([0.33, 0.30, 0.28]) * (1 + 0.15 * mottling)[..., None]
    light_colour = np.array([0.92, 0.90, 0.86])
    surface = surface * (1 - dark) + dark_colour * dark
    surface = surface * (1 - light) + light_colour * light
    return _Scene(surface)


def _mat(rng: np.random.Generator, size: int, colour: Sequence[float]) -> np.ndarray:
    texture = 1 + 0.05 * _smooth_noise(rng, size, size / 8) + 0.02 * _smooth_noise(rng, size, 1.0)
    return np.asarray(colour) * texture[..., None]


def _screw(rng: np.random.Generator, size: int) -> _Scene:
    y, x = _grid(size)
    background = _mat(rng, size, [0.16, 0.16, 0.17])
    angle = np.deg2rad(rng.uniform(-10.0, 10.0))
    cx, cy = size / 2 + rng.uniform(-size / 25, size / 25, 2)
    s = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)  # along the axis
    t = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)  # across it
    length, radius = 0.70 * size, 0.075 * size
    head_length, head_radius = 0.12 * size, 0.14 * size
    pitch = 0.045 * size
    head_start, shank_start, tip = -length / 2, -length / 2 + head_length, length / 2
    shank_radius = radius * np.clip((tip - s) / (0.12 * size), 0.3, 1.0)  # tapered tip
    # Coverage = signed distance to the outline + 0.5, clipped: one-pixel anti-aliased edges.
    head_cover = np.clip(
        np.minimum(np.minimum(head_radius - np.abs(t), s - head_start), shank_start - s) + 0.5, 0, 1
    )
    shank_cover = np.clip(
        np.minimum(np.minimum(shank_radius - np.abs(t), tip - s), s - shank_start + 1) + 0.5, 0, 1
    )
    alpha = np.maximum(head_cover, shank_cover)
    cylinder = np.sqrt(np.clip(1 - (t / shank_radius) ** 2, 0, 1))
    thread = 0.7 + 0.3 * (0.5 + 0.5 * np.cos(2 * np.pi * (s + 0.3 * t) / pitch))
    shank_shade = 0.35 + 0.65 * cylinder * thread
    head_shade = 0.75 + 0.25 * (1 - (t / head_radius) ** 2)
    slot = (np.abs(t) < 0.022 * size) & (s > head_start + 0.02 * size)
    head_shade = np.where(slot, 0.3, head_shade)
    shade = np.where(head_cover >= shank_cover, head_shade, shank_shade)
    metal = np.array([0.80, 0.80, 0.83]) * rng.uniform(0.97, 1.03)
    part = metal * shade[..., None]
    alpha3 = alpha[..., None]
    return _Scene(background * (1 - alpha3) + part * alpha3, alpha, background)


def _washer(rng: np.random.Generator, size: int) -> _Scene:
    y, x = _grid(size)
    background = _mat(rng, size, [0.22, 0.30, 0.27])
    cx, cy = size / 2 + rng.uniform(-size / 25, size / 25, 2)
    outer = 0.36 * size * rng.uniform(0.98, 1.02)
    inner = 0.15 * size * rng.uniform(0.98, 1.02)
    dx, dy = x - cx, y - cy
    distance = np.hypot(dx, dy)
    alpha = np.clip(np.minimum(outer - distance, distance - inner) + 0.5, 0, 1)
    radial = np.clip((distance - inner) / (outer - inner), 0, 1)
    light_direction = rng.uniform(0, 2 * np.pi)
    bevel = 0.75 + 0.25 * np.sin(np.pi * radial)
    directional = 1 + 0.12 * np.cos(np.arctan2(dy, dx) - light_direction)
    machining = 1 + 0.03 * np.sin(2 * np.pi * distance / (0.02 * size))
    brass = np.array([0.80, 0.69, 0.44]) * rng.uniform(0.97, 1.03)
    part = brass * (bevel * directional * machining)[..., None]
    alpha3 = alpha[..., None]
    return _Scene(background * (1 - alpha3) + part * alpha3, alpha, background)


_GENERATORS: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "fabric": _fabric,
    "metal": _metal,
    "tile": _tile,
    "screw": _screw,
    "washer": _washer,
}


def _finish(rng: np.random.Generator, size: int) -> Callable[[np.ndarray], np.ndarray]:
    """Lighting and sensor noise of one exposure, applied identically to any layer of it."""
    y, x = _grid(size)
    gain = rng.uniform(0.93, 1.07)
    slope = rng.uniform(-0.06, 0.06)
    direction = rng.uniform(0, 2 * np.pi)
    light = gain * (
        1 + slope * ((x - size / 2) * np.cos(direction) + (y - size / 2) * np.sin(direction)) / (size / 2)
    )
    noise = rng.normal(0, 0.010, (size, size, 1)) + rng.normal(0, 0.004, (size, size, 3))

    def finish(layer: np.ndarray) -> np.ndarray:
        return np.clip(layer * light[..., None] + noise, 0, 1)

    return finish


# --------------------------------------------------------------------------------------------
# Defects: a region (the mask) and what it looks like
# --------------------------------------------------------------------------------------------
def _polyline_region(points: np.ndarray, width: float, size: int) -> np.ndarray:
    y, x = _grid(size)
    best = np.full((size, size), np.inf, dtype=np.float32)
    for p, q in zip(points[:-1], points[1:]):
        d = q - p
        length2 = float(d @ d) or 1e-6
        t = np.clip(((x - p[0]) * d[0] + (y - p[1]) * d[1]) / length2, 0, 1)
        best = np.minimum(best, (x - p[0] - t * d[0]) ** 2 + (y - p[1] - t * d[1]) ** 2)
    return best <= (width / 2) ** 2


def _blob_region(
    rng: np.random.Generator, centre: np.ndarray, radius: float, size: int, roughness: float
) -> np.ndarray:
    y, x = _grid(size)
    dx, dy = x - centre[0], y - centre[1]
    angle = np.arctan2(dy, dx)
    aspect = rng.uniform(0.6, 1.0)
    tilt = rng.uniform(0, np.pi)
    # Elliptical base shape with a few angular harmonics for an irregular outline.
    ex = dx * np.cos(tilt) + dy * np.sin(tilt)
    ey = (-dx * np.sin(tilt) + dy * np.cos(tilt)) / aspect
    outline = np.ones_like(angle)
    for harmonic in (2, 3, 5):
        outline += roughness / harmonic * np.sin(harmonic * angle + rng.uniform(0, 2 * np.pi))
    return np.hypot(ex, ey) <= radius * outline


def _pick_point(rng: np.random.Generator, support: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(support)
    i = rng.integers(len(ys))
    return np.array([xs[i] + 0.5, ys[i] + 0.5], dtype=np.float32)


def _region(
    kind: str, rng: np.random.Generator, size: int, inside: np.ndarray, edge: np.ndarray
) -> np.ndarray:
    k = _scale(size)
    if kind == "scratch":
        start = _pick_point(rng, inside)
        heading = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.2, 0.45) * size
        end = start + length * np.array([np.cos(heading), np.sin(heading)])
        bend = (start + end) / 2 + rng.uniform(-0.15, 0.15) * length * np.array(
            [-np.sin(heading), np.cos(heading)]
        )
        t = np.linspace(0, 1, 24)[:, None]
        points = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end
        return _polyline_region(points, max(1.2, rng.uniform(1.0, 2.6) * k), size)
    if kind == "crack":
        point = _pick_point(rng, inside)
        heading = rng.uniform(0, 2 * np.pi)
        points = [point]
        for _ in range(int(rng.integers(10, 21))):
            heading += rng.uniform(-0.55, 0.55)
            point = point + rng.uniform(0.02, 0.035) * size * np.array([np.cos(heading), np.sin(heading)])
            points.append(point)
        region = _polyline_region(np.array(points), max(1.1, rng.uniform(1.0, 2.0) * k), size)
        if rng.random() < 0.5:  # a side branch from somewhere along the crack
            point = points[int(rng.integers(2, len(points) - 1))]
            heading += rng.choice([-1, 1]) * rng.uniform(0.6, 1.2)
            branch = [point]
            for _ in range(int(rng.integers(4, 9))):
                heading += rng.uniform(-0.5, 0.5)
                point = point + 0.025 * size * np.array([np.cos(heading), np.sin(heading)])
                branch.append(point)
            region |= _polyline_region(np.array(branch), max(1.1, 1.0 * k), size)
        return region
    if kind == "spot":
        return _blob_region(rng, _pick_point(rng, inside), rng.uniform(0.025, 0.06) * size, size, 0.25)
    if kind == "stain":
        centre = _pick_point(rng, inside)
        radius = rng.uniform(0.05, 0.10) * size
        y, x = _grid(size)
        wobble = _smooth_noise(rng, size, radius / 2.5)
        return np.hypot(x - centre[0], y - centre[1]) / radius + 0.35 * wobble < 1.0
    if kind == "missing_piece":
        return _blob_region(rng, _pick_point(rng, edge), rng.uniform(0.05, 0.09) * size, size, 0.35)
    raise ValueError(f"unknown defect type {kind}")


def _draw(
    kind: str,
    rng: np.random.Generator,
    clean: np.ndarray,
    region: np.ndarray,
    behind: np.ndarray | None,
) -> np.ndarray:
    """The defective picture inside ``region`` (float RGB; only region pixels are used)."""
    brightness = float(clean[region].mean()) if region.any() else 0.5
    if kind == "scratch":
        sign = -1.0 if brightness > 0.7 else (1.0 if brightness < 0.3 else rng.choice([-1.0, 1.0]))
        return clean + sign * rng.uniform(0.12, 0.45)
    if kind == "crack":
        return clean * rng.uniform(0.10, 0.45)
    if kind == "spot":
        if rng.random() < 0.6:
            target = rng.uniform(0.03, 0.25) * np.array([1.0, rng.uniform(0.8, 1.0), rng.uniform(0.6, 1.0)])
        else:
            target = np.array([rng.uniform(0.85, 1.0)] * 3)
        strength = rng.uniform(0.35, 0.9)
        return clean * (1 - strength) + target * strength
    if kind == "stain":
        tints = ([0.55, 0.40, 0.20], [0.85, 0.80, 0.35], [0.35, 0.35, 0.38], [0.45, 0.25, 0.30])
        tint = np.asarray(tints[int(rng.integers(len(tints)))])
        strength = rng.uniform(0.25, 0.65)
        return clean * (1 - strength + strength * tint)
    if kind == "missing_piece":
        if behind is not None:  # an object: the background shows through the gap
            return behind
        hole = np.array([0.06, 0.06, 0.07]) * (1 + 0.2 * rng.standard_normal(clean.shape[:2]))[..., None]
        strength = rng.uniform(0.7, 1.0)
        return clean * (1 - strength) + hole * strength
    raise ValueError(f"unknown defect type {kind}")


def _apply_defect(
    kind: str, rng: np.random.Generator, clean: np.ndarray, scene: _Scene, finish, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(defective uint8, mask) with mask == pixels that differ from ``_to_uint8(clean)``."""
    if scene.alpha is None:
        margin = int(0.08 * size)
        inside = np.zeros((size, size), dtype=bool)
        inside[margin:-margin, margin:-margin] = True
        edge = inside
        allowed = np.ones((size, size), dtype=bool)
    else:
        allowed = scene.alpha > 0.5
        inside = ndimage.binary_erosion(allowed, iterations=max(1, int(2 * _scale(size))))
        edge = allowed & ~inside
    behind = finish(scene.background) if scene.background is not None else None
    min_area = max(8, int(0.0008 * size * size))
    region = np.zeros((size, size), dtype=bool)
    for _ in range(30):  # placements that barely touch the part are redrawn
        region = _region(kind, rng, size, inside, edge) & allowed
        if region.sum() >= min_area:
            break
    clean_u8 = _to_uint8(clean)
    drawn_u8 = _to_uint8(_draw(kind, rng, clean, region, behind))
    # Every region pixel must change visibly: push faint ones by MIN_DEFECT_DELTA, away from the
    # nearer end of the range so at least one channel always moves.
    delta = np.abs(drawn_u8.astype(np.int16) - clean_u8.astype(np.int16)).max(axis=-1)
    faint = region & (delta < MIN_DEFECT_DELTA)
    direction = np.where(clean_u8.mean(axis=-1, keepdims=True) < 128, 1, -1)
    pushed = np.clip(clean_u8.astype(np.int16) + direction * MIN_DEFECT_DELTA, 0, 255).astype(np.uint8)
    drawn_u8 = np.where(faint[..., None], pushed, drawn_u8)
    defective = np.where(region[..., None], drawn_u8, clean_u8)
    mask = (defective != clean_u8).any(axis=-1)
    assert np.array_equal(mask, region), "defect region and changed pixels must coincide"
    return defective, mask


# --------------------------------------------------------------------------------------------
# Public rendering API
# --------------------------------------------------------------------------------------------
def _rngs(seed: int, category: str, split: str, index: int) -> tuple[np.random.Generator, ...]:
    sequence = np.random.SeedSequence(
        [int(seed), CATEGORIES.index(category), _SPLIT_CODES[split], int(index)]
    )
    return tuple(np.random.default_rng(child) for child in sequence.spawn(3))


def _check_category(category: str) -> None:
    if category not in _GENERATORS:
        raise DataError(f"unknown generated category '{category}': choose from {', '.join(CATEGORIES)}")


def render_image(
    category: str, index: int, *, split: str = "train", size: int = 128, seed: int = 0
) -> np.ndarray:
    """One defect-free image (H×W×3 uint8) of ``category``."""
    _check_category(category)
    scene_rng, finish_rng, _ = _rngs(seed, category, split, index)
    scene = _GENERATORS[category](scene_rng, size)
    return _to_uint8(_finish(finish_rng, size)(scene.surface))


def render_pair(
    category: str, index: int, defect: str, *, split: str = "test", size: int = 128, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(clean, defective, mask)``: the same image without and with ``defect``.

    ``clean`` and ``defective`` are H×W×3 uint8, ``mask`` H×W bool, and
    ``mask == (clean != defective).any(-1)`` holds exactly.
    """
    _check_category(category)
    if defect not in DEFECT_TYPES:
        raise DataError(f"unknown defect type '{defect}': choose from {', '.join(DEFECT_TYPES)}")
    scene_rng, finish_rng, defect_rng = _rngs(seed, category, split, index)
    scene = _GENERATORS[category](scene_rng, size)
    finish = _finish(finish_rng, size)
    clean = finish(scene.surface)
    defective, mask = _apply_defect(defect, defect_rng, clean, scene, finish, size)
    return _to_uint8(clean), defective, mask


# --------------------------------------------------------------------------------------------
# Writing a dataset
# --------------------------------------------------------------------------------------------
def _category_names(categories: int | Sequence[str]) -> list[str]:
    if isinstance(categories, (int, np.integer)) and not isinstance(categories, bool):
        if not 1 <= int(categories) <= len(CATEGORIES):
            raise DataError(f"--categories must be between 1 and {len(CATEGORIES)}, got {categories}")
        return list(CATEGORIES[: int(categories)])
    names = [str(c).strip() for c in categories]
    for name in names:
        _check_category(name)
    if not names:
        raise DataError("no categories to generate")
    return list(dict.fromkeys(names))


def _validate(train: int, test: int, size: int) -> None:
    if train < 1:
        raise DataError(f"--train must be at least 1, got {train}")
    if test < 0:
        raise DataError(f"--test must not be negative, got {test}")
    if not 32 <= size <= 2048:
        raise DataError(f"--size must be between 32 and 2048 pixels, got {size}")


def _save_png(array: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _write_dataset(
    directory: str,
    names: list[str],
    train: int,
    test: int,
    size: int,
    seed: int,
    progress: Callable[[int, int], None] | None,
) -> dict:
    total = len(names) * (train + test)
    done = 0
    good_tests = (test + 1) // 2
    counts: dict[str, dict[str, int]] = {}
    for category in names:
        base = os.path.join(directory, category)
        per_category = {"train/good": train, "test/good": good_tests}
        for i in range(train):
            _save_png(
                render_image(category, i, split="train", size=size, seed=seed),
                os.path.join(base, "train", "good", f"{i:03d}.png"),
            )
            done += 1
            if progress:
                progress(done, total)
        defect_counter = {d: 0 for d in DEFECT_TYPES}
        for j in range(test):
            if j < good_tests:
                image = render_image(category, j, split="test", size=size, seed=seed)
                _save_png(image, os.path.join(base, "test", "good", f"{j:03d}.png"))
            else:
                defect = DEFECT_TYPES[(j - good_tests) % len(DEFECT_TYPES)]
                number = defect_counter[defect]
                defect_counter[defect] += 1
                _, defective, mask = render_pair(category, j, defect, size=size, seed=seed)
                _save_png(defective, os.path.join(base, "test", defect, f"{number:03d}.png"))
                _save_png(
                    mask.astype(np.uint8) * 255,
                    os.path.join(base, "ground_truth", defect, f"{number:03d}_mask.png"),
                )
                per_category[f"test/{defect}"] = defect_counter[defect]
            done += 1
            if progress:
                progress(done, total)
        counts[category] = per_category
    manifest = {
        "generator": "agp_data.generate",
        "version": GENERATOR_VERSION,
        "layout": "mvtec",
        "params": {"categories": names, "train": train, "test": test, "size": size, "seed": seed},
        "counts": counts,
    }
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return manifest


def _read_manifest(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("generator") != "agp_data.generate":
        return None
    return manifest


def _is_generated(directory: str) -> bool:
    return _read_manifest(directory) is not None


def _generated_files(manifest: dict) -> set[str]:
    """Relative paths of every file a generation with this manifest wrote (from its counts)."""
    files = {MANIFEST}
    counts = manifest.get("counts")
    for category, groups in (counts if isinstance(counts, dict) else {}).items():
        for group, count in (groups if isinstance(groups, dict) else {}).items():
            split, _, kind = str(group).partition("/")
            for number in range(int(count) if isinstance(count, int) else 0):
                files.add(f"{category}/{split}/{kind}/{number:03d}.png")
                if split == "test" and kind != "good":
                    files.add(f"{category}/ground_truth/{kind}/{number:03d}_mask.png")
    return files


def _foreign_files(directory: str, manifest: dict) -> list[str]:
    """Files under ``directory`` that the generation recorded in ``manifest`` did not write."""
    skipped: list[tuple[str, str]] = []
    present = storage.list_files(directory, skipped=skipped) + [path for path, _ in skipped]
    expected = _generated_files(manifest)
    return sorted(p for p in present if os.path.relpath(p, directory).replace(os.sep, "/") not in expected)


def generate_dataset(
    out: str,
    *,
    categories: int | Sequence[str] = 3,
    train: int = 40,
    test: int = 20,
    size: int = 128,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Write a generated dataset in the MVTec-AD layout to ``out`` (local or ``s3://``).

    ``categories``: the first N of :data:`CATEGORIES`, or their names. Per category: ``train``
    normal training images, ``test`` test images (the first half good, the rest cycling through
    :data:`DEFECT_TYPES`), masks in ``ground_truth/<defect>/<nnn>_mask.png``, plus a
    ``dataset.json`` manifest. A previous generated dataset at ``out`` is replaced as a whole,
    unless it holds files the generator did not write (then, like any other non-empty
    directory, it is refused and nothing is touched). Returns ``out`` (absolute for local paths).
    """
    names = _category_names(categories)
    train, test, size, seed = int(train), int(test), int(size), int(seed)
    _validate(train, test, size)
    out = str(out)
    if storage.is_s3(out):
        storage.split_s3(out)
        with tempfile.TemporaryDirectory(prefix="agp-generate-") as scratch:
            try:
                _write_dataset(scratch, names, train, test, size, seed, progress)
            except OSError as exc:
                raise storage.local_write_error(scratch, exc, folder=scratch) from exc
            storage.upload_dir(scratch, out)
        return out.rstrip("/")

    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out} is a file: give a directory")
    storage.check_writable_dir(out)  # a read-only disk or a file in the way: fail before rendering
    replacing = os.path.isdir(out) and bool(os.listdir(out))
    manifest = _read_manifest(out) if replacing else None
    if replacing and manifest is None:
        raise DataError(
            f"--out {out} is not empty and not a generated dataset: choose an empty or new directory"
        )
    if manifest is not None:
        # Replacing the folder as a whole would delete what the user added to it.
        foreign = _foreign_files(out, manifest)
        if foreign:
            shown = ", ".join(os.path.relpath(p, out) for p in foreign[:3])
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise DataError(
                f"--out {out} holds a generated dataset plus {len(foreign)} file(s) agp did not "
                f"generate ({shown}{more}): pass another --out or move those files away"
            )
    parent = os.path.dirname(out)
    storage.make_dirs(parent)
    try:
        scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    except OSError as exc:
        raise storage.local_write_error(out, exc, folder=parent) from exc
    try:
        _write_dataset(scratch, names, train, test, size, seed, progress)
        os.chmod(scratch, storage.DIR_MODE)  # mkdtemp makes it 0700
        if os.path.isdir(out):
            retired = os.path.join(parent, f".{os.path.basename(out)}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, retired)
            try:
                os.rename(scratch, out)
            except BaseException:
                os.rename(retired, out)  # the previous dataset back rather than none at all
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(scratch, out)
    except BaseException as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, DataError):
            raise storage.local_write_error(out, exc, folder=out) from exc
        raise
    return out


def synthetic_params(**params) -> dict:
    """Defaults (:data:`DEFAULT_PARAMS`) updated with ``params``; unknown names raise DataError."""
    unknown = sorted(set(params) - set(DEFAULT_PARAMS))
    if unknown:
        raise DataError(
            f"unknown synthetic dataset parameter(s) {', '.join(unknown)}: use {', '.join(DEFAULT_PARAMS)}"
        )
    merged = {**DEFAULT_PARAMS, **{k: v for k, v in params.items() if v is not None}}
    merged["categories"] = _category_names(merged["categories"])
    for key in ("train", "test", "size", "seed"):
        merged[key] = int(merged[key])
    _validate(merged["train"], merged["test"], merged["size"])
    return merged


def synthetic_root(cache_dir: str | None = None, **params) -> str:
    """The generated dataset for ``params``, created on first use and reused afterwards.

    Lives in ``<cache_dir or $AGP_CACHE_DIR or ~/.cache/agp>/synthetic/<hash of params>``.
    Generation goes to a temporary directory renamed into place, so concurrent first uses are
    safe: the first rename wins and the others discard their copy.
    """
    merged = synthetic_params(**params)
    key = json.dumps({"version": GENERATOR_VERSION, **merged}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    base = os.path.join(os.path.abspath(os.path.expanduser(cache_dir or storage.cache_root())), "synthetic")
    target = os.path.join(base, digest)
    if _is_generated(target):
        return target
    os.makedirs(base, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{digest}.tmp-", dir=base)
    try:
        _write_dataset(
            scratch,
            merged["categories"],
            merged["train"],
            merged["test"],
            merged["size"],
            merged["seed"],
            None,
        )
        os.chmod(scratch, storage.DIR_MODE)
        try:
            os.rename(scratch, target)
        except OSError:
            if not _is_generated(target):  # not a lost race: something else is in the way
                raise DataError(f"cannot create {target}: remove it and retry") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def timed_generate(out: str, **params) -> tuple[str, float, int]:
    """``generate_dataset`` plus elapsed seconds and the number of images written."""
    start = time.perf_counter()
    path = generate_dataset(out, **params)
    names = _category_names(params.get("categories", DEFAULT_PARAMS["categories"]))
    count = len(names) * (
        int(params.get("train", DEFAULT_PARAMS["train"])) + int(params.get("test", DEFAULT_PARAMS["test"]))
    )
    return path, time.perf_counter() - start, count
