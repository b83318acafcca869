"""Training / inference speed and peak memory of the methods, one function per method.

    .venv/bin/python benchmarks/train_speed.py --method agpnet            # CPU or the first GPU
    .venv/bin/python benchmarks/train_speed.py --method agpnet --precision fp32 --steps 5
    .venv/bin/python benchmarks/train_speed.py --method all      # agpnet, onenip, rlr

Defaults: batch 8, fp32 and bf16 autocast, 2 warm-up + 3 timed steps on GPU (1 + 2 on CPU,
where one ViT-S/16 AGPNet step at 256 px takes seconds).

Backbones are random-init (speed does not depend on the weights). A training step is the
whole optimiser step: ``training_step`` + backward + optimiser + ``after_step``. With the
feature cache on (the default for un-augmented training images), the timed steps hit the
cache filled during warm-up, i.e. the steady state after the first epoch. The backbone share
is the time spent inside the backbone's forward during the timed training steps, measured
with forward hooks (synchronised on GPU), divided by the step time.

Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's peak resident
set size (monotone over the whole run, so later rows include earlier peaks).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import agp_models  # noqa: E402,F401  (before timm)
from agp_models.backbones import build_backbone  # noqa: E402
from agp_models.base import AnomalyModel, BackboneConfig  # noqa: E402


@dataclass
class Row:
    method: str
    precision: str
    phase: str  # train | infer
    images_per_s: float
    peak_memory_mib: float
    backbone_share: float | None  # fraction of a training step spent in the backbone


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class BackboneTimer:
    """Accumulates wall time spent inside ``module.forward`` (hooks; synchronised on GPU)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device = device
        self.total = 0.0
        self._start = 0.0
        self.enabled = False
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)

    def _before(self, *_):
        if self.enabled:
            _sync(self.device)
            self._start = time.perf_counter()

    def _after(self, *_):
        if self.enabled:
            _sync(self.device)
            self.total += time.perf_counter() - self._start


def measure(
    name: str,
    model: AnomalyModel,
    make_batch: Callable[[int], dict],
    device: torch.device,
    precisions: list[str],
    batch_size: int,
    warmup: int,
    steps: int,
) -> list[Row]:
    """Time ``steps`` training steps and ``steps`` predict calls per precision after warm-up."""
    rows: list[Row] = []
    timer = BackboneTimer(model.backbone, device)
    for precision in precisions:
        model.train()
        optimizers = model.configure_optimizers(total_steps=10_000)
        _reset_peak(device)

        def train_step(step: int) -> None:
            batch = make_batch(step)
            with _autocast(device, precision):
                loss = model.training_step(batch, progress=0.5)["loss"]
            for optimizer, _ in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer, scheduler in optimizers:
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            model.after_step(step + 1)

        for step in range(warmup):
            train_step(step)
        _sync(device)
        timer.total, timer.enabled = 0.0, True
        start = time.perf_counter()
        for step in range(warmup, warmup + steps):
            train_step(step)
        _sync(device)
        elapsed = time.perf_counter() - start
        timer.enabled = False
        rows.append(
            Row(name, precision, "train", batch_size * steps / elapsed, _peak_mib(device), timer.total / elapsed)
        )

        model.eval()
        _reset_peak(device)
        images = make_batch(0)["image"]
        with torch.no_grad(), _autocast(device, precision):
            for _ in range(warmup):
                model.predict(images)
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                model.predict(images)
            _sync(device)
        elapsed = time.perf_counter() - start
        rows.append(Row(name, precision, "infer", batch_size * steps / elapsed, _peak_mib(device), None))
    return rows


def bench_agpnet(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """AGPNet at its defaults (ViT-S/16 DINO architecture, 256 px, layers 3/6/9/12, both noises)."""
    from agp_models.agpnet import AGPNet, AGPNetConfig

    cfg = AGPNetConfig(
        backbone=BackboneConfig(name="vit_small_patch16_224.dino", pretrained="no"),
        feature_cache=args.feature_cache,
    )
    return _bench_on_fixed_images("agpnet", AGPNet, cfg, args, device)


def _bench_on_fixed_images(name: str, model_class, cfg, args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Methods whose batch is just images. One fixed batch: from the second step on the clean
    features come from the cache, as in every epoch after the first."""
    model = model_class(cfg, build_backbone(cfg.backbone, cfg.layers, cfg.image_size)).to(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size, generator=generator).to(device)
    index = torch.arange(args.batch)

    def make_batch(step: int) -> dict:
        return {"image": images, "index": index}

    trainable = sum(p.numel() for p in model.trainable_parameters())
    print(f"{name}: {trainable / 1e6:.2f} M trainable parameters, feature_cache={cfg.feature_cache}")
    return measure(name, model, make_batch, device, args.precision, args.batch, args.warmup, args.steps)


def bench_onenip(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """OneNIP at its defaults (EfficientNet-b4 strides 2/4/8/16 at 224 px, 4+4 layers of width
    256, restoration stream and refiner on). A training step reconstructs the clean batch and
    its pseudo-anomalous copy from one prompt each; the pseudo-anomalous features are never
    cached (every epoch pastes new defects), so the backbone runs on them every step."""
    from agp_models.onenip import OneNIP, OneNIPConfig

    cfg = OneNIPConfig(backbone=BackboneConfig(name="efficientnet_b4", pretrained="no"), feature_cache=args.feature_cache)
    backbone = build_backbone(cfg.backbone, cfg.layers, cfg.image_size)
    model = OneNIP(cfg, backbone).to(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    size, b = cfg.image_size, args.batch
    images = torch.randn(b, 3, size, size, generator=generator).to(device)
    prompts = torch.randn(b, 3, size, size, generator=generator).to(device)
    anomaly_images = torch.randn(b, 3, size, size, generator=generator).to(device)
    anomaly_masks = torch.zeros(b, 1, size, size, device=device)
    anomaly_masks[:, :, size // 4 : size // 2, size // 4 : size // 2] = 1.0
    index = torch.arange(b)

    def make_batch(step: int) -> dict:
        return {
            "image": images, "index": index, "prompt_image": prompts, "prompt_index": index + b,
            "anomaly_image": anomaly_images, "anomaly_mask": anomaly_masks, "category": ["bench"] * b,
        }

    model.fit_inference_state([make_batch(0)])  # prompt pool + score normalisation for predict
    trainable = sum(p.numel() for p in model.trainable_parameters())
    print(f"onenip: {trainable / 1e6:.2f} M trainable parameters, feature_cache={cfg.feature_cache}")
    return measure("onenip", model, make_batch, device, args.precision, args.batch, args.warmup, args.steps)


def bench_rlr(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """RLR at its defaults (tf_efficientnet_b6 strides 8/16 at 256 px, one 4-block
    reconstruction network per level with widths 256/512, MLKA + LCA, feature jitter)."""
    from agp_models.rlr import RLR, RLRConfig

    cfg = RLRConfig(backbone=BackboneConfig(name="tf_efficientnet_b6", pretrained="no"), feature_cache=args.feature_cache)
    return _bench_on_fixed_images("rlr", RLR, cfg, args, device)


METHODS: dict[str, Callable[[argparse.Namespace, torch.device], list[Row]]] = {
    "agpnet": bench_agpnet,
    "onenip": bench_onenip,
    "rlr": bench_rlr,
}


def print_table(rows: list[Row], device: torch.device) -> None:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    memory = "peak alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"\ndevice: {where}")
    header = f"{'method':<8} {'prec':<5} {'phase':<6} {'images/s':>10} {memory:>15} {'backbone share':>15}"
    print(header)
    print("-" * len(header))
    for r in rows:
        share = f"{100 * r.backbone_share:.0f} %" if r.backbone_share is not None else "-"
        print(
            f"{r.method:<8} {r.precision:<5} {r.phase:<6} {r.images_per_s:>10.1f} {r.peak_memory_mib:>15.0f} {share:>15}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=[*METHODS, "all"], default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps, >= 1 (fills the cache); GPU 2, CPU 1")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; GPU 3, CPU 2")
    parser.add_argument("--precision", type=lambda s: s.split(","), default=["fp32", "bf16"])
    parser.add_argument("--no-feature-cache", dest="feature_cache", action="store_false")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.warmup = max(1, args.warmup if args.warmup is not None else (2 if on_gpu else 1))
    args.steps = args.steps if args.steps is not None else (3 if on_gpu else 2)
    torch.manual_seed(0)
    rows: list[Row] = []
    for name in METHODS if args.method == "all" else [args.method]:
        rows += METHODS[name](args, device)
    print_table(rows, device)


if __name__ == "__main__":
    main()
