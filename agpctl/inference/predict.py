"""``agpctl predict``: score new images with a trained run and write what a person needs.

For every readable input image: an image score, anomalous yes/no at the image threshold, and
at the original image size a colour-mapped heatmap, an overlay of it on the image and the
binary defect mask at the pixel threshold. All rows go to ``predictions.csv`` and
``predictions.json``. Unreadable files are reported and skipped, never fatal.

Decoding runs in a thread pool one batch ahead of the model, and encoding/writing output
files in another, so the model rarely waits on I/O. Inputs and outputs may be local or S3.

Heatmap colours use one fixed scale for every image (so two heatmaps can be compared):
0 → dark blue, the pixel threshold → the middle of the colour map (green), twice the pixel
threshold or more → dark red.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import io
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Union

import numpy as np
from PIL import Image

from agp_data import storage
from agp_data.errors import DataError
from agp_data.images import is_image_file, read_image
from agpctl.errors import UserError
from agpctl.inference.detection import Detection
from agpctl.inference.onnx_runtime import load_onnx_detector
from agpctl.inference.thresholds import Thresholds
from agpctl.strict_json import to_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from agpctl.inference.detector import Detector
    from agpctl.inference.onnx_runtime import OnnxDetector  # noqa: F401 - in AnyDetector

    AnyDetector = Union[Detector, OnnxDetector]

CSV_FILE = "predictions.csv"
JSON_FILE = "predictions.json"
IMAGE_FORMATS = ("png", "jpg")
OVERLAY_ALPHA = 0.5  # weight of the heatmap in the overlay
# New columns go last, so readers that count columns keep working.
CSV_COLUMNS = ["path", "score", "anomalous", "image_threshold", "pixel_threshold", "defect_area_px", "width",
               "height", "heatmap", "overlay", "mask", "category", "category_source", "category_similarity"]
_GLOB_CHARS = "*?["


# -- inputs ------------------------------------------------------------------------------
@dataclass
class InputImage:
    path: str  # local path or s3:// URI, as read
    name: str  # output name relative to the input root, without extension ("sub/img_001")


def discover_inputs(source: str, recursive: bool = False, exclude: str | None = None,
                    skipped: list[tuple[str, str]] | None = None) -> list[InputImage]:
    """Images named by ``source``: one file, a folder (sub-folders with ``recursive``), a glob
    (``**`` with ``recursive``), or an ``s3://`` prefix / object / glob. Files without an image
    extension are ignored inside folders; a file named directly is always tried. Files below
    ``exclude`` (predict's own output folder, when it lies inside the input) are left out.
    Entries that cannot be read (a symbolic-link loop, a broken link) are skipped, never fatal;
    ``skipped`` gets (path, reason) for each."""
    source = str(source)
    if any(c in source for c in _GLOB_CHARS):
        root, paths = _glob(source, recursive)
    elif storage.is_s3(source):
        source = source.rstrip("/")
        paths = storage.list_files(source, recursive=recursive)
        if paths == [source]:  # a single object
            root = source.rsplit("/", 1)[0]
        else:
            root = source
            paths = [p for p in paths if is_image_file(p)]
    elif os.path.isfile(source):
        root, paths = os.path.dirname(os.path.abspath(source)), [os.path.abspath(source)]
    elif os.path.isdir(source):
        root = source
        paths = [p for p in storage.list_files(source, recursive=recursive, skipped=skipped) if is_image_file(p)]
    else:
        raise UserError(f"input {source} does not exist; give an image, a folder, a glob or an s3:// prefix")
    if exclude:
        paths = [p for p in paths if not _below(p, exclude)]
    if not paths:
        hint = "" if recursive else " (add --recursive to include sub-folders)"
        raise UserError(f"no images found in {source}{hint}")
    return _named(root, sorted(paths))


def _below(path: str, folder: str) -> bool:
    if storage.is_s3(path) != storage.is_s3(folder):
        return False
    if storage.is_s3(path):
        return path.startswith(folder.rstrip("/") + "/")
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(folder)


def _glob(pattern: str, recursive: bool) -> tuple[str, list[str]]:
    prefix = pattern[: min(pattern.index(c) for c in _GLOB_CHARS if c in pattern)]
    if storage.is_s3(pattern):
        root = prefix.rsplit("/", 1)[0]
        # fnmatch's * crosses "/"; without --recursive keep matches in the pattern's own depth.
        depth = pattern.count("/")
        paths = [p for p in storage.list_files(root, recursive=True) if fnmatch.fnmatchcase(p, pattern)
                 and (recursive or p.count("/") == depth)]
    else:
        root = os.path.dirname(prefix) or "."
        paths = [os.path.abspath(p) for p in glob.glob(pattern, recursive=recursive) if os.path.isfile(p)]
        root = os.path.abspath(root)
    return root, [p for p in paths if is_image_file(p)]


def _named(root: str, paths: list[str]) -> list[InputImage]:
    """Output names: the path below ``root`` without extension; the extension is kept (as
    ``_ext``) only where two inputs would otherwise share a name (``a.png`` and ``a.jpg``)."""
    def relative(path: str) -> str:
        if storage.is_s3(path):
            rest = path[len(root.rstrip("/")) + 1:] if path.startswith(root.rstrip("/") + "/") else path.rsplit("/", 1)[-1]
        else:
            rest = os.path.relpath(path, root)
        return rest.replace(os.sep, "/")

    rels = [relative(p) for p in paths]
    stems = [os.path.splitext(r)[0] for r in rels]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    names = [stem if counts[stem] == 1 else stem + "_" + os.path.splitext(rel)[1].lstrip(".").lower()
             for stem, rel in zip(stems, rels)]
    return [InputImage(p, n) for p, n in zip(paths, names)]


# -- maps to pictures --------------------------------------------------------------------
# Anchor colours of a jet-like map (dark blue → blue → cyan → green → yellow → red → dark red).
_ANCHORS = np.array([
    [0.0, 0.0, 0.0, 0.5], [0.11, 0.0, 0.0, 1.0], [0.36, 0.0, 1.0, 1.0], [0.5, 0.0, 1.0, 0.5],
    [0.64, 1.0, 1.0, 0.0], [0.89, 1.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0],
])
_LUT = np.stack([np.interp(np.linspace(0, 1, 256), _ANCHORS[:, 0], _ANCHORS[:, c]) for c in (1, 2, 3)], axis=1)
COLORMAP = np.round(_LUT * 255).astype(np.uint8)  # (256, 3)


def colorize(values: np.ndarray, vmax: float) -> np.ndarray:
    """(H, W) map → (H, W, 3) uint8 RGB: 0 → dark blue, ``vmax`` and above → dark red."""
    scale = 255.0 / vmax if vmax > 0 else 0.0
    index = np.clip(np.nan_to_num(values) * scale, 0, 255).astype(np.uint8)
    return COLORMAP[index]


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    return np.round(image.astype(np.float32) * (1 - alpha) + heat.astype(np.float32) * alpha).astype(np.uint8)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if fmt == "jpg":
        image.save(buffer, format="JPEG", quality=92)
    else:
        image.save(buffer, format="PNG", compress_level=1)  # speed over a few % of size
    return buffer.getvalue()


# -- the prediction loop -----------------------------------------------------------------
@dataclass
class PredictReport:
    out: str
    thresholds: Thresholds  # pooled (or given): decides images without thresholds of their category
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)
    category_thresholds: dict[str, Thresholds] = field(default_factory=dict)  # categories with their own

    @property
    def anomalous(self) -> int:
        return sum(1 for r in self.rows if r["anomalous"] == "yes")

    def top(self, k: int = 5) -> list[dict[str, Any]]:
        return sorted(self.rows, key=lambda r: -r["score"])[:k]

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "threshold": vars(self.thresholds),
            "category_thresholds": {name: vars(t) for name, t in self.category_thresholds.items()},
            "summary": {"images": len(self.rows), "anomalous": self.anomalous, "normal": len(self.rows) - self.anomalous,
                        "skipped": len(self.skipped), "seconds": round(self.seconds, 3)},
            "predictions": self.rows,
            "skipped": self.skipped,
        }


def _load(item: InputImage, detector: AnyDetector) -> tuple[Any, np.ndarray]:
    rgb = np.asarray(read_image(item.path))
    return detector.preprocess(rgb), rgb


def predict_images(detector: AnyDetector, inputs: list[InputImage], out: str, *, batch_size: int | None = None,
                   image_format: str = "png", write_images: bool = True, io_threads: int | None = None,
                   on_progress: Callable[[int, int], None] | None = None,
                   on_skip: Callable[[str, str], None] | None = None,
                   model_info: dict[str, Any] | None = None, write_summary: bool = True) -> PredictReport:
    """Decide ``inputs`` with ``detector`` (its batch size unless ``batch_size``) and write every
    output below ``out``; ``write_summary=False`` leaves predictions.csv/json to the caller
    (sharded predict)."""
    if image_format not in IMAGE_FORMATS:
        raise UserError(f"--format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    batch_size = detector.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    report = PredictReport(out=out, thresholds=detector.thresholds.default, model=model_info or {},
                           category_thresholds=dict(detector.thresholds.per_category))
    started = time.perf_counter()
    threads = io_threads or min(8, (os.cpu_count() or 2) + 2)
    batches = [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
    done = 0
    with ThreadPoolExecutor(threads) as readers, ThreadPoolExecutor(threads) as writers:
        def submit(batch: list[InputImage]) -> list[Future]:
            return [readers.submit(_load, item, detector) for item in batch]

        pending_writes: list[Future] = []
        upcoming = submit(batches[0]) if batches else []
        for index, batch in enumerate(batches):
            loads = upcoming
            upcoming = submit(batches[index + 1]) if index + 1 < len(batches) else []  # decode ahead
            tensors, originals, items = [], [], []
            for item, future in zip(batch, loads):
                try:
                    tensor, rgb = future.result()
                except DataError as exc:
                    report.skipped.append({"path": item.path, "error": str(exc)})
                    if on_skip is not None:
                        on_skip(item.path, str(exc))
                    continue
                tensors.append(tensor)
                originals.append(rgb)
                items.append(item)
            if items:
                detections = detector.detect(detector.collate(tensors), [rgb.shape[:2] for rgb in originals],
                                             [item.path for item in items])
                for item, rgb, detection in zip(items, originals, detections):
                    row, files = _row(item, rgb, detection, out, image_format, write_images)
                    report.rows.append(row)
                    pending_writes.extend(writers.submit(_encode_and_write, uri, data) for uri, data in files)
            done += len(batch)
            pending_writes = _drain(pending_writes, limit=4 * batch_size)
            if on_progress is not None:
                on_progress(done, len(inputs))
        _drain(pending_writes, limit=0)
    report.seconds = time.perf_counter() - started
    if write_summary:
        write_tables(report, out)
    return report


def _encode_and_write(uri: str, data: Callable[[], bytes]) -> None:
    storage.write_bytes(uri, data())


def _drain(futures: list[Future], limit: int) -> list[Future]:
    """Wait until at most ``limit`` writes are outstanding (bounds memory); re-raises failures."""
    while len(futures) > limit:
        futures.pop(0).result()
    return futures


def _row(item: InputImage, rgb: np.ndarray, detection: Detection, out: str, image_format: str, write_images: bool
         ) -> tuple[dict[str, Any], list[tuple[str, Callable[[], bytes]]]]:
    full_map, mask, pixel_threshold = detection.map, detection.mask, detection.pixel_threshold
    height, width = full_map.shape
    row: dict[str, Any] = {
        "path": item.path, "score": detection.score, "anomalous": "yes" if detection.anomalous else "no",
        "image_threshold": detection.image_threshold, "pixel_threshold": pixel_threshold,
        "defect_area_px": int(mask.sum()), "width": width, "height": height,
        "heatmap": "", "overlay": "", "mask": "",
        "category": detection.category, "category_source": detection.category_source,
        "category_similarity": detection.category_similarity,
    }
    files: list[tuple[str, Callable[[], bytes]]] = []
    if write_images:
        # One colour scale per pixel threshold: images decided by the same thresholds compare.
        vmax = 2.0 * pixel_threshold if pixel_threshold > 0 else float(full_map.max())
        heat = colorize(full_map, vmax)
        row["heatmap"] = storage.join(out, "heatmaps", f"{item.name}.{image_format}")
        row["overlay"] = storage.join(out, "overlays", f"{item.name}.{image_format}")
        row["mask"] = storage.join(out, "masks", f"{item.name}.png")
        # Encoding happens on the writer threads (PIL releases the GIL while compressing).
        files = [
            (row["heatmap"], lambda heat=heat: encode(heat, image_format)),
            (row["overlay"], lambda heat=heat, rgb=rgb: encode(overlay(rgb, heat), image_format)),
            (row["mask"], lambda mask=mask: encode(mask.astype(np.uint8) * 255, "png")),
        ]
    return row, files


def write_tables(report: PredictReport, out: str) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        similarity = row.get("category_similarity")
        writer.writerow({**row, "score": f"{row['score']:.6g}",
                         "category_similarity": "" if similarity is None else f"{similarity:.4f}"})
    storage.write_text(storage.join(out, CSV_FILE), buffer.getvalue())
    storage.write_text(storage.join(out, JSON_FILE), to_json(report.as_dict()) + "\n")


def run_predict(source: str, run_uri: str, out: str, *, threshold: str = "auto", pixel_threshold: float | None = None,
                recursive: bool = False, category: str | None = None, batch_size: int | None = None,
                image_format: str = "png", write_images: bool = True, device: torch.device | None = None,
                on_start: Callable[[int], None] | None = None, on_warning: Callable[[str], None] | None = None,
                **kwargs: Any) -> PredictReport:
    """Load the run, find the inputs, predict; see :func:`predict_images`. ``category``: a
    per-category run's model, or for a multi-class run the category of every image."""
    # Imported here, not at the top: predict --model (run_predict_model) must work without torch.
    from agpctl import runs
    from agpctl.inference.detector import Detector
    from agpctl.models import default_device

    model_uri = runs.select_model_run(run_uri, category)
    device = device or default_device()
    run = runs.load_run(model_uri, device, warn=on_warning)
    detector = Detector.from_run(run, category=category, threshold=threshold, pixel_threshold=pixel_threshold,
                                 batch_size=batch_size, device=device, warn=on_warning)
    return _predict_source(detector, source, out, recursive, on_start, model_info=run.info(),
                           image_format=image_format, write_images=write_images, **kwargs)


def run_predict_model(source: str, model_uri: str, out: str, *, threshold: str = "auto",
                      pixel_threshold: float | None = None, recursive: bool = False, category: str | None = None,
                      batch_size: int | None = None, on_start: Callable[[int], None] | None = None,
                      on_warning: Callable[[str], None] | None = None, threads: int | None = None,
                      **kwargs: Any) -> PredictReport:
    """:func:`run_predict` with an exported ONNX model (and its sidecar) in place of a run:
    onnxruntime, numpy and Pillow only; the same outputs. ``category``: every image's category."""
    detector = load_onnx_detector(model_uri, category, threshold=threshold, pixel_threshold=pixel_threshold,
                                  batch_size=batch_size, on_warning=on_warning, threads=threads)
    return _predict_source(detector, source, out, recursive, on_start, model_info=detector.info(), **kwargs)


def _predict_source(detector: AnyDetector, source: str, out: str, recursive: bool,
                    on_start: Callable[[int], None] | None, **kwargs: Any) -> PredictReport:
    """Find the inputs of ``source``, predict them and write predictions.csv / .json."""
    unreadable: list[tuple[str, str]] = []
    inputs = discover_inputs(source, recursive, exclude=out, skipped=unreadable)
    if on_start is not None:
        on_start(len(inputs))
    report = predict_images(detector, inputs, out, write_summary=False, **kwargs)
    note_unreadable(report, unreadable, kwargs.get("on_skip"))
    write_tables(report, out)
    return report


def note_unreadable(report: PredictReport, unreadable: list[tuple[str, str]],
                    on_skip: Callable[[str, str], None] | None) -> None:
    """Folder entries that could not even be listed join the report's skipped files."""
    for path, reason in unreadable:
        error = f"{path}: {reason}"
        report.skipped.append({"path": path, "error": error})
        if on_skip is not None:
            on_skip(path, error)

