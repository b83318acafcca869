"""An exported ONNX model as a detector, without PyTorch: onnxruntime, numpy and Pillow only.

``agpctl export --format onnx`` writes ``model.onnx`` and its sidecar ``model.onnx.json``
(:mod:`agpctl.inference.onnx_sidecar`). :class:`OnnxDetector` reads both and answers as
:class:`agpctl.inference.detector.Detector` does on the run — same resize (PIL bilinear),
same map resize to the image (bilinear, half-pixel centres), same categories (given, single,
path, nearest prototype through the graph's ``features`` output), same thresholds per
category — through the torch-free :mod:`agpctl.inference.detection` both share. It is what
``agpctl.api.load("model.onnx")`` and ``agpctl predict --model model.onnx`` use.

The graph computes in float32: maps and scores match the PyTorch path at fp32 within float
tolerance (a run whose precision resolves to bf16 answers within bf16 rounding of it).

Nothing here may import torch (tests run it with torch's import blocked).
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any, Callable

import numpy as np

from agp_data import storage
from agp_data.errors import DataError
from agp_data.tiling import Tiling, cut_tiles, stitch, to_working_resolution
from agpctl.errors import UserError, first_line
from agpctl.inference.detection import (
    Detection,
    FoundCategory,
    as_images,
    check_category,
    decide,
    decode,
    find_categories,
    resized_rgb,
)
from agpctl.inference.numpy_postprocess import resize_map, resize_tiles, tiled_image_score
from agpctl.inference.onnx_sidecar import Sidecar, read_sidecar
from agpctl.inference.thresholds import ThresholdPolicy

SUFFIX = ".onnx"
INPUT = "image"
OUTPUTS = ("map", "score")
FEATURES = "features"


def is_onnx_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported ONNX model (by its extension)."""
    return os.fspath(path).lower().endswith(SUFFIX)


class OnnxDetector:
    """Scores images with an exported ONNX model and decides them with its sidecar's thresholds."""

    def __init__(self, session: Any, sidecar: Sidecar, thresholds: ThresholdPolicy, *, model: str,
                 batch_size: int | None = None, category: str | None = None):
        batch_size = sidecar.eval_batch_size if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        self.session = session
        self.sidecar = sidecar
        self.thresholds = thresholds
        self.batch_size = batch_size
        self.run = model  # names the model in messages, as Detector names its run
        self.size = sidecar.input_size
        self.categories = sorted(sidecar.categories)
        self.category = check_category(category, self.categories, model)
        self.tiling = Tiling.from_dict(sidecar.tiling)  # the run's: images are cut, scored by tile, stitched
        prototypes = sidecar.prototypes
        self._names = list(prototypes["names"]) if prototypes else []
        self._vectors = _unit_rows(np.asarray(prototypes["vectors"], dtype=np.float32)) if prototypes else None
        self._outputs = [*OUTPUTS, *([FEATURES] if prototypes else [])]

    def info(self) -> dict[str, Any]:
        """What predictions record about the model that made them."""
        return {"model": self.run, "format": "onnx", "run": self.sidecar.run, "method": self.sidecar.method,
                "epoch": self.sidecar.epoch, "image_size": self.sidecar.input.get("model_size")}

    # -- the shared path (as Detector's) ----------------------------------------------------
    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB → the graph's (3, S, S) float32 input in [0, 1] (normalised
        inside the graph); with a tiling the whole image at the working resolution (H', W', 3),
        cut later by :meth:`detect`."""
        if self.tiling is not None:
            return to_working_resolution(rgb, self.tiling).astype(np.float32) / np.float32(255.0)
        return np.ascontiguousarray(resized_rgb(rgb, self.size).transpose(2, 0, 1))

    def collate(self, images: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        """Preprocessed images as one batch for :meth:`detect` (tiled: the list, sizes may differ)."""
        return list(images) if self.tiling is not None else np.stack(images)

    def detect(self, images: np.ndarray, sizes: list[tuple[int, int]], paths: list[str | None] | None = None,
               category: str | None = None) -> list[Detection]:
        """Decisions on a batch of preprocessed ``images`` (B, 3, S, S) whose originals had
        ``sizes`` (height, width); ``paths`` may name the category, ``category`` names it."""
        paths = paths or [None] * len(images)
        if self.tiling is not None:
            return self._detect_tiled(images, sizes, paths, category)
        maps, scores, features = self.run_graph(images)
        full_maps = [resize_map(m, int(height), int(width)) for m, (height, width) in zip(maps, sizes)]
        found = self.categories_of(features, paths, category)
        return [decide(score, full_map, one, self.thresholds, path)
                for score, full_map, one, path in zip(scores, full_maps, found, paths)]

    def _detect_tiled(self, images: list[np.ndarray], sizes: list[tuple[int, int]], paths: list[str | None],
                      category: str | None) -> list[Detection]:
        """As ``Detector._detect_tiled``: each image cut into tiles (at the graph's input size),
        tile maps resized to the tile and stitched, the image scored on the stitched map by the
        method's rule, its pooled features the mean over its tiles."""
        tile = self.tiling.tile
        stitched, scores, features = [], [], []
        for working in images:
            tiles, origins = cut_tiles(working, self.tiling)
            inputs = resize_tiles(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2)), self.size)
            maps, features_of_tiles = [], []
            for start in range(0, len(inputs), self.batch_size):
                chunk_maps, _, chunk_features = self.run_graph(inputs[start:start + self.batch_size])
                maps.append(chunk_maps)
                features_of_tiles.append(chunk_features)
            tile_maps = np.concatenate(maps)
            if tile_maps.shape[-1] != tile:
                tile_maps = np.stack([resize_map(m, tile, tile) for m in tile_maps])
            full_map = stitch(tile_maps, origins, working.shape[0], working.shape[1], self.tiling)
            stitched.append(full_map)
            scores.append(tiled_image_score(full_map, self.sidecar.scoring, tile))
            features.append(np.concatenate(features_of_tiles).mean(axis=0) if self._vectors is not None else None)
        found = self.categories_of(np.stack(features) if self._vectors is not None else None, paths, category)
        detections = []
        for full_map, score, size, one, path in zip(stitched, scores, sizes, found, paths):
            if full_map.shape != tuple(size):  # a working resolution: back to the original's size
                full_map = resize_map(full_map, int(size[0]), int(size[1]))
            detections.append(decide(score, full_map, one, self.thresholds, path))
        return detections

    def run_graph(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(maps (B, S, S), scores (B,), features (B, D) or None) of ``images``. A graph traced
        at a fixed batch size gets its batches padded with the last image."""
        fixed = self.sidecar.fixed_batch
        count = len(images)
        parts: list[list[np.ndarray]] = []
        step = fixed or count
        for start in range(0, count, step):
            chunk = images[start:start + step].astype(np.float32, copy=False)
            if fixed and len(chunk) < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - len(chunk), axis=0)])
            outputs = self.session.run(self._outputs, {INPUT: chunk})
            parts.append([np.asarray(o)[:min(step, count - start)] for o in outputs])
        joined = [np.concatenate([p[i] for p in parts]) for i in range(len(self._outputs))]
        return joined[0], joined[1], joined[2] if len(joined) > 2 else None

    def categories_of(self, features: np.ndarray | None, paths: list[str | None], category: str | None = None
                      ) -> list[FoundCategory]:
        """(category, source, similarity) of each image, as :meth:`Detector.categories_of`."""
        given = check_category(category, self.categories, self.run) if category is not None else self.category

        def nearest(indices: list[int]) -> list[tuple[str, float]]:
            similarity = _unit_rows(features[indices].astype(np.float32)) @ self._vectors.T
            best = similarity.argmax(axis=1)
            return [(self._names[int(k)], float(similarity[row, k])) for row, k in enumerate(best)]

        inferable = self._vectors is not None and features is not None
        return find_categories(paths, self.categories, given, nearest if inferable else None)

    # -- the Python API -------------------------------------------------------------------
    def predict(self, images: Any, category: str | None = None) -> list[Detection]:
        """One :class:`Detection` per image, in input order; the inputs of
        :meth:`agpctl.inference.detector.Detector.predict` (torch tensors when torch exists)."""
        inputs = as_images(images)
        check_category(category, self.categories, self.run)
        detections: list[Detection] = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = [(decode(item), item if isinstance(item, str) else None)
                     for item in inputs[start:start + self.batch_size]]
            batch = self.collate([self.preprocess(rgb) for rgb, _ in chunk])
            detections += self.detect(batch, [rgb.shape[:2] for rgb, _ in chunk], [path for _, path in chunk],
                                      category)
        return detections


def load_onnx_detector(model: str | os.PathLike, category: str | None = None, *, threshold: str | float = "auto",
                       pixel_threshold: float | None = None, device: str | None = None,
                       batch_size: int | None = None, on_warning: Callable[[str], None] | None = None,
                       threads: int | None = None) -> OnnxDetector:
    """The detector of an exported ONNX model (local or ``s3://``) and its sidecar.
    ``category``: the category of every image (else found per image); ``threshold``: "auto"
    (the sidecar's calibrated thresholds) or a number; ``device``: None / "cpu", or "cuda"
    (onnxruntime's CUDA provider); ``threads``: onnxruntime's intra-op threads (default: its own)."""
    warn = on_warning or (lambda text: warnings.warn(text, stacklevel=3))
    uri = os.fspath(model)
    data = _read_model(uri)
    session = _session(data, uri, device, threads)
    sidecar = read_sidecar(uri, data)
    _check_graph(session, sidecar, uri)
    policy = ThresholdPolicy(sidecar.thresholds, str(threshold), pixel_threshold, run=uri, warn=warn)
    return OnnxDetector(session, sidecar, policy, model=uri, batch_size=batch_size, category=category)


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length as ``torch.nn.functional.normalize`` does (eps 1e-12)."""
    norms = np.sqrt((matrix * matrix).sum(axis=1, keepdims=True))
    return matrix / np.maximum(norms, np.float32(1e-12))


def _read_model(uri: str) -> bytes:
    try:
        if not storage.exists(uri):
            raise UserError(f"model {uri} does not exist; pass the file agpctl export --format onnx wrote")
        return storage.read_bytes(uri)
    except DataError as exc:
        raise UserError(f"cannot read model {uri}: {exc}") from None


def _onnxruntime():
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise UserError("running an ONNX model needs the onnxruntime package: pip install onnxruntime "
                        "(or pip install 'agp[deploy]')") from None


def _session(data: bytes, uri: str, device: str | None, threads: int | None):
    onnxruntime = _onnxruntime()
    kind = str(device or "cpu").split(":")[0].lower()
    providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}.get(kind)
    if providers is None:
        raise UserError(f"device {device!r} is not one onnxruntime runs an agp model on; use 'cpu' or 'cuda'")
    if kind == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise UserError("device 'cuda' needs onnxruntime's CUDA provider: pip install onnxruntime-gpu "
                        "(in place of onnxruntime), or use device 'cpu'")
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        return onnxruntime.InferenceSession(data, sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors for bad files
        raise UserError(f"{uri} is not a model onnxruntime can load ({first_line(exc)[:200]}); "
                        "re-export it with agpctl export --format onnx") from None


def _check_graph(session: Any, sidecar: Sidecar, uri: str) -> None:
    inputs = [i.name for i in session.get_inputs()]
    outputs = {o.name for o in session.get_outputs()}
    needed = {*OUTPUTS, *([FEATURES] if sidecar.prototypes else [])}
    if inputs != [INPUT] or not needed <= outputs:
        raise UserError(f"{uri} has inputs {inputs} and outputs {sorted(outputs)}, not those of an agp export "
                        f"(input {INPUT!r}, outputs {sorted(needed)}); re-export it with agpctl export --format onnx")
