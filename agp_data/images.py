"""Reading images and masks as they come from real cameras and annotation tools.

Images become RGB uint8 whatever the file holds (grayscale, palette, alpha, 16-bit, CMYK, EXIF
rotation); masks become boolean arrays (any value > 0 is defect). Files on S3 are read through
the local cache (:func:`agp_data.storage.local_copy`).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from agp_data import storage
from agp_data.errors import DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# PIL decoders of those extensions, the only ones tried: others (EPS runs Ghostscript) never see a file.
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_UNREADABLE_FIX = "replace or delete the file"
_READ_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def is_image_file(path: str) -> bool:
    """True if the file name ends in one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def _open(path_or_uri: str, what: str, cache_dir: str | None = None) -> Image.Image:
    path = storage.local_copy(path_or_uri, cache_dir) if storage.is_s3(path_or_uri) else str(path_or_uri)
    if not os.path.exists(path):
        raise DataError(f"cannot read {what} {path_or_uri}: no such file; check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": we still get pixels
            image = Image.open(path, formats=IMAGE_FORMATS)
            image.load()
            # Rotate to the orientation the camera recorded; a broken EXIF block is ignored.
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:  # noqa: BLE001 - any EXIF parsing failure just means "as stored"
                pass
    except _READ_ERRORS as exc:
        reason = str(exc) or type(exc).__name__
        raise DataError(f"cannot read {what} {path_or_uri}: {reason}; {_UNREADABLE_FIX}") from exc
    return image


def _sixteen_bit_to_uint8(array: np.ndarray) -> np.ndarray:
    # The container's full range maps to 0..255, the same for every image of a dataset: stretching
    # each image by its own min/max would make brightness differ between parts, which a detector
    # learns as a feature. (x * 255 / 65535 with rounding; 65535 → 255, 0 → 0.)
    values = np.clip(array.astype(np.float64), 0, 65535)
    return np.round(values * (255.0 / 65535.0)).astype(np.uint8)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        gray = _sixteen_bit_to_uint8(np.asarray(image))
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite_max = float(np.nanmax(values)) if values.size else 0.0
        scale = 255.0 if finite_max <= 1.0 else 1.0  # float images are either 0..1 or 0..255
        gray = np.round(np.clip(np.nan_to_num(values) * scale, 0, 255)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        # Composite on black: transparent pixels carry no part, so they read as background.
        return np.round(rgba[..., :3] * alpha).astype(np.uint8)
    if mode != "RGB":
        image = image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return np.asarray(image, dtype=np.uint8)


def rgb_array(image: Image.Image) -> np.ndarray:
    """An in-memory PIL image as an RGB uint8 (H, W, 3) array, converted as :func:`read_image`
    converts files (grayscale, palette, alpha on black, 16-bit); raises DataError when it cannot be."""
    try:
        return _to_rgb_array(image)
    except _READ_ERRORS as exc:
        raise DataError(f"cannot convert a {image.mode} image to RGB: {exc}") from exc


def read_image(path_or_uri: str, cache_dir: str | None = None) -> Image.Image:
    """The image at a local path or ``s3://`` URI as an RGB uint8 PIL image.

    Handles PNG/JPEG/BMP/TIFF/WebP, grayscale, palette, alpha (composited on black), 16-bit
    (scaled by 255/65535) and EXIF orientation. Unreadable or corrupt files raise DataError.
    """
    image = _open(str(path_or_uri), "image", cache_dir)
    try:
        array = _to_rgb_array(image)
    except _READ_ERRORS as exc:
        raise DataError(f"cannot read image {path_or_uri}: {exc}; {_UNREADABLE_FIX}") from exc
    return Image.fromarray(np.ascontiguousarray(array))


def read_mask(
    path_or_uri: str, size: tuple[int, int] | None = None, cache_dir: str | None = None
) -> np.ndarray:
    """A defect mask as a boolean (H, W) array: any non-zero value is defect.

    Palette masks use the palette index (0 = background); colour masks any channel; a mask whose
    only information is its alpha channel uses that. ``size`` = (width, height) resizes with
    nearest neighbour.
    """
    image = _open(str(path_or_uri), "mask", cache_dir)
    array = np.asarray(image)
    if array.ndim == 3:
        channels = array.shape[-1]
        has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa")
        colour = array[..., : channels - 1] if has_alpha else array
        mask = (colour > 0).any(axis=-1)
        if has_alpha:
            alpha = array[..., -1] > 0
            mask = mask & alpha if mask.any() else alpha
    else:
        mask = array > 0
    if size is not None:
        width, height = int(size[0]), int(size[1])
        if mask.shape != (height, width):
            resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (width, height), Image.Resampling.NEAREST
            )
            mask = np.asarray(resized) > 127
    return np.ascontiguousarray(mask, dtype=bool)


def decoded_size(path_or_uri: str, cache_dir: str | None = None, what: str = "image") -> tuple[int, int]:
    """(width, height) like :func:`image_size`, but after decoding every pixel: a truncated or
    corrupt file, whose header alone looks fine, raises DataError. ``what`` names the file in
    that message ("image", "mask")."""
    image = _open(str(path_or_uri), what, cache_dir)
    size = image.size
    image.close()
    return size


def image_size(path_or_uri: str, header_bytes: int = 1 << 16) -> tuple[int, int]:
    """(width, height) from the file header only, honouring EXIF rotation; DataError if unreadable.

    For S3 only the first ``header_bytes`` are fetched (the whole file if the header is longer).
    """
    import io

    uri = str(path_or_uri)
    try:
        if storage.is_s3(uri):
            head = storage.read_head(uri, header_bytes)
            try:
                return _header_size(Image.open(io.BytesIO(head)))
            except _READ_ERRORS:
                if len(head) < header_bytes:
                    raise
                return _header_size(Image.open(io.BytesIO(storage.read_bytes(uri))))
        with Image.open(uri) as image:
            return _header_size(image)
    except FileNotFoundError as exc:
        raise DataError(f"cannot read image {uri}: no such file; check the path") from exc
    except _READ_ERRORS as exc:
        reason = str(exc) or type(exc).__name__
        raise DataError(f"cannot read image {uri}: {reason}; {_UNREADABLE_FIX}") from exc


def _header_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - broken EXIF: report the stored size
        orientation = 1
    if orientation in (5, 6, 7, 8):  # 90° rotations swap the sides
        return height, width
    return width, height
