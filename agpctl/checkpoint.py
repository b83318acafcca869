"""Run directories and checkpoints, on local disk or S3.

A run directory holds ``config.yaml``, ``checkpoint_epoch-NNNN/model.pt`` (Ray Train
persists these), ``summary.json``, ``thresholds.json`` and ``metrics.json``.

A checkpoint is valid when its ``model.pt`` loads: ``torch.save`` writes a zip whose
central directory comes last, so a copy cut short by a crash never loads and the previous
checkpoint stays the latest valid one.
"""

from __future__ import annotations

import io
import json
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agp_data import storage
from agpctl.config import RunConfig
from agpctl.errors import UserError

CHECKPOINT_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.json"
THRESHOLDS_FILE = "thresholds.json"
_CHECKPOINT_DIR = re.compile(r"checkpoint_epoch-(\d+)$")


def checkpoint_dir_name(epoch: int) -> str:
    return f"checkpoint_epoch-{epoch:04d}"


@dataclass
class LoadedCheckpoint:
    uri: str  # the checkpoint directory
    epoch: int
    payload: dict[str, Any]


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    key = state["numpy_key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, state["numpy_pos"], 0, 0.0))
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


def serialise(payload: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def deserialise(data: bytes, source: str) -> dict[str, Any]:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise UserError(f"checkpoint {source} is unreadable ({exc.__class__.__name__}); use an earlier one") from None


def list_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(epoch, directory) pairs, oldest first."""
    if not storage.exists(run_uri) and not storage.is_dir(run_uri):
        raise UserError(f"run {run_uri} does not exist; pass the directory `agpctl train` printed")
    found: dict[int, str] = {}
    for path in storage.list_files(run_uri, recursive=True):
        if not path.endswith("/" + CHECKPOINT_FILE) and not path.endswith("\\" + CHECKPOINT_FILE):
            continue
        parent = path[: -len(CHECKPOINT_FILE) - 1]
        match = _CHECKPOINT_DIR.search(parent)
        if match and _same_run(run_uri, parent):
            found[int(match.group(1))] = parent
    return sorted(found.items())


def _same_run(run_uri: str, checkpoint_dir: str) -> bool:
    rest = checkpoint_dir[len(run_uri.rstrip("/")) :].strip("/\\")
    return "/" not in rest and "\\" not in rest


def load_latest_checkpoint(run_uri: str) -> LoadedCheckpoint:
    """The newest checkpoint whose file loads; half-written ones are skipped."""
    checkpoints = list_checkpoints(run_uri)
    if not checkpoints:
        raise UserError(f"run {run_uri} has no checkpoint yet; train it (or resume it) first")
    for epoch, directory in reversed(checkpoints):
        try:
            payload = deserialise(storage.read_bytes(storage.join(directory, CHECKPOINT_FILE)), directory)
        except UserError:
            continue
        return LoadedCheckpoint(directory, epoch, payload)
    raise UserError(f"run {run_uri}: every checkpoint is unreadable; retrain")


def load_run_config(run_uri: str) -> RunConfig:
    path = storage.join(run_uri, CONFIG_FILE)
    if not storage.exists(path):
        raise UserError(f"{path} not found: {run_uri} is not an agp run directory")
    return RunConfig.from_yaml(storage.read_text(path), source=path)


def write_json(uri: str, data: Any) -> None:
    storage.write_text(uri, to_json(data) + "\n")


def to_json(data: Any) -> str:
    """Strict JSON: NaN (a metric undefined for a one-class category) becomes null."""
    return json.dumps(_finite(data), indent=2, sort_keys=False, default=_json_default)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_json(uri: str) -> Any:
    return json.loads(storage.read_text(uri))


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
