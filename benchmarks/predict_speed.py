"""Images/s of ``agpctl predict`` end to end (decode → model → maps at original size →
heatmap/overlay/mask files + CSV/JSON) against model-only inference on the same images, so the
I/O overhead is visible.

Uses a randomly initialised backbone (no download) and an untrained AGPNet head: speed does not
depend on the weights. Prints what was used.

    .venv/bin/python benchmarks/predict_speed.py [--images 64] [--size 512x384] [--image-size 128]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from agpctl.config import RunConfig
from agpctl.models import build_model, default_device
from agpctl.inference.detector import Detector
from agpctl.inference.predict import discover_inputs, predict_images
from agpctl.inference.thresholds import ThresholdPolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", default="512x384", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--image-size", type=int, default=128, help="model input side")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    device = default_device()
    cfg = RunConfig(method="agpnet").with_overrides({
        "model.backbone.name": args.backbone, "model.backbone.pretrained": "no", "model.layers": [1, 2],
        "model.image_size": args.image_size, "model.decoder_width": 128, "model.decoder_depth": 2,
        "model.decoder_heads": 4, "model.score_pool": 8, "model.smoothing_sigma": 4.0,
    })
    model = build_model(cfg, device).eval()
    print(f"model: agpnet, backbone {args.backbone} (random init), input {args.image_size}px, device {device}, "
          f"torch threads {torch.get_num_threads()}, batch {args.batch_size}")
    print(f"data: {args.images} JPEG images {width}x{height}")

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        folder = os.path.join(tmp, "in")
        os.makedirs(folder)
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
                os.path.join(folder, f"{i:04d}.jpg"), quality=90)
        inputs = discover_inputs(folder)
        detector = Detector(model, ThresholdPolicy({}, threshold="1.0"), batch_size=args.batch_size, device=device)

        # Model only: pre-decoded, pre-resized tensors already in memory.
        batches = [torch.rand(min(args.batch_size, args.images - i), 3, args.image_size, args.image_size, device=device)
                   for i in range(0, args.images, args.batch_size)]
        def model_pass() -> float:
            with torch.no_grad():
                start = time.perf_counter()
                for batch in batches:
                    model.predict(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            return args.images / (time.perf_counter() - start)

        model_pass()  # warm-up (allocator, kernels)
        model_only = max(model_pass() for _ in range(2))  # best of two: the machine is shared

        results = {}
        for label, write_images in (("end to end, CSV/JSON only (--no-images)", False),
                                    ("end to end, with heatmaps/overlays/masks", True)):
            rates = []
            for repeat in range(2):
                out = os.path.join(tmp, f"out-{write_images}-{repeat}")
                start = time.perf_counter()
                predict_images(detector, inputs, out, write_images=write_images)
                rates.append(args.images / (time.perf_counter() - start))
            results[label] = max(rates)

    print(f"{'model only (tensors in memory)':45s} {model_only:8.1f} images/s")
    for label, rate in results.items():
        print(f"{label:45s} {rate:8.1f} images/s  (I/O overhead {100 * (1 - rate / model_only):.0f}% of time)")


if __name__ == "__main__":
    main()
