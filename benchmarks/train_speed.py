"""Training speed of each method through the application's own pipeline, as a share of what
the machine can do.

    .venv/bin/python benchmarks/train_speed.py                          # all methods, fp32 + bf16
    .venv/bin/python benchmarks/train_speed.py --method onenip --precision bf16
    .venv/bin/python benchmarks/train_speed.py --device cuda            # on a GPU
    .venv/bin/python benchmarks/train_speed.py --before /tmp/agp-before # that checkout, then this one
    .venv/bin/python benchmarks/train_speed.py --method rlr --precision fp32 --top-ops 15  # what bounds it

Per method and precision, on a generated MVTec-layout dataset at the method's image size,
built, loaded and trained exactly as a training worker does (``agpctl.models.build_model``,
``agp_data.splits``, the method's batch extras, a ``DataLoader``, ``agpctl.training.steps.Trainer``):

- images/s: training images per second over whole epochs after a warm-up epoch (which fills
  the feature cache and starts the loader processes: the steady state of a long run);
- GFLOP/img: floating-point operations of one training step per image, counted with
  ``torch.utils.flop_counter`` (matmuls, convolutions, attention; forward and backward);
- achieved = GFLOP/img × images/s, and **util** = achieved / the machine's dense matmul peak at
  the same precision, measured in the same run (so utilisation is a ratio, not a time);
- where an epoch's time goes, from ``torch.profiler``: data (loading, decoding, synthesis,
  host-to-device copies: time the step loop waits for its batch), backbone (frozen forward
  passes), method (the rest of the forward), backward, optimiser (step, schedulers, EMA
  teachers), other. On CUDA these are host-side times (kernels run asynchronously).

Backbones are the methods' default (paper) networks with random weights: speed does not
depend on the weights. ``--before PATH`` runs this script against the code of another
checkout first (e.g. ``git worktree add /tmp/agp-before <commit>``), then against this one,
and prints the speed-up per row.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve()


def _code_root() -> Path:
    """The checkout whose packages are benchmarked (``--code``), this one by default."""
    if "--code" in sys.argv:
        return Path(sys.argv[sys.argv.index("--code") + 1]).resolve()
    return HERE.parents[1]


sys.path.insert(0, str(_code_root()))

import torch  # noqa: E402

import agp_models  # noqa: E402,F401  (before timm)

PHASES = ("data", "backbone", "method", "backward", "optimizer", "other")


@dataclass
class Row:
    method: str
    precision: str
    images_per_s: float
    gflop_per_image: float
    peak_gflops: float
    shares: dict[str, float]  # phase -> share of an epoch's wall time

    @property
    def achieved_gflops(self) -> float:
        return self.gflop_per_image * self.images_per_s

    @property
    def utilisation(self) -> float:
        return self.achieved_gflops / self.peak_gflops if self.peak_gflops else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device: torch.device, precision: str, n: int = 2048, seconds: float = 1.0) -> float:
    """Dense square matmuls back to back: the machine's attainable FLOP/s at ``precision``."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
        if device.type == "cuda" and runs % 10 == 0:
            _sync(device)
    _sync(device)
    return 2 * n**3 * runs / (time.perf_counter() - start) / 1e9


class Pipeline:
    """One method's model, data and trainer, as a training worker builds them."""

    def __init__(self, method: str, precision: str, root: str, args: argparse.Namespace, device: torch.device):
        from torch.utils.data import DataLoader

        from agp_data.anomaly_synthesis import SynthesisConfig
        from agp_data.splits import build_datasets, split_samples
        from agp_data.training_view import TrainingView
        from agpctl.config import RunConfig
        from agpctl.distributed import WorkerContext
        from agpctl.models import build_model
        from agpctl.training.steps import Trainer

        overrides = {
            "model.backbone.pretrained": "no", "data.dataset": "mvtec", "data.root": root,
            "data.loader_workers": args.loader_workers, "train.batch_size": args.batch, "train.precision": precision,
            "train.epochs": 100,
        }
        if args.image_size:
            overrides["model.image_size"] = args.image_size
        cfg = RunConfig(method=method).with_overrides(overrides)
        self.cfg, self.device = cfg, device
        self.model = build_model(cfg, device)
        splits = split_samples(cfg.data, cfg.train.seed)
        train_set, _, _ = build_datasets(cfg.data, splits, cfg.model.image_size, self.model.backbone.mean,
                                         self.model.backbone.std)
        if self.model.batch_extras:
            synthesis = SynthesisConfig(probability=self.model.pseudo_anomaly_probability)
            train_set = TrainingView(train_set, self.model.batch_extras, synthesis=synthesis, seed=0)
        self.images = len(train_set) - len(train_set) % args.batch
        self.loader = DataLoader(train_set, batch_size=args.batch, shuffle=True, drop_last=True,
                                 num_workers=args.loader_workers, persistent_workers=args.loader_workers > 0,
                                 pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
        self.trainer = Trainer(self.model, self.model, cfg, steps_per_epoch=len(self.loader),
                               ctx=WorkerContext(device=device))

    def epoch(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self.trainer.train_epoch(self.loader)
        _sync(self.device)
        return time.perf_counter() - start

    def gflop_per_image(self) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.trainer.train_epoch([next(iter(self.loader))])
        return counter.get_total_flops() / self.loader.batch_size / 1e9

    def phase_shares(self, top_ops: int = 0) -> dict[str, float]:
        """One epoch under torch.profiler: the share of its wall time spent in each phase;
        ``top_ops`` > 0 also prints that many operators by their own (self) time."""
        from torch.autograd.profiler import record_function
        from torch.profiler import ProfilerActivity, profile

        ranges: list = []
        pre = self.model.backbone.register_forward_pre_hook(lambda *_: ranges.append(record_function("agp:backbone").__enter__()))
        post = self.model.backbone.register_forward_hook(lambda *_: ranges.pop().__exit__(None, None, None))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        try:
            with profile(activities=activities) as prof:
                wall = self.epoch()
        finally:
            pre.remove()
            post.remove()
        averages = prof.key_averages()
        if top_ops > 0:
            sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            print(f"\n{self.cfg.method} {self.cfg.train.precision}: epoch of {wall:.1f} s, top operators")
            print(averages.table(sort_by=sort_by, row_limit=top_ops, max_name_column_width=50))
        totals = {e.key: e.cpu_time_total / 1e6 for e in averages if e.key.startswith("agp:")}
        backbone = totals.get("agp:backbone", 0.0)
        seconds = {
            "data": totals.get("agp:data", 0.0),
            "backbone": backbone,
            "method": max(0.0, totals.get("agp:forward", 0.0) - backbone),
            "backward": totals.get("agp:backward", 0.0),
            "optimizer": totals.get("agp:optimizer", 0.0),
        }
        seconds["other"] = max(0.0, wall - sum(seconds.values()))
        return {k: v / wall for k, v in seconds.items()}


def bench(method: str, precision: str, root: str, peak: float, args: argparse.Namespace,
          device: torch.device) -> Row:
    torch.manual_seed(0)
    pipeline = Pipeline(method, precision, root, args, device)
    pipeline.epoch()  # warm-up: feature cache, loader processes, kernels
    seconds = [pipeline.epoch() for _ in range(args.epochs)]
    images_per_s = pipeline.images / min(seconds)
    gflop = pipeline.gflop_per_image()
    shares = pipeline.phase_shares(args.top_ops) if args.profile else {}
    return Row(method, precision, images_per_s, gflop, peak, shares)


def make_dataset(tmp: str, size: int, images: int) -> str:
    from agp_data.generate import generate_dataset

    return generate_dataset(os.path.join(tmp, f"data-{size}"), categories=1, train=images, test=2, size=size, seed=0)


def method_image_size(method: str, args: argparse.Namespace) -> int:
    from agpctl.config import RunConfig

    return args.image_size or RunConfig(method=method).model.image_size


def print_table(rows: list[Row], device: torch.device, threads: int) -> None:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    print(f"\ntraining speed on {where} (code: {_code_root()})")
    header = (f"{'method':<7} {'prec':<5} {'img/s':>7} {'GFLOP/img':>10} {'GFLOP/s':>8} {'peak':>7} {'util':>6}  "
              + " ".join(f"{p:>9}" for p in PHASES))
    print(header)
    print("-" * len(header))
    for r in rows:
        shares = " ".join(f"{100 * r.shares[p]:>8.0f}%" if p in r.shares else f"{'-':>9}" for p in PHASES)
        print(f"{r.method:<7} {r.precision:<5} {r.images_per_s:>7.2f} {r.gflop_per_image:>10.1f} "
              f"{r.achieved_gflops:>8.1f} {r.peak_gflops:>7.0f} {100 * r.utilisation:>5.0f}%  {shares}")


def compare(before: str, argv: list[str]) -> None:
    """This script on ``before``'s code, then on this checkout's; rows side by side."""
    import json

    results = {}
    for label, code in (("before", before), ("after", str(HERE.parents[1]))):
        out = subprocess.run([sys.executable, str(HERE), *argv, "--code", code, "--json"], capture_output=True,
                             text=True, check=False)
        sys.stdout.write(out.stdout.split("JSON:")[0])
        if out.returncode != 0:
            sys.exit(f"the run on {code} failed:\n{out.stderr[-3000:]}")
        results[label] = {(r["method"], r["precision"]): r for r in json.loads(out.stdout.split("JSON:")[1])}
    print("\nspeed-up (after / before, images/s)")
    for key, after in results["after"].items():
        old = results["before"].get(key)
        if old:
            print(f"  {key[0]:<7} {key[1]:<5} {old['images_per_s']:>7.2f} -> {after['images_per_s']:>7.2f} "
                  f"img/s  x{after['images_per_s'] / old['images_per_s']:.2f}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="agpnet,onenip,rlr", help="comma-separated methods")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=None, help="default: each method's own")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed epoch; CPU 2, GPU 20")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs (the fastest counts)")
    parser.add_argument("--loader-workers", type=int, default=1, help="as data.loader_workers (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--top-ops", type=int, default=0, metavar="N",
                        help="also print the N operators that took the most time in the profiled epoch")
    parser.add_argument("--before", default=None, help="another checkout: benchmark it first, then this one")
    parser.add_argument("--code", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.before:
        rest = [a for i, a in enumerate(argv) if a != "--before" and (i == 0 or argv[i - 1] != "--before")]
        compare(args.before, rest)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = args.steps or (20 if device.type == "cuda" else 2)
    precisions = args.precision.split(",")
    peaks = {p: matmul_peak_gflops(device, p) for p in precisions}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="agp-train-speed-") as tmp:
        for method in args.method.split(","):
            size = method_image_size(method, args)
            # twice the images of a timed epoch: the split holds some normals out for validation
            root = make_dataset(tmp, size, steps * args.batch * 2)
            for precision in precisions:
                rows.append(bench(method, precision, root, peaks[precision], args, device))
                print(f"  {method} {precision}: {rows[-1].images_per_s:.2f} images/s", flush=True)
    print_table(rows, device, torch.get_num_threads())
    if args.json:
        import json

        print("JSON:" + json.dumps([asdict(r) for r in rows]))


if __name__ == "__main__":
    main()
