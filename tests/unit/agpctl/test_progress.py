"""Progress without a terminal (log files, CI, Ray job logs) still says how far training is."""

import io

from rich.console import Console
from rich.progress import Progress

from agpctl.training.progress import ProgressView


def _render_all(view, events):
    progress = Progress(console=view.console, disable=True)
    state = {"task": None, "steps": 1, "epochs": 1}
    for event in events:
        view._render(event, progress, state)
    return view.console.file.getvalue()


def test_plain_lines_when_output_is_not_a_terminal():
    view = ProgressView(Console(file=io.StringIO(), force_terminal=False, width=200), plain_interval=0.0)
    out = _render_all(view, [
        ("start", {"steps_per_epoch": 10, "epochs": 2, "train_images": 80, "backbone": {"name": "r18"}}),
        ("step", 0, 4, 0.5),
        ("eval_step", 8, 8),
    ])
    assert "epoch 1/2 · step 4/10 · loss 0.5000" in out
    assert "evaluating · 8/8 images" in out


def test_plain_lines_are_throttled_and_absent_on_a_terminal():
    quiet_log = ProgressView(Console(file=io.StringIO(), force_terminal=False, width=200), plain_interval=3600.0)
    out = _render_all(quiet_log, [("step", 0, i, 0.1) for i in range(1, 6)])
    assert "step" not in out  # inside the interval: no line yet
    terminal = ProgressView(Console(file=io.StringIO(), force_terminal=True, width=200), plain_interval=0.0)
    out = _render_all(terminal, [("step", 0, 1, 0.1)])
    assert "step 1/" not in out  # the live bar shows it instead


def test_epoch_line_shows_lr_and_validation():
    view = ProgressView(Console(file=io.StringIO(), force_terminal=False, width=200))
    out = _render_all(view, [
        ("start", {"steps_per_epoch": 10, "epochs": 2, "train_images": 80, "backbone": {"name": "r18"}}),
        ("epoch_end", 1, {"loss": 0.25}, 3.0, True, {"val/i_auroc": 0.9134, "val/p_auroc": 0.8, "val/pro": 0.5}, 2e-4),
        ("epoch_end", 2, {"loss": 0.2}, 3.0, False, None, 1e-5),
    ])
    assert "epoch 1/2  loss 0.2500  lr 2.0e-04  val I-AUROC 91.3 P-AUROC 80.0  (3.0s) ✓ saved" in out
    assert "epoch 2/2  loss 0.2000  lr 1.0e-05  (3.0s)" in out and out.count("val ") == 1
