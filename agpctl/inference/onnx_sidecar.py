"""The sidecar of an exported ONNX model: ``<model>.onnx.json`` beside ``<model>.onnx``.

The ONNX graph holds normalisation, the frozen backbone and the method with its own
post-processing (smoothing, score pooling); what a deployment needs besides, to give the
answers ``agpctl predict --run`` gives, is in this plain JSON file, written by ``agpctl
export --format onnx`` after the model verified:

- ``format`` / ``format_version`` / ``agp_version``: what wrote it (a newer version is refused);
- ``model``: the ONNX file's name, size and SHA-256 (a sidecar of another export is refused);
- ``method``, ``run``, ``epoch``: where the model came from;
- ``input``: the graph's input side ``size`` (images are resized to size×size by PIL
  bilinear, RGB / 255, layout (B, 3, S, S) float32), the trained ``model_size``, ``mean`` /
  ``std`` (applied inside the graph, recorded for reference), ``batch_size`` (None: any);
- ``postprocess``: what the runtime does after the graph (the map resized bilinearly with
  half-pixel centres to the image's size; mask = map > pixel threshold; anomalous = score >
  image threshold);
- ``tiling``: :meth:`agp_data.tiling.Tiling.to_dict` of the run, or None; ``scoring``: for a
  tiled run the method's ``image_size``, ``smoothing_sigma``, ``score_sigma`` and
  ``score_pool``, with which the stitched map is scored (see
  :mod:`agpctl.inference.tiled_scoring`), else None;
- ``thresholds``: the run's stored thresholds (pooled ones and one pair per category);
- ``categories``: the names the model knows; ``prototypes``: when it knows several, one
  pooled-feature vector per category (the graph's ``features`` output is compared with them,
  cosine) — without them, images of a multi-class model whose category is neither given nor
  in their path are ``unknown`` and decided by the pooled thresholds;
- ``precision``: the run's inference precision (the graph always computes in float32).

Torch-free: the ONNX runtime reads it where torch is not installed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from agp_data import storage
from agp_data.errors import DataError
from agpctl import __version__
from agpctl.errors import UserError
from agpctl.strict_json import to_json

FORMAT = "agp-onnx-sidecar"
FORMAT_VERSION = 1
SUFFIX = ".json"  # model.onnx → model.onnx.json
POSTPROCESS = {
    "map_resize": "bilinear, half-pixel centres (align_corners=False), no antialiasing, to the image's size",
    "mask": "map > pixel threshold",
    "anomalous": "score > image threshold",
    "thresholds": "the image's category's pair when calibrated (stable), else the pooled pair",
}
_REEXPORT = "re-export it: agpctl export --run RUN --format onnx --out {model}"


def sidecar_uri(model_uri: str) -> str:
    return model_uri + SUFFIX


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Sidecar:
    method: str
    run: str
    epoch: int
    model: dict[str, Any]  # file, bytes, sha256
    input: dict[str, Any]  # size, model_size, mean, std, resize, scale, layout, batch_size
    thresholds: dict[str, Any]
    categories: list[str]
    prototypes: dict[str, Any] | None  # names, vectors (K×D), images, feature; None: not inferred
    tiling: dict[str, Any] | None
    precision: str
    eval_batch_size: int
    postprocess: dict[str, str]
    scoring: dict[str, Any] | None = None  # tiled runs: how the stitched map is scored
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    agp_version: str = __version__

    @property
    def input_size(self) -> int:
        return int(self.input["size"])

    @property
    def fixed_batch(self) -> int | None:
        return self.input.get("batch_size")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def input_description(size: int, model_size: int, mean: list[float], std: list[float],
                      batch_size: int | None) -> dict[str, Any]:
    """The ``input`` entry: how images become the graph's input."""
    return {"size": int(size), "model_size": int(model_size), "resize": "PIL bilinear to size×size", "scale": "1/255",
            "layout": "(B, 3, size, size) float32 RGB in [0, 1]", "mean": [float(v) for v in mean],
            "std": [float(v) for v in std], "normalised_in_graph": True, "batch_size": batch_size}


def write_sidecar(model_uri: str, sidecar: Sidecar) -> str:
    """Write ``sidecar`` beside ``model_uri``; returns its URI."""
    uri = sidecar_uri(model_uri)
    storage.write_text(uri, to_json(sidecar.to_dict()) + "\n")
    return uri


def read_sidecar(model_uri: str, model_bytes: bytes) -> Sidecar:
    """The sidecar of the model file ``model_uri`` whose bytes are ``model_bytes``; every way
    it can be missing, damaged, too new or another model's is one UserError naming the fix."""
    uri = sidecar_uri(model_uri)
    fix = _REEXPORT.format(model=model_uri)
    try:
        if not storage.exists(uri):
            raise UserError(f"{model_uri} has no {uri} beside it (input size, thresholds and categories that agp "
                            f"needs to use the model); copy it along with the model, or {fix}")
        text = storage.read_text(uri)
    except DataError as exc:
        raise UserError(f"cannot read {uri}: {exc}") from None
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{uri} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{uri} is not an agp export sidecar; {fix}")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{uri} has sidecar format version {version!r}, this agp ({__version__}) reads up to "
                        f"{FORMAT_VERSION}; upgrade agp or {fix}")
    expected = (data.get("model") or {}).get("sha256") if isinstance(data.get("model"), dict) else None
    actual = sha256(model_bytes)
    if expected != actual:
        raise UserError(f"{uri} belongs to another model file (SHA-256 {str(expected)[:12]}…, {model_uri} has "
                        f"{actual[:12]}…: another export, or the file changed since); keep each .onnx with the .json "
                        f"written with it, or {fix}")
    try:
        sidecar = Sidecar(**data)
        _check(sidecar)
    except (TypeError, KeyError, ValueError) as exc:
        raise UserError(f"{uri} is damaged ({str(exc).splitlines()[0][:200]}); {fix}") from None
    return sidecar


def _check(sidecar: Sidecar) -> None:
    """The fields the runtime relies on have usable types (a hand-edited file fails here)."""
    size = sidecar.input["size"]
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"input.size must be a positive integer, got {size!r}")
    batch = sidecar.input.get("batch_size")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise ValueError(f"input.batch_size must be a positive integer or null, got {batch!r}")
    if not isinstance(sidecar.thresholds, dict):
        raise ValueError("thresholds must be an object")
    if not isinstance(sidecar.categories, list) or not all(isinstance(c, str) for c in sidecar.categories):
        raise ValueError("categories must be a list of names")
    if sidecar.prototypes is not None:
        names, vectors = sidecar.prototypes["names"], sidecar.prototypes["vectors"]
        if len(names) != len(vectors) or len({len(v) for v in vectors}) > 1:
            raise ValueError("prototypes must hold one vector of the same length per name")
    if sidecar.tiling is not None:
        for key in ("image_size", "smoothing_sigma", "score_sigma", "score_pool"):
            sidecar.scoring[key]  # noqa: B018 - a KeyError names the missing setting
    if not isinstance(sidecar.eval_batch_size, int) or sidecar.eval_batch_size < 1:
        raise ValueError(f"eval_batch_size must be a positive integer, got {sidecar.eval_batch_size!r}")
