"""Where the seconds before a run's first training step go, and what a tune trial costs.

    .venv/bin/python benchmarks/startup.py                               # this checkout
    git worktree add /tmp/agp-before <old commit>
    .venv/bin/python benchmarks/startup.py --tree before=/tmp/agp-before --tree after=.
    .venv/bin/python benchmarks/startup.py --tree off=. --tree on=.,--dashboard --trials 0

Each tree (a checkout of agp; all use this machine's venv) runs, as real subprocesses,

- a tiny local ``agpctl train`` (generated data, the tests' ``TINY_AGPNET`` flags, 1 epoch),
  timed from the moment the process is started to the end of its first optimiser step, and
  broken down by stage;
- a tiny ``agpctl tune`` of ``--trials`` one-worker, one-epoch trials (fifo, one at a time):
  per-trial overhead = (the wall time of ``Tuner.fit`` − the summed time the trials spent
  inside ``train_on_worker``, the Ray-free work of a run) / trials.

The trees run alternately (``--repeat`` rounds), and each figure is the median over rounds,
so that a busy machine treats all trees alike. One table is printed at the end.

How it sees inside the processes without changing the code under test: every process
started by the run (the CLI, Ray's controller, trial and worker processes, which inherit the
environment) finds a generated ``sitecustomize`` on ``PYTHONPATH``. It loads this file's
:func:`install_probe`, which wraps a few functions of agp and of Ray Train as their modules
are imported, and appends ``{pid, event, t}`` lines (wall-clock time) to one file. Hooks on
names a tree lacks are skipped, so the same probe measures old and new checkouts.
"""

from __future__ import annotations

import argparse
import functools
import importlib.abc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE_ENV = "AGP_STARTUP_PROBE"  # the events file; the probe does nothing without it

# module -> functions to time: "name" or "Class.method" (a begin and an end event each)
TIMED: dict[str, tuple[str, ...]] = {
    "agpctl.training.launch": ("launch_training", "fit_one"),
    "agpctl.training.preflight": ("check_data_and_model",),
    "agpctl.training.worker": ("worker_loop", "in_process_loop", "train_on_worker"),
    "agpctl.training.steps": ("Trainer.train_epoch",),
    "agpctl.models": ("build_model",),
    "agp_data.splits": ("build_datasets",),
    "agpctl.cluster.events": ("make_channel",),
    "ray": ("init",),
    "ray.train.v2.api.data_parallel_trainer": ("DataParallelTrainer.fit",),
    "ray.train.v2._internal.execution.controller.controller": ("TrainController.__init__",),
    "ray.train.v2._internal.execution.worker_group.worker_group": (
        "WorkerGroup._start_impl", "WorkerGroup._create_placement_group", "WorkerGroup._create_workers",
        "WorkerGroup._init_train_context"),
    "ray.train.v2._internal.execution.worker_group.placement_group_handle": ("DefaultPlacementGroupHandle.wait",),
    "ray.tune.tuner": ("Tuner.fit",),
}
# modules whose import itself is timed (per process)
IMPORTS = ("torch", "ray", "agpctl.training.worker", "tuning.sweep")

# The train run's timeline: (stage, the event that ends it). A stage whose event a tree does
# not emit is shown as "-" and its time goes to the next stage.
TRAIN_STAGES = (
    ("python + imports (CLI)", "launch_training:begin"),
    ("checks before Ray", "init:begin"),
    ("ray.init", "init:end"),
    ("trainer + controller start", "WorkerGroup._start_impl:begin"),
    ("placement group", "DefaultPlacementGroupHandle.wait:end"),
    ("worker processes start", "WorkerGroup._create_workers:end"),
    ("train context (process group)", "WorkerGroup._init_train_context:end"),
    ("worker imports + loop start", "train_on_worker:begin"),
    ("dataset + model build", "Trainer.train_epoch:begin"),
    ("first step", "first_step"),
)


# ---------------------------------------------------------------------------------------
# the probe (runs inside every process of the measured command)
# ---------------------------------------------------------------------------------------
class _Recorder:
    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()

    def __call__(self, event: str, **extra) -> None:
        line = json.dumps({"pid": os.getpid(), "event": event, "t": time.time(), **extra}) + "\n"
        with self.lock:
            # O_APPEND: lines of concurrent processes never interleave (each write is small)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)


def _timed(function, name: str, record: _Recorder):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        record(f"{name}:begin")
        try:
            return function(*args, **kwargs)
        finally:
            record(f"{name}:end")

    return wrapper


def _patch(module, names: tuple[str, ...], record: _Recorder) -> None:
    for dotted in names:
        owner, attr = module, dotted
        if "." in dotted:
            owner_name, attr = dotted.split(".", 1)
            owner = getattr(module, owner_name, None)
        function = getattr(owner, attr, None) if owner is not None else None
        if callable(function):
            setattr(owner, attr, _timed(function, dotted, record))


class _ImportHook(importlib.abc.MetaPathFinder):
    """Times the import of :data:`IMPORTS` and patches :data:`TIMED` right after a module
    runs, before whoever imported it can copy a name out of it."""

    def __init__(self, record: _Recorder) -> None:
        self.record = record

    def find_spec(self, name, path, target=None):
        if name not in TIMED and name not in IMPORTS:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute, record = spec.loader.exec_module, self.record

        def exec_module(module):
            timed = name in IMPORTS
            if timed:
                record(f"import {name}:begin")
            execute(module)
            if timed:
                record(f"import {name}:end")
            _patch(module, TIMED.get(name, ()), record)
            if name == "torch":
                _hook_first_step(record)

        spec.loader.exec_module = exec_module
        return spec


def _hook_first_step(record: _Recorder) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = None

    def first_step(optimizer, args, kwargs):
        record("first_step")
        handle.remove()

    handle = register_optimizer_step_post_hook(first_step)


def install_probe() -> None:
    """Called by the generated sitecustomize in every process of a measured command."""
    path = os.environ.get(PROBE_ENV)
    if not path:
        return
    record = _Recorder(path)
    record("process_start", argv=" ".join(sys.argv[:2])[-120:])
    sys.meta_path.insert(0, _ImportHook(record))


SITECUSTOMIZE = """\
import importlib.util as _util
_spec = _util.spec_from_file_location("_agp_startup_probe", {path!r})
_probe = _util.module_from_spec(_spec)
_spec.loader.exec_module(_probe)
_probe.install_probe()
"""


# ---------------------------------------------------------------------------------------
# running the commands
# ---------------------------------------------------------------------------------------
def tiny_flags() -> list[str]:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import TINY_AGPNET  # the tests' tiny AGPNet: what every Ray test pays start-up for

    return list(TINY_AGPNET)


def run_probed(tree: Path, args: list[str], probe_dir: Path, events: Path, timeout: int) -> tuple[float, float]:
    """``agpctl ARGS`` from ``tree``; returns (wall-clock start, wall seconds)."""
    env = dict(os.environ)
    env[PROBE_ENV] = str(events)
    env["PYTHONPATH"] = os.pathsep.join([str(probe_dir), str(tree)])
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "agpctl.cli", *args], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=timeout)
    wall = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(f"agpctl {args[0]} failed in {tree} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return started, wall


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_time(events: list[dict], name: str) -> float | None:
    times = [e["t"] for e in events if e["event"] == name]
    return min(times) if times else None


def train_timeline(events: list[dict], started: float) -> dict[str, float | None]:
    """Seconds per :data:`TRAIN_STAGES` stage, and the total to the first step."""
    stages: dict[str, float | None] = {}
    previous = started
    for label, event in TRAIN_STAGES:
        at = first_time(events, event)
        if at is None or at < previous:
            stages[label] = None
            continue
        stages[label] = at - previous
        previous = at
    end = first_time(events, "first_step")
    stages["total: start to first step"] = end - started if end is not None else None
    # not a stage of the timeline: where the workers' imports went
    # (the training process: a worker actor, or the CLI itself in Ray Train's local mode)
    worker_pids = {e["pid"] for e in events if e["event"] == "train_on_worker:begin"}
    stages["  of which torch import (worker)"] = _span(events, "import torch", worker_pids)
    stages["  of which agpctl worker import"] = _span(events, "import agpctl.training.worker", worker_pids)
    return stages


def _span(events: list[dict], name: str, pids: set[int]) -> float | None:
    begin = [e["t"] for e in events if e["event"] == f"{name}:begin" and e["pid"] in pids]
    end = [e["t"] for e in events if e["event"] == f"{name}:end" and e["pid"] in pids]
    return (min(end) - min(begin)) if begin and end else None


def tune_figures(events: list[dict], trials: int, wall: float) -> dict[str, float | None]:
    """Per-trial overhead = (Tuner.fit wall − Σ time inside train_on_worker) / trials."""
    fit_begin, fit_end = first_time(events, "Tuner.fit:begin"), first_time(events, "Tuner.fit:end")
    begins = sorted(e["t"] for e in events if e["event"] == "train_on_worker:begin")
    ends = sorted(e["t"] for e in events if e["event"] == "train_on_worker:end")
    if fit_begin is None or fit_end is None or len(begins) != trials or len(ends) != trials:
        return {"tune: per-trial overhead": None}
    work = sum(end - begin for begin, end in zip(begins, ends))
    fit = fit_end - fit_begin
    return {
        "tune: Tuner.fit wall": fit,
        "tune: work per trial (train_on_worker)": work / trials,
        "tune: per-trial overhead": (fit - work) / trials,
        "tune: whole command": wall,
    }


def measure_tree(tree: Path, data: str, out: Path, probe_dir: Path, trials: int, extra: list[str],
                 round_no: int) -> dict[str, float | None]:
    flags = [*tiny_flags(), *extra]
    figures: dict[str, float | None] = {}
    events = out / f"train-{round_no}.jsonl"
    started, wall = run_probed(tree, ["train", "--dataset", "mvtec", "--root", data, "--epochs", "1", "--out",
                                      str(out), "--name", f"train-{round_no}", "--json", *flags],
                               probe_dir, events, timeout=900)
    figures.update(train_timeline(read_events(events), started))
    figures["train: whole command"] = wall
    if trials:
        space = out / "space.yaml"
        space.write_text("model.alpha_max: {type: uniform, low: 0.5, high: 2.0}\n")
        events = out / f"tune-{round_no}.jsonl"
        _, wall = run_probed(tree, ["tune", "--dataset", "mvtec", "--root", data, "--epochs", "1", "--samples",
                                    str(trials), "--scheduler", "fifo", "--max-concurrent", "1", "--space", str(space),
                                    "--val-fraction", "0.25", "--out", str(out), "--name", f"tune-{round_no}",
                                    "--json", *flags], probe_dir, events, timeout=1800)
        figures.update(tune_figures(read_events(events), trials, wall))
    return figures


def print_table(results: dict[str, list[dict[str, float | None]]], trials: int) -> None:
    labels = list(results)
    rows: list[str] = []
    for figures in (f for per_round in results.values() for f in per_round):
        rows += [r for r in figures if r not in rows]
    width = max(len(r) for r in rows) + 2
    header = f"{'seconds (median)':<{width}}" + "".join(f"{label:>12}" for label in labels)
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for label in labels:
            values = [f[row] for f in results[label] if f.get(row) is not None]
            cells.append(f"{statistics.median(values):>12.2f}" if values else f"{'-':>12}")
        print(f"{row:<{width}}" + "".join(cells))
    rounds = len(next(iter(results.values())))
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; {rounds} round(s); "
          f"tune: {trials} one-worker trial(s) of 1 epoch, fifo, one at a time")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", metavar="LABEL=DIR[,ARG...]",
                        help="a checkout to measure, with extra arguments for its commands (repeatable; "
                             "default: now=<this checkout>)")
    parser.add_argument("--trials", type=int, default=3, help="tune trials (0: skip the tune measurement)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all trees; the table shows medians")
    parser.add_argument("--flag", action="append", default=[], metavar="ARG",
                        help="an extra argument for both commands, e.g. --flag=--dashboard (repeatable)")
    parser.add_argument("--json", action="store_true", help="also print every round's figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (runs, event files); print its path")
    args = parser.parse_args(argv)
    trees: dict[str, tuple[Path, list[str]]] = {}
    for item in args.tree or [f"now={REPO}"]:
        label, _, value = item.partition("=")
        directory, *extra = value.split(",")
        if not directory or not (Path(directory) / "agpctl").is_dir():
            parser.error(f"--tree {item}: expected LABEL=DIR[,ARG...], DIR a checkout of agp")
        trees[label] = (Path(directory).resolve(), extra)

    work = Path(tempfile.mkdtemp(prefix="agp-startup-"))
    try:
        probe_dir = work / "probe"
        probe_dir.mkdir()
        (probe_dir / "sitecustomize.py").write_text(SITECUSTOMIZE.format(path=str(Path(__file__).resolve())))
        sys.path.insert(0, str(REPO))
        from agp_data.generate import generate_dataset

        data = generate_dataset(str(work / "data"), categories=2, train=8, test=6, size=64, seed=0)
        results: dict[str, list[dict[str, float | None]]] = {label: [] for label in trees}
        for round_no in range(args.repeat):
            for label, (tree, extra) in trees.items():
                out = work / label
                out.mkdir(exist_ok=True)
                figures = measure_tree(tree, data, out, probe_dir, args.trials, [*args.flag, *extra], round_no)
                results[label].append(figures)
                total = figures.get("total: start to first step")
                overhead = figures.get("tune: per-trial overhead")
                print(f"round {round_no + 1} {label}: first step after {total or float('nan'):.1f} s"
                      + (f", tune overhead {overhead:.1f} s/trial" if overhead is not None else ""), flush=True)
        print()
        print_table(results, args.trials)
        if args.json:
            print(json.dumps(results, indent=1))
    finally:
        if args.keep:
            print(f"events and runs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
