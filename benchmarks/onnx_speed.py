"""Images/s of the exported ONNX model under onnxruntime (numpy + Pillow around it, no torch)
against the PyTorch detector at fp32 on the same decoded images, both on the CPU with the same
number of threads: resize, model, map back to the image's size, decision (no file I/O).

Uses a randomly initialised backbone (no download) and an untrained AGPNet head: speed does not
depend on the weights. Also prints the largest map / score difference between the two.

    .venv/bin/python benchmarks/onnx_speed.py [--images 64] [--size 512x384] [--image-size 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from agpctl.config import RunConfig
from agpctl.inference import onnx_sidecar
from agpctl.inference.detector import Detector
from agpctl.inference.export import export_model
from agpctl.inference.onnx_runtime import load_onnx_detector
from agpctl.inference.thresholds import ThresholdPolicy
from agpctl.models import build_model


def images_per_second(detector, images: list[np.ndarray], repeats: int) -> tuple[float, list]:
    detector.predict(images[: detector.batch_size])  # warm-up: allocations, kernel selection
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        results = detector.predict(images)
        best = min(best, time.perf_counter() - started)
    return len(images) / best, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", default="512x384", help="WIDTHxHEIGHT of the generated images")
    parser.add_argument("--image-size", type=int, default=128, help="model input side")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the fastest counts")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    torch.set_num_threads(args.threads)
    cfg = RunConfig(method="agpnet").with_overrides({
        "model.backbone.name": args.backbone, "model.backbone.pretrained": "no", "model.layers": [1, 2],
        "model.image_size": args.image_size, "train.seed": 0})
    model = build_model(cfg, torch.device("cpu")).eval()
    thresholds = {"image": 1.0, "pixel": 1.0, "source": "benchmark"}
    torch_detector = Detector(model, ThresholdPolicy(thresholds), precision="fp32", batch_size=args.batch_size,
                              device=torch.device("cpu"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(args.images)]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        result = export_model(model, path, "onnx")
        sidecar = onnx_sidecar.Sidecar(
            method=model.name, run="benchmark", epoch=0,
            model={"file": "model.onnx", "bytes": result.bytes, "sha256": result.sha256},
            input=onnx_sidecar.input_description(args.image_size, args.image_size, model.backbone.mean,
                                                 model.backbone.std, None),
            thresholds=thresholds, categories=[], prototypes=None, tiling=None, precision="fp32",
            eval_batch_size=args.batch_size, postprocess=dict(onnx_sidecar.POSTPROCESS))
        onnx_sidecar.write_sidecar(path, sidecar)
        onnx_detector = load_onnx_detector(path, threads=args.threads, on_warning=lambda text: None)
        torch_rate, torch_results = images_per_second(torch_detector, images, args.repeats)
        onnx_rate, onnx_results = images_per_second(onnx_detector, images, args.repeats)
    map_diff = max(float(np.abs(a.map - b.map).max()) for a, b in zip(onnx_results, torch_results))
    score_diff = max(abs(a.score - b.score) for a, b in zip(onnx_results, torch_results))
    print(f"agpnet {args.backbone} {args.image_size} px, {args.images} images {width}x{height}, batch "
          f"{args.batch_size}, {args.threads} CPU threads (torch {torch.__version__})")
    print(f"pytorch fp32: {torch_rate:.1f} images/s")
    print(f"onnxruntime:  {onnx_rate:.1f} images/s ({onnx_rate / torch_rate:.2f}x)")
    print(f"max abs diff: map {map_diff:.2e}, score {score_diff:.2e}")


if __name__ == "__main__":
    main()
