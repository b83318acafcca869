"""Strict JSON text of agp's records: NaN (a metric undefined for a one-class category)
becomes null, numpy numbers and arrays become plain ones. Torch-free, so the ONNX runtime's
``agpctl predict --model`` writes predictions.json exactly as ``--run`` does."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def to_json(data: Any, indent: int | None = 2) -> str:
    """Strict JSON of ``data``; ``indent=None`` gives one line."""
    return json.dumps(_finite(data), indent=indent, sort_keys=False, default=_json_default)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
