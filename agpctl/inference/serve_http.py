"""The HTTP contract of ``agpctl serve``, free of Ray and of any web framework.

Requests become images here: the body read up to a limit, one image (raw bytes) or several
(``multipart/form-data``, one image per part), each decoded to RGB uint8 the way
:func:`agp_data.images.read_image` decodes files (so a served image scores exactly like the
same file given to ``agpctl predict``), and decisions become JSON. Every way a request can be
wrong raises :class:`RequestError`: a 4xx status and one line that says what to change.

Statuses: 400 malformed request (empty body, broken multipart, unknown query parameter or
category), 413 too large (body, one image's bytes, its pixels, the request's pixels, too many
images), 415 not an image of an accepted format, 422 an image that cannot be decoded
(truncated, corrupt).
"""

from __future__ import annotations

import base64
import io
import uuid
import warnings
from dataclasses import dataclass, field
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Any, AsyncIterator, Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from agp_data.errors import DataError
from agp_data.images import IMAGE_FORMATS, rgb_array
from agpctl.inference.detector import Detection
from agpctl.inference.predict import colorize, encode

MB = 1_000_000
FORMATS = "PNG, JPEG, BMP, TIFF or WebP"
QUERY_FLAGS = ("heatmap", "mask")
QUERY_NAMES = (*QUERY_FLAGS, "category")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
# What PIL raises for bytes it cannot decode (incl. its own decompression-bomb guard).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class RequestError(Exception):
    """A request the service cannot answer; ``status`` is the HTTP status (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ServeLimits:
    """What one request may hold; larger requests get a 413 before they cost memory or time."""

    max_image_bytes: int = 50 * MB  # one encoded image
    max_request_bytes: int = 200 * MB  # the whole body
    max_image_pixels: int = 50_000_000  # width x height of one decoded image: stops decompression bombs
    # All images of one request together: many small-compressed images add up (64 of 50 MP: ~10 GB).
    max_request_pixels: int = 200_000_000
    max_images: int = 64  # images in one multipart request

    def problems(self) -> list[str]:
        names = {"max_image_bytes": "--max-image-bytes", "max_request_bytes": "--max-request-bytes",
                 "max_image_pixels": "--max-image-pixels", "max_request_pixels": "--max-request-pixels",
                 "max_images": "--max-images-per-request"}
        return [f"{flag} must be at least 1, got {getattr(self, name)}"
                for name, flag in names.items() if getattr(self, name) < 1]


@dataclass(frozen=True)
class PredictOptions:
    """What a ``POST /predict`` asks for besides its images (from the query string)."""

    heatmap: bool = False
    mask: bool = False
    category: str | None = None


@dataclass
class ImagePart:
    """One image of a request: its name (the multipart file name or field name) and its bytes."""

    name: str
    data: bytes


@dataclass
class DecodedImage:
    name: str
    rgb: np.ndarray | None = None  # (H, W, 3) uint8
    error: RequestError | None = None


@dataclass
class Outcome:
    """The answer to one image: a decision, or the reason it got none."""

    name: str
    detection: Detection | None = None
    error: RequestError | None = None
    extras: dict[str, Any] = field(default_factory=dict)


# -- the request ----------------------------------------------------------------------------
def predict_options(query: Iterable[tuple[str, str]]) -> PredictOptions:
    """``?heatmap=1&mask=1&category=NAME`` as :class:`PredictOptions`; anything else is a 400."""
    values: dict[str, str] = {}
    for key, value in query:
        if key not in QUERY_NAMES:
            raise RequestError(400, f"unknown query parameter {key!r}; use {', '.join(QUERY_NAMES)}")
        values[key] = value
    flags = {}
    for key in QUERY_FLAGS:
        text = values.get(key, "0").strip().lower()
        if text not in _TRUE + _FALSE:
            raise RequestError(400, f"?{key}={values[key]}: use {key}=1 or {key}=0")
        flags[key] = text in _TRUE
    category = values.get("category") or None
    return PredictOptions(heatmap=flags["heatmap"], mask=flags["mask"], category=category)


async def read_body(chunks: AsyncIterator[bytes], content_length: str | None, limits: ServeLimits) -> bytes:
    """The request body from its ``chunks``, refused (413) as soon as it is known to be larger
    than the limit: from ``Content-Length`` before reading, else while reading."""
    limit = limits.max_request_bytes
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestError(400, f"Content-Length {content_length!r} is not a number") from None
        if declared > limit:
            raise RequestError(413, _too_large("request body", declared, limit, "--max-request-bytes"))
    received: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise RequestError(413, _too_large("request body", size, limit, "--max-request-bytes", at_least=True))
        received.append(chunk)
    return b"".join(received)


def image_parts(content_type: str | None, body: bytes, limits: ServeLimits) -> list[ImagePart]:
    """The images of a request body: every part of a ``multipart/form-data`` body, else the
    whole body as one image named ``image``."""
    if not body:
        raise RequestError(400, f"the request has no body; send image bytes ({FORMATS}) or multipart/form-data")
    media_type, params = _header_value(content_type or "")
    if media_type == "multipart/form-data":
        return _multipart(body, params.get("boundary"), limits.max_images)
    if media_type.startswith("multipart/"):
        raise RequestError(400, f"{media_type} is not supported; send multipart/form-data or the image bytes")
    return [ImagePart("image", body)]


def decode_image(data: bytes, limits: ServeLimits) -> np.ndarray:
    """Encoded image bytes → (H, W, 3) uint8 RGB, converted as files are (grey, palette, alpha on
    black, 16-bit, EXIF rotation). The pixel limit is checked from the header, before decoding."""
    return _pixels(_opened(data, limits), len(data))


def _opened(data: bytes, limits: ServeLimits) -> Image.Image:
    """The image of ``data`` with only its header read, refused when it is not one of
    :data:`~agp_data.images.IMAGE_FORMATS` or larger than one image may be."""
    if not data:
        raise RequestError(400, "the image is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, _too_large("image", len(data), limits.max_image_bytes, "--max-image-bytes"))
    with warnings.catch_warnings():
        # PIL warns above its own pixel limit; ours is checked below and decides.
        warnings.simplefilter("ignore")
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as exc:
            raise RequestError(413, f"image refused: {exc}") from None
        except (UnidentifiedImageError, *_DECODE_ERRORS):
            raise RequestError(415, f"not an image that can be read ({len(data)} bytes); send {FORMATS} bytes") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise RequestError(413, f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the "
                                f"limit of {limits.max_image_pixels / 1e6:g} (--max-image-pixels); "
                                "send a smaller image")
    return image


def _pixels(image: Image.Image, size: int) -> np.ndarray:
    """The RGB pixels of an image :func:`_opened` accepted (``size``: its encoded bytes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as in _opened: our limits decide, not PIL's
        try:
            image.load()
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:  # noqa: BLE001 - a broken EXIF block means "as stored", as for files
                pass
            return rgb_array(image)
        except (DataError, *_DECODE_ERRORS) as exc:
            reason = str(exc) or type(exc).__name__
            kind = f"{image.format} image" if image.format else "image"
            raise RequestError(422, f"cannot decode the {kind} ({size} bytes): {reason}; "
                                    "send the complete file") from None


def decode_parts(parts: list[ImagePart], limits: ServeLimits) -> list[DecodedImage]:
    """Each part decoded, or the reason it could not be (one bad image never fails the others).
    Every header is read first: a request whose images together exceed the pixel limit is
    refused (413) before any of them is decoded."""
    opened: list[Image.Image | RequestError] = []
    for part in parts:
        try:
            opened.append(_opened(part.data, limits))
        except RequestError as exc:
            opened.append(exc)
    total = sum(image.width * image.height for image in opened if isinstance(image, Image.Image))
    if total > limits.max_request_pixels:
        raise RequestError(413, f"the request's images hold {total / 1e6:.1f} megapixels together, over the limit "
                                f"of {limits.max_request_pixels / 1e6:g} (--max-request-pixels); "
                                "send them in several requests")
    decoded = []
    for part, image in zip(parts, opened):
        if isinstance(image, RequestError):
            decoded.append(DecodedImage(part.name, error=image))
            continue
        try:
            decoded.append(DecodedImage(part.name, rgb=_pixels(image, len(part.data))))
        except RequestError as exc:
            decoded.append(DecodedImage(part.name, error=exc))
    return decoded


# -- the answer -----------------------------------------------------------------------------
def detection_json(name: str, detection: Detection, options: PredictOptions) -> dict[str, Any]:
    """One image's decision as JSON; the heatmap (colours as ``agpctl predict`` draws them) and
    the mask as base64 PNG when ``options`` ask for them."""
    height, width = detection.map.shape
    out: dict[str, Any] = {
        "name": name,
        "score": float(detection.score),
        "decision": "anomalous" if detection.anomalous else "normal",
        "anomalous": bool(detection.anomalous),
        "category": detection.category,
        "category_source": detection.category_source,
        "category_similarity": detection.category_similarity,
        "image_threshold": float(detection.image_threshold),
        "pixel_threshold": float(detection.pixel_threshold),
        "width": int(width),
        "height": int(height),
        "defect_area_px": int(detection.mask.sum()),
    }
    if options.heatmap:
        # The fixed scale of predict's heatmap files: the pixel threshold is the middle colour.
        vmax = 2.0 * detection.pixel_threshold if detection.pixel_threshold > 0 else float(detection.map.max())
        out["heatmap_png"] = base64.b64encode(encode(colorize(detection.map, vmax), "png")).decode("ascii")
    if options.mask:
        out["mask_png"] = base64.b64encode(encode(detection.mask.astype(np.uint8) * 255, "png")).decode("ascii")
    return out


def error_json(error: RequestError, name: str | None = None) -> dict[str, Any]:
    return {**({"name": name} if name is not None else {}), "error": error.message, "status": error.status}


def predict_answer(outcomes: list[Outcome], options: PredictOptions) -> tuple[int, dict[str, Any]]:
    """(status, JSON) of a ``/predict`` request. One image: its decision, or its error as the
    request's. Several: 200 with one entry per image (a decision or an error), unless none
    could be decided (then the first error's status)."""
    entries = [detection_json(o.name, o.detection, options) if o.detection is not None else error_json(o.error, o.name)
               for o in outcomes]
    failed = [o for o in outcomes if o.detection is None]
    if len(outcomes) == 1 and failed:
        return failed[0].error.status, {"error": failed[0].error.message}
    if failed and len(failed) == len(outcomes):
        first = failed[0]
        message = f"none of the {len(outcomes)} images could be scored; {first.name}: {first.error.message}"
        return first.error.status, {"error": message, "predictions": entries}
    return 200, {"predictions": entries}


def encode_multipart(files: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    """(Content-Type, body) of a ``multipart/form-data`` request holding ``files`` (name,
    bytes): what a Python client (or the benchmark) sends for several images at once."""
    boundary = f"agp-{uuid.uuid4().hex}"
    chunks = []
    for index, (name, data) in enumerate(files):
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        chunks += [f"--{boundary}\r\nContent-Disposition: form-data; name=\"image{index}\"; filename=\"{quoted}\"\r\n"
                   "Content-Type: application/octet-stream\r\n\r\n".encode("utf-8"), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return f"multipart/form-data; boundary={boundary}", b"".join(chunks)


# -- helpers ----------------------------------------------------------------------------------
def _too_large(what: str, size: int, limit: int, flag: str, at_least: bool = False) -> str:
    amount = f"{'over ' if at_least else ''}{size / MB:.1f} MB"
    return f"{what} is {amount}, over the limit of {limit / MB:g} MB ({flag}); send a smaller one"


def _header_value(value: str) -> tuple[str, dict[str, str]]:
    """A header's value and its parameters, lower-case names (``multipart/form-data; boundary=x``)."""
    message = Message()
    message["content-type"] = value
    params = message.get_params(header="content-type") or []
    media = params[0][0].strip().lower() if params else ""
    # RFC 2231 values (filename*=UTF-8''…) come as (charset, language, text) tuples.
    return media, {k.lower(): collapse_rfc2231_value(v) for k, v in params[1:]}


def _multipart(body: bytes, boundary: str | None, max_images: int) -> list[ImagePart]:
    """The parts of a ``multipart/form-data`` body (RFC 7578), each taken as one image; more
    than ``max_images`` is a 413 before any part is parsed."""
    if not boundary:
        raise RequestError(400, "multipart/form-data without a boundary; let the HTTP client set the Content-Type")
    # Parsing costs per part: millions of minimal parts in a body within the byte limit would
    # hold the replica for half a minute. The boundary may not occur inside a part (RFC 2046), so
    # its occurrences, less the closing one, bound the number of parts.
    count = body.count(b"--" + boundary.encode("latin-1")) - 1
    if count > max_images:
        raise RequestError(413, f"{count} images in one request, over the limit of {max_images} "
                                "(--max-images-per-request); send them in several requests")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    # The first delimiter may open the body without the CRLF that precedes the others.
    pieces = (b"\r\n" + body).split(delimiter)
    parts: list[ImagePart] = []
    closed = False
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            closed = True
            break
        # After the delimiter: optional whitespace, CRLF, headers, a blank line, the content.
        start = piece.find(b"\r\n")
        end = piece.find(b"\r\n\r\n", max(start, 0))
        if start < 0 or end < 0 or piece[:start].strip():
            raise RequestError(400, "malformed multipart/form-data body (a part without headers)")
        headers = _part_headers(piece[start + 2:end])
        disposition, params = _header_value(headers.get("content-disposition", ""))
        if disposition != "form-data":
            raise RequestError(400, "malformed multipart/form-data body (a part without Content-Disposition: form-data)")
        name = params.get("filename") or params.get("name") or f"image-{len(parts) + 1}"
        parts.append(ImagePart(name, piece[end + 4:]))
    if not closed:
        raise RequestError(400, "the multipart/form-data body ends before its closing boundary (upload cut short?)")
    if not parts:
        raise RequestError(400, "the multipart/form-data body holds no images")
    return parts


def _part_headers(block: bytes) -> dict[str, str]:
    headers = {}
    for line in block.decode("utf-8", errors="replace").split("\r\n"):
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    return headers

