"""Helpers shared by the test modules (``import helpers``; tests/conftest.py puts tests/ on
``sys.path``, so this works from every sub-folder).

- ``agpctl(*args)``: run the CLI in a subprocess (``AGPCTL`` is its argv prefix, for Popen).
- ``TINY_AGPNET``: command-line flags of a tiny, fast CPU AGPNet run.
- ``tiny_run_config(method, root=None, **overrides)``: a tiny, fast CPU ``RunConfig`` for any
  registered method; ``tiny_method_config(method, **overrides)``: its method config alone.
- ``tiny_config(root, epochs, method)``: the in-process pipeline's run config on a dataset.
- ``run_in_process(cfg, run_uri)`` / ``InProcessRun``: a whole training run without Ray.
- ``write_predict_inputs(root)`` / ``PREDICT_INPUTS`` / ``read_csv(uri)``: predict's inputs and tables.

Imports of the code under test happen inside the functions, so that a module using only the
subprocess helpers does not import the application.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from agpctl.config import RunConfig

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

# -- the CLI in a subprocess ----------------------------------------------------------------
AGPCTL = [sys.executable, "-m", "agpctl.cli"]


def agpctl(*args: str, timeout: int = 400, env: dict[str, str] | None = None,
           cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """``python -m agpctl.cli *args`` with captured text output."""
    return subprocess.run([*AGPCTL, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


TINY_AGPNET = [
    "--method", "agpnet", "--backbone", "resnet18", "--pretrained", "no", "--layers", "1,2", "--image-size", "64",
    "--set", "model.decoder_width=64", "--set", "model.decoder_depth=1", "--set", "model.decoder_heads=2",
    "--set", "model.score_pool=4", "--loader-workers", "0", "--batch-size", "4", "--precision", "fp32",
]

# -- tiny configs ---------------------------------------------------------------------------
# Every method: a random (never downloaded) resnet18 at 64 px; seed 3.
# fp32: the default precision (auto) is bf16 on CPUs with AMX/AVX512-BF16 only, and the
# suite must give the same numbers on every machine (test_precision.py covers bf16 and auto).
TINY_COMMON: dict[str, Any] = {
    "model.backbone.name": "resnet18", "model.backbone.pretrained": "no", "model.image_size": 64, "train.seed": 3,
    "train.precision": "fp32",
}
# Per method: small widths and depths (resnet18 stages: 1 = stride 4, 2 = stride 8, 3 = stride 16).
TINY_MODEL: dict[str, dict[str, Any]] = {
    "agpnet": {"model.layers": [1, 2], "model.decoder_width": 64, "model.decoder_depth": 1,
               "model.decoder_heads": 2, "model.score_pool": 4, "model.smoothing_sigma": 1.0},
    "onenip": {"model.layers": [1, 2], "model.feature_stride": 8, "model.width": 32, "model.heads": 2,
               "model.ffn": 64, "model.encoder_depth": 1, "model.decoder_depth": 1,
               "model.neighbourhood_size": 3, "model.refiner_channels": 16},
    "rlr": {"model.layers": [2, 3], "model.widths": [32, 32], "model.heads": 2, "model.num_blocks": 2,
            "model.smoothing_sigma": 2.0},
}
# A method registered later without an entry above: its own defaults on resnet18 stages 1-2.
TINY_MODEL_FALLBACK: dict[str, Any] = {"model.layers": [1, 2]}
# With a dataset root: an MVTec-layout folder (e.g. the ``generated_dataset`` fixture).
TINY_DATA: dict[str, Any] = {
    "data.dataset": "mvtec", "data.loader_workers": 0, "data.val_fraction": 0.25,
    "train.epochs": 2, "train.batch_size": 4, "train.eval_batch_size": 8,
}


def _dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """``train__epochs=1`` (keyword form) and ``**{"train.epochs": 1}`` mean the same."""
    return {key.replace("__", "."): value for key, value in overrides.items()}


def tiny_run_config(method: str, root: str | os.PathLike | None = None, **overrides: Any) -> RunConfig:
    """A tiny, fast CPU ``RunConfig`` of ``method``; with ``root``, training on that
    MVTec-layout dataset (no loader workers, 2 epochs, batch 4, val_fraction 0.25).

    ``overrides`` are dotted config paths, given as ``**{"train.epochs": 1}`` or as
    ``train__epochs=1``; they are applied last, then the recipe (``train.recipe``, default
    fast) fills epochs, batch size, lr and schedule where still unset, as a run does.
    """
    from agpctl.config import RunConfig, resolve_recipe

    values: dict[str, Any] = dict(TINY_COMMON)
    values.update(TINY_MODEL.get(method, TINY_MODEL_FALLBACK))
    if root is not None:
        values.update(TINY_DATA)
        values["data.root"] = os.fspath(root)
    values.update(_dotted(overrides))
    return resolve_recipe(RunConfig(method=method).with_overrides(values))


def tiny_method_config(method: str, **overrides: Any):
    """The method's own config dataclass (``RunConfig.model``) of :func:`tiny_run_config`;
    ``overrides`` are method fields (``width=16``, ``backbone__name="resnet18"``)."""
    return tiny_run_config(method, **{f"model.{key}": value for key, value in _dotted(overrides).items()}).model


def tiny_config(root: str, epochs: int = 2, method: str = "agpnet") -> RunConfig:
    """The in-process pipeline's run: :func:`tiny_run_config` on ``root`` for ``epochs``."""
    return tiny_run_config(method, root, **{"train.epochs": epochs})


# -- predict inputs ---------------------------------------------------------------------------
# (file name, (width, height)) of the readable images written by write_predict_inputs.
PREDICT_INPUTS: dict[str, tuple[int, int]] = {
    "color.png": (80, 60),
    "gray.jpg": (50, 70),
    "rgba.png": (64, 64),
    "deep16.tif": (40, 30),
    "sub/nested.bmp": (33, 47),
}


def write_predict_inputs(root: Path) -> str:
    """A folder of real-world image quirks for ``agpctl predict`` (RGB, grey, RGBA, 16-bit,
    a sub-folder) plus a corrupt PNG and a text file; returns its path."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(root / "color.png")
    Image.fromarray(rng.integers(0, 255, (70, 50), dtype=np.uint8), mode="L").save(root / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), mode="RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (30, 40), dtype=np.uint16)).save(root / "deep16.tif")
    Image.fromarray(rng.integers(0, 255, (47, 33, 3), dtype=np.uint8)).save(root / "sub" / "nested.bmp")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "notes.txt").write_text("not an image")
    return str(root)


def read_csv(uri: str) -> list[dict]:
    """Rows of a CSV file (local or s3://) as dicts."""
    import csv
    import io

    from agp_data import storage

    return list(csv.DictReader(io.StringIO(storage.read_text(uri))))


# -- a training run without Ray -------------------------------------------------------------
class InProcessRun:
    """Plays Ray Train's part: persists the checkpoints a worker reports."""

    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        self.reports: list[dict] = []
        self.payloads: dict[int, dict] = {}

    def report(self, metrics, payload, epoch):
        from agp_data import storage
        from agpctl import checkpoint as ckpt

        self.reports.append(metrics)
        if payload is not None:
            data = ckpt.serialise(payload)  # now: state_dict() tensors keep changing with training
            self.payloads[epoch] = ckpt.deserialise(data, "in-memory")
            storage.write_bytes(storage.join(self.run_uri, ckpt.checkpoint_dir_name(epoch), ckpt.CHECKPOINT_FILE), data)


def run_in_process(cfg: RunConfig, run_uri: str, resume_payload=None) -> InProcessRun:
    """The whole run (train, checkpoints, thresholds, test metrics) in this process."""
    from agp_data import storage
    from agpctl import runs
    from agpctl.distributed import WorkerContext
    from agpctl.training.progress import ProgressSender
    from agpctl.training.worker import RunSpec, train_on_worker

    storage.write_text(storage.join(run_uri, runs.CONFIG_FILE), cfg.to_yaml())
    run = InProcessRun(run_uri)
    train_on_worker(RunSpec(cfg, run_uri), WorkerContext(), lambda m: m, run.report, ProgressSender(None, False),
                    resume_payload)
    return run
