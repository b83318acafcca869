"""Training throughput with 1 and 2 Ray Train workers, and the fixed cost of starting a run.

    .venv/bin/python benchmarks/scaling.py                         # quickstart model, 1 and 2 workers
    .venv/bin/python benchmarks/scaling.py --workers 1,2,4 --epochs 4 --train 80

Each configuration is one real ``agpctl train`` run (``launch_training``) on the embedded
local Ray, with the quickstart model (AGPNet, random-init ResNet-18 at 128 px) on the
generated dataset. Times come from the run's own progress events, taken on the driver:

- start-up: from the launch call to rank 0's start event (Ray up, worker group and
  process group formed, datasets and model built) — the fixed cost of any run;
- epoch 1 images/s: the first epoch, which also fills the feature cache;
- steady images/s: the later epochs (training images × epochs / their seconds);
- wall: the whole run including calibration, checkpoints and test evaluation.

With ``--cpus-per-worker`` unset, the embedded Ray shares the machine's CPUs among the
workers (auto), so 1 worker × N threads is compared with N workers × 1 thread — what a user
gets by default.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from agpctl.training import progress as progress_module  # noqa: E402
from agpctl.config import RunConfig  # noqa: E402
from agpctl.training.launch import launch_training  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"


@dataclass
class Timing:
    workers: int
    cpus_per_worker: str
    train_images: int
    startup_s: float
    first_epoch_ips: float
    steady_ips: float
    wall_s: float


class _EventClock:
    """Wraps ProgressView._render to timestamp rank 0's events on the driver."""

    def __init__(self) -> None:
        self.events: list[tuple[float, tuple]] = []
        self._original = progress_module.ProgressView._render

    def __enter__(self) -> "_EventClock":
        clock = self

        def render(view, event, progress, state):
            clock.events.append((time.perf_counter(), event))
            return clock._original(view, event, progress, state)

        progress_module.ProgressView._render = render
        return self

    def __exit__(self, *exc) -> None:
        progress_module.ProgressView._render = self._original


def run_once(workers: int, args: argparse.Namespace, out: str) -> Timing:
    cfg = RunConfig.from_yaml(QUICKSTART.read_text(), source=str(QUICKSTART)).with_overrides({
        "model.backbone.pretrained": "no",
        "data.synthetic.train": args.train,
        "data.synthetic.test": args.test,
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "cluster.workers": workers,
        "cluster.cpus_per_worker": args.cpus_per_worker,
        "storage.out": out,
        "storage.name": f"scaling-{workers}w",
    })
    with _EventClock() as clock, open(os.devnull, "w") as sink:
        started = time.perf_counter()
        launch_training(cfg, console=Console(file=sink), quiet=False)
        wall = time.perf_counter() - started
    first, start_info = next((t, e[1]) for t, e in clock.events if e[0] == "start")
    epochs = [e for _, e in clock.events if e[0] == "epoch_end"]
    images = int(start_info["train_images"])
    seconds = [float(e[3]) for e in epochs]
    steady = images * (len(seconds) - 1) / sum(seconds[1:]) if len(seconds) > 1 else float("nan")
    cpus = "auto" if args.cpus_per_worker is None else f"{args.cpus_per_worker:g}"
    return Timing(workers, cpus, images, first - started, images / seconds[0], steady, wall)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", type=int, default=40, help="generated training images per category (3 categories)")
    parser.add_argument("--test", type=int, default=10, help="generated test images per category")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpus-per-worker", type=float, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rows = []
    with tempfile.TemporaryDirectory(prefix="agp-scaling-") as out:
        for workers in (int(w) for w in args.workers.split(",")):
            rows.append(run_once(workers, args, out))
            r = rows[-1]
            print(f"{workers} worker(s): start-up {r.startup_s:.1f} s, steady {r.steady_ips:.1f} images/s, wall {r.wall_s:.1f} s",
                  flush=True)
    print(f"\nCPUs on this machine: {os.cpu_count()}; batch {args.batch_size} per worker; "
          f"{rows[0].train_images} training images; {args.epochs} epochs")
    header = f"{'workers':>7} {'cpus/worker':>11} {'start-up s':>10} {'epoch-1 img/s':>13} {'steady img/s':>12} {'wall s':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.workers:>7} {r.cpus_per_worker:>11} {r.startup_s:>10.1f} {r.first_epoch_ips:>13.1f} "
              f"{r.steady_ips:>12.1f} {r.wall_s:>7.1f}")


if __name__ == "__main__":
    main()
