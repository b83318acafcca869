"""``agpctl export``: one self-contained model file (ONNX or TorchScript) per run.

The exported graph is the whole inference path — input normalisation, the frozen backbone,
the method and its post-processing — so a deployment needs nothing from agp:

    input  ``image``  float32 (B, 3, S, S), RGB in [0, 1]
    output ``map``    float32 (B, S, S) anomaly map (same scale as ``agpctl predict``)
    output ``score``  float32 (B,) image anomaly score
    output ``features`` float32 (B, D) pooled backbone features (ONNX of a multi-class run only:
                      an image's category is the closest prototype of the sidecar)

Resizing an image to S×S, the map back to the image's size, categories and thresholds are not
in the graph: an ONNX export writes them to a sidecar (``<out>.json``, see
:mod:`agpctl.inference.onnx_sidecar`) that :mod:`agpctl.inference.onnx_runtime` reads.

State a method needs at inference (OneNIP's prompt pool and score normalisation) lives in
buffers, so tracing carries it into the file. When ``S`` differs from the size the model was
trained at, the graph resizes the input to the trained size and the map back to ``S``.

Every export is verified: the written file is loaded again (onnxruntime / ``torch.jit.load``)
and its maps and scores are compared with the PyTorch model on a few images.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agp_data import storage
from agp_data.tiling import Tiling
from agpctl import runs
from agpctl.errors import UserError
from agpctl.inference import onnx_sidecar
from agpctl.inference.categories import PAYLOAD_KEY, CategoryPrototypes, pooled_features
from agpctl.inference.detector import run_categories

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17
# Verification tolerance on maps and scores: |exported − PyTorch| ≤ ATOL + RTOL · max|PyTorch map|.
# float32 kernels of different runtimes reorder sums; differences observed are ~1e-6 relative.
VERIFY_ATOL = 1e-4
VERIFY_RTOL = 1e-3
VERIFY_IMAGES = 3


class ExportedAnomalyModel(nn.Module):
    """RGB in [0, 1] (B, 3, S, S) → (map (B, S, S), score (B,)). Registers the backbone as a
    sub-module (an :class:`AnomalyModel` deliberately does not) so its weights are exported."""

    def __init__(self, model: nn.Module, image_size: int | None = None, with_features: bool = False):
        super().__init__()
        self.method = model
        self.with_features = with_features  # a third output: pooled features for category inference
        self.backbone = model.backbone  # the same object the method calls
        self.model_size = int(model.cfg.image_size)
        self.image_size = int(image_size or self.model_size)
        mean = torch.tensor(model.backbone.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(model.backbone.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        x = (image - self.mean) / self.std
        if self.image_size != self.model_size:
            x = F.interpolate(x, size=(self.model_size, self.model_size), mode="bilinear", align_corners=False)
        prediction = self.method.predict(x)
        maps = prediction.maps.float()
        if self.image_size != self.model_size:
            maps = F.interpolate(maps.unsqueeze(1), size=(self.image_size, self.image_size), mode="bilinear",
                                 align_corners=False).squeeze(1)
        if self.with_features:
            return maps, prediction.scores.float(), pooled_features(self.method, x)
        return maps, prediction.scores.float()


@dataclass
class ExportResult:
    path: str
    format: str
    image_size: int
    method: str
    bytes: int
    map_max_abs_diff: float
    score_max_abs_diff: float
    tolerance: float
    verified_images: int
    verified_batch_sizes: list[int]
    batch_size: int | None  # None: any batch size; else the graph's fixed batch size
    sha256: str = ""  # of the written file
    sidecar: str | None = None  # ONNX: what inference needs besides the graph (onnx_sidecar)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def verification_images(image_size: int, count: int = VERIFY_IMAGES, seed: int = 0) -> Tensor:
    """Deterministic test inputs in [0, 1]: smooth gradients with a bright square (a defect-like
    blob) plus noise, so maps have structure rather than being flat."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, image_size)
    base = (ramp.view(1, -1) + ramp.view(-1, 1)) / 2
    images = []
    for i in range(count):
        image = base.expand(3, -1, -1).clone() * (0.5 + 0.1 * i)
        side = max(2, image_size // 6)
        top = (i * image_size // 4) % (image_size - side)
        image[:, top:top + side, top:top + side] = 0.95
        image += 0.05 * torch.rand(3, image_size, image_size, generator=generator)
        images.append(image.clamp(0, 1))
    return torch.stack(images)


def check_exportable(model: nn.Module) -> None:
    cfg = model.cfg
    if getattr(cfg, "prompt_selection", None) == "class":
        raise UserError("onenip with prompt_selection 'class' picks prompts by category name, which an exported "
                        "model cannot receive; retrain with prompt_selection 'similarity' to export")
    pool = getattr(model, "pool_features", None)
    if pool is not None and pool.shape[0] == 0:
        raise UserError("onenip model has no prompt pool (inference state never fitted); use a finished run")


def export_model(model: nn.Module, out: str, fmt: str, image_size: int | None = None, opset: int = DEFAULT_OPSET,
                 metadata: dict[str, Any] | None = None, batch_size: int | None = None,
                 with_features: bool = False) -> ExportResult:
    """Export ``model`` (an eval-mode AnomalyModel) to ``out`` (local or s3://) and verify it;
    ``with_features`` (ONNX) adds the ``features`` output category inference compares."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if opset < 17:
        raise UserError(f"--opset {opset} is too old; use 17 or newer")
    check_exportable(model)
    model = model.to("cpu").eval()
    wrapper = ExportedAnomalyModel(model, image_size, with_features=with_features and fmt == "onnx").eval()
    size = wrapper.image_size
    meta = {"method": model.name, "image_size": size, "input": "image float32 (B,3,S,S) RGB in [0,1]",
            "outputs": "map (B,S,S), score (B,)" + (", features (B,D)" if wrapper.with_features else ""),
            **(metadata or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about constant shapes: sizes are fixed by design
        if fmt == "onnx":
            data, fixed_batch = _export_onnx(wrapper, opset, meta, batch_size)
        else:
            data, fixed_batch = _export_torchscript(wrapper, verification_images(size, 2, seed=1), meta), None
    storage.write_bytes(out, data)
    return verify_export(wrapper, storage.read_bytes(out), fmt, out, fixed_batch)


def _export_onnx(wrapper: nn.Module, opset: int, metadata: dict[str, Any], batch_size: int | None
                 ) -> tuple[bytes, int | None]:
    """(file bytes, fixed batch size or None for a dynamic batch dimension).

    The legacy (TorchScript-based) exporter is used: the dynamo exporter needs onnxscript, which
    is not a dependency of agp. The batch axis is dynamic; agp's methods read spatial sizes as
    Python ints so that kernels are constants. A method that derives a kernel from a traced
    shape makes the dynamic export fail, and is then traced at a fixed batch size instead."""
    onnx = optional_module("onnx")

    attempts: list[int | None] = [batch_size] if batch_size else [None, 1]
    last_error: Exception | None = None
    for fixed in attempts:
        example = verification_images(wrapper.image_size, fixed or 2, seed=1)
        buffer = io.BytesIO()
        outputs = ["map", "score"] + (["features"] if wrapper.with_features else [])
        dynamic = None if fixed else {name: {0: "batch"} for name in ["image", *outputs]}
        try:
            with _quiet_native_stderr():  # on failure the exporter's C++ side logs the whole graph
                torch.onnx.export(wrapper, (example,), buffer, dynamo=False, opset_version=opset, input_names=["image"],
                                  output_names=outputs, dynamic_axes=dynamic, do_constant_folding=True)
        except torch.onnx.errors.SymbolicValueError as exc:  # a shape-derived kernel: retry with a fixed batch
            last_error = exc
            continue
        proto = onnx.load_from_string(buffer.getvalue())
        meta = {**metadata, "batch_size": fixed or "dynamic"}
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = str(key), value if isinstance(value, str) else json.dumps(value)
        return proto.SerializeToString(), fixed
    raise UserError(f"ONNX export failed: {str(last_error).splitlines()[0][:300]}; try --format torchscript")


def optional_module(name: str):
    """An optional package of the ``export`` extra; its absence is one line naming the install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"ONNX export needs the {name} package, which agp installs as an extra: "
                        f"pip install 'agp[export]' (or use --format torchscript)") from None


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 (C++ logging does not go through sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _export_torchscript(wrapper: nn.Module, example: Tensor, metadata: dict[str, Any]) -> bytes:
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={"agp.json": json.dumps(metadata)})
    return buffer.getvalue()


def run_exported(data: bytes, fmt: str, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(maps, scores) of an exported model file's bytes on ``images`` (CPU)."""
    if fmt == "onnx":
        onnxruntime = optional_module("onnxruntime")
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        maps, scores = session.run(["map", "score"], {"image": images.numpy().astype(np.float32)})
        return np.asarray(maps), np.asarray(scores)
    module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.no_grad():
        maps, scores = module(images)
    return maps.numpy(), scores.numpy()


def verify_export(wrapper: nn.Module, data: bytes, fmt: str, out: str, fixed_batch: int | None = None) -> ExportResult:
    """Maps and scores of the file against PyTorch on VERIFY_IMAGES images. A dynamic-batch file
    also runs at batch sizes other than the traced one (2), so a batch size frozen into the
    graph is caught; a fixed-batch file runs at its batch size."""
    size = wrapper.image_size
    images = verification_images(size, VERIFY_IMAGES, seed=7)
    with torch.no_grad():
        ref_maps, ref_scores = (t.numpy() for t in wrapper(images)[:2])
    map_diff = score_diff = 0.0
    batch_sizes = [fixed_batch] if fixed_batch else [VERIFY_IMAGES, 1]
    for batch in batch_sizes:
        for start in range(0, VERIFY_IMAGES - batch + 1, batch):
            maps, scores = run_exported(data, fmt, images[start:start + batch])
            if maps.shape != ref_maps[start:start + batch].shape:
                raise UserError(f"exported model {out} returned maps of shape {maps.shape}, expected "
                                f"{ref_maps[start:start + batch].shape}")
            map_diff = max(map_diff, float(np.abs(maps - ref_maps[start:start + batch]).max()))
            score_diff = max(score_diff, float(np.abs(scores - ref_scores[start:start + batch]).max()))
    tolerance = VERIFY_ATOL + VERIFY_RTOL * float(np.abs(ref_maps).max())
    result = ExportResult(path=out, format=fmt, image_size=size, method=wrapper.method.name, bytes=len(data),
                          map_max_abs_diff=map_diff, score_max_abs_diff=score_diff, tolerance=tolerance,
                          verified_images=VERIFY_IMAGES, verified_batch_sizes=batch_sizes,
                          batch_size=fixed_batch, sha256=onnx_sidecar.sha256(data))
    if not (map_diff <= tolerance and score_diff <= tolerance):
        raise UserError(f"exported model {out} does not match PyTorch: max abs diff maps {map_diff:.3g}, scores "
                        f"{score_diff:.3g} > tolerance {tolerance:.3g}; report this with the run's config")
    return result


def export_run(run_uri: str, out: str, fmt: str, image_size: int | None = None, category: str | None = None,
               opset: int = DEFAULT_OPSET, batch_size: int | None = None,
               on_warning: Callable[[str], None] | None = None) -> ExportResult:
    """Load the run's latest checkpoint (on the CPU) and export it; thresholds go into metadata.
    ONNX: the sidecar beside ``out`` is written once the model verified."""
    run = runs.load_run(runs.select_model_run(run_uri, category), torch.device("cpu"), warn=on_warning)
    thresholds = {k: run.thresholds.get(k) for k in ("image", "pixel", "source")}
    tiling = Tiling.from_config(run.cfg.data)  # a tiled run's model scores tiles: the deployment must cut alike
    metadata = {"run": run.uri, "epoch": run.checkpoint.epoch, "thresholds": thresholds,
                "tiling": None if tiling is None else tiling.to_dict()}
    prototypes = CategoryPrototypes.from_payload(run.checkpoint.payload.get(PAYLOAD_KEY))
    # A category is inferred only for a model of several categories.
    infers = prototypes is not None and len(prototypes.names) > 1
    result = export_model(run.model, out, fmt, image_size, opset, metadata, batch_size, with_features=infers)
    if fmt == "onnx":
        result.sidecar = onnx_sidecar.write_sidecar(out, export_sidecar(run, result, prototypes))
    return result


def export_sidecar(run: runs.LoadedRun, result: ExportResult, prototypes: CategoryPrototypes | None
                   ) -> onnx_sidecar.Sidecar:
    """What the ONNX runtime needs of ``run`` besides the graph ``result`` describes."""
    model = run.model
    tiling = Tiling.from_config(run.cfg.data)
    stored_prototypes = None if prototypes is None or len(prototypes.names) < 2 else {
        "names": list(prototypes.names), "vectors": prototypes.vectors.float().tolist(),
        "images": list(prototypes.images), "feature": "the graph's features output; cosine similarity"}
    return onnx_sidecar.Sidecar(
        method=model.name, run=run.uri, epoch=run.checkpoint.epoch,
        model={"file": result.path.replace("\\", "/").rsplit("/", 1)[-1], "bytes": result.bytes,
               "sha256": result.sha256},
        input=onnx_sidecar.input_description(result.image_size, model.cfg.image_size, model.backbone.mean,
                                             model.backbone.std, result.batch_size),
        thresholds=dict(run.thresholds), categories=run_categories(run, prototypes), prototypes=stored_prototypes,
        tiling=None if tiling is None else tiling.to_dict(), scoring=None if tiling is None else {
            "image_size": int(model.cfg.image_size), "smoothing_sigma": float(model.cfg.smoothing_sigma or 0.0),
            "score_sigma": getattr(model.cfg, "score_sigma", None), "score_pool": int(model.cfg.score_pool)},
        precision=run.cfg.train.precision,
        eval_batch_size=int(run.cfg.train.eval_batch_size), postprocess=dict(onnx_sidecar.POSTPROCESS))
