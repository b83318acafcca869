"""One checkpoint: the format of ``checkpoint_epoch-NNNN/model.pt`` and the RNG state in it.

Where checkpoints live and which is the latest valid one belongs to the run directory
(:mod:`agpctl.runs`). A checkpoint is valid when its ``model.pt`` loads: ``torch.save``
writes a zip whose central directory comes last, so a copy cut short by a crash never
loads and the previous checkpoint stays the latest valid one.
"""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch

from agpctl.errors import UserError

CHECKPOINT_FILE = "model.pt"
CHECKPOINT_DIR_PREFIX = "checkpoint_epoch-"


def checkpoint_dir_name(epoch: int) -> str:
    return f"{CHECKPOINT_DIR_PREFIX}{epoch:04d}"


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
