"""Live progress of a Ray Train job on the driver's terminal.

Rank 0 of the job sends small events through a Ray queue (works for the embedded
instance and for remote clusters alike); the driver renders them with rich: a progress
bar per epoch, one line of losses per epoch, then the metrics table.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from agpctl.cluster.events import send
from agpctl.console import console as default_console
from agpctl.console import print_warning
from agpctl.tables import metrics_table


class ProgressSender:
    """Worker side. Never blocks training: a full or broken channel drops events."""

    def __init__(self, channel, enabled: bool, min_interval: float = 0.5):
        self.channel = channel if enabled else None
        self.min_interval = min_interval
        self._last_step = 0.0

    def _send(self, *event: Any) -> None:
        send(self.channel, event)

    def start(self, **info: Any) -> None:
        self._send("start", info)

    def step(self, epoch: int, batch: int, losses: dict[str, float]) -> None:
        now = time.monotonic()
        if now - self._last_step >= self.min_interval:
            self._last_step = now
            self._send("step", epoch, batch, losses.get("loss"))

    def epoch_end(self, epoch: int, losses: dict[str, float], seconds: float, saved: bool,
                  validation: dict[str, float] | None = None, lr: float | None = None) -> None:
        """``validation``: this epoch's val/* metrics when it validated; ``lr``: the next step's."""
        self._send("epoch_end", epoch, losses, seconds, saved, validation, lr)

    def phase(self, text: str) -> None:
        self._send("phase", text)

    def eval_step(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self._last_step >= self.min_interval:
            self._last_step = now
            self._send("eval_step", done, total)

    def warning(self, text: str) -> None:
        self._send("warning", text)

    def message(self, text: str) -> None:
        self._send("message", text)

    def finished(self, table: dict[str, Any]) -> None:
        self._send("finished", table)


def epoch_line(epoch: int, epochs: int, losses: dict[str, float], seconds: float, saved: bool,
               validation: dict[str, float] | None = None, lr: float | None = None) -> str:
    """``epoch 3/20  loss 0.4123 …  lr 3.2e-04  val I-AUROC 91.3 P-AUROC 84.0  (12.1s) ✓ saved``."""
    parts = [f"epoch {epoch}/{epochs}", " ".join(f"{k} {v:.4f}" for k, v in losses.items())]
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    if validation:
        shown = [f"{label} {100 * value:.1f}" for key, label in (("val/i_auroc", "I-AUROC"), ("val/p_auroc", "P-AUROC"))
                 if (value := validation.get(key)) is not None and not math.isnan(value)]
        if shown:
            parts.append("val " + " ".join(shown))
    return "  ".join(parts) + f"  ({seconds:.1f}s)" + (" ✓ saved" if saved else "")


class ProgressView:
    """Driver side."""

    def __init__(self, console=None, quiet: bool = False, plain_interval: float = 30.0):
        self.console = console or default_console
        self.quiet = quiet
        self._warned: set[str] = set()
        # Without a terminal (a log file, CI, a Ray job's logs) the live bars do not render:
        # print a plain progress line at most every ``plain_interval`` seconds instead.
        self.plain_interval = plain_interval
        self._last_plain = time.monotonic()

    def _plain(self, text: str, final: bool = False) -> None:
        if self.quiet or self.console.is_terminal:
            return
        now = time.monotonic()
        if final or now - self._last_plain >= self.plain_interval:
            self._last_plain = now
            self.console.print(text)

    def warning(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            print_warning(text)

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    def run_started(self, cfg, run_uri: str, in_process: bool = False) -> None:
        if self.quiet:
            return
        if in_process:
            where = "this process (Ray Train local mode)"
        else:
            where = f"{cfg.cluster.workers} worker(s) on {cfg.cluster.address or 'embedded local Ray'}"
        self.console.print(
            f"[bold]agpctl train[/] {cfg.method} on {cfg.data.dataset} · {where}\n"
            f"run: [cyan]{run_uri}[/]"
        )

    @contextlib.contextmanager
    def task(self, description: str):
        """A transient progress bar for work on the driver; yields its ``on_progress(done, total)``."""
        progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=self.console, transient=True, disable=self.quiet)
        with progress:
            task = progress.add_task(description, total=None)
            yield lambda done, total: progress.update(task, completed=done, total=total)

    def follow(self, channel, running: Callable[[], bool], waiting: Callable[[], str] | None = None,
               patience_s: float = 60.0, redirect: bool = True) -> None:
        """Renders events until ``running()`` turns false (the training has ended) and the
        channel is drained.

        When no worker has started after ``patience_s`` seconds (Ray waiting for resources it
        may never get), ``waiting()`` says what Ray waits for, as a warning, every ``patience_s``.
        ``redirect=False`` leaves sys.stdout/stderr alone: when training runs in this process,
        its DataLoader workers are forked from it and must not inherit rich's locked proxies."""
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True,
            disable=self.quiet, redirect_stdout=redirect, redirect_stderr=redirect,
        )
        state: dict[str, Any] = {"task": None, "steps": 1, "epochs": 1}
        started = False
        next_note = time.monotonic() + patience_s
        with progress:
            while True:
                alive = running()
                try:
                    event = channel.get(block=alive, timeout=0.5 if alive else None)
                except Exception:  # ray.util.queue.Empty: nothing new
                    if alive:
                        if not started and waiting is not None and time.monotonic() >= next_note:
                            next_note = time.monotonic() + patience_s
                            print_warning(waiting())
                        continue
                    break
                started = True
                self._render(event, progress, state)

    def _render(self, event: tuple, progress: Progress, state: dict[str, Any]) -> None:
        kind = event[0]
        if kind == "start":
            info = event[1]
            state.update(steps=max(1, info["steps_per_epoch"]), epochs=info["epochs"])
            backbone = info.get("backbone", {})
            weights = "pretrained" if backbone.get("pretrained") else "RANDOM INIT"
            where = f" · {info['device']} {info['precision']}" if "device" in info else ""
            self.message(f"{info['train_images']} training images · backbone {backbone.get('name')} ({weights}) · "
                         f"{info['epochs']} epochs × {info['steps_per_epoch']} steps{where}")
        elif kind == "step":
            _, epoch, batch, loss = event
            task = self._epoch_task(progress, state, epoch)
            info = f"loss {loss:.4f}" if loss is not None else ""
            progress.update(task, completed=batch, info=info)
            self._plain(f"epoch {epoch + 1}/{state['epochs']} · step {batch}/{state['steps']} · {info}")
        elif kind == "epoch_end":
            _, epoch, losses, seconds, saved, *extra = event
            if state.get("task") is not None:
                progress.remove_task(state["task"])
                state["task"] = None
            if not self.quiet:
                progress.console.print(epoch_line(epoch, state["epochs"], losses, seconds, saved, *extra))
        elif kind == "phase":
            self.message(event[1])
        elif kind == "eval_step":
            _, done, total = event
            if state.get("eval") is None:
                state["eval"] = progress.add_task("evaluating", total=total, info="")
            progress.update(state["eval"], completed=done)
            self._plain(f"evaluating · {done}/{total} images", final=done == total)
        elif kind == "warning":
            self.warning(event[1])
        elif kind == "message":
            self.message(event[1])

    def _epoch_task(self, progress: Progress, state: dict[str, Any], epoch: int):
        if state.get("task_epoch") != epoch or state.get("task") is None:
            if state.get("task") is not None:
                progress.remove_task(state["task"])
            state["task"] = progress.add_task(f"epoch {epoch + 1}/{state['epochs']}", total=state["steps"], info="")
            state["task_epoch"] = epoch
        return state["task"]

    def run_finished(self, table: dict[str, Any], run_uri: str) -> None:
        if self.quiet:
            return
        self.console.print(metrics_table(table, title="test split"))
        self.console.print(f"results: [cyan]{run_uri}[/] (metrics.json, config.yaml, checkpoints)")
