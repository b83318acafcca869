"""Method registry: the only place that lists the methods."""

from __future__ import annotations

import importlib

from agp_models.base import AnomalyModel

_METHODS = {
    "agpnet": "agp_models.agpnet:AGPNet",
    "onenip": "agp_models.onenip:OneNIP",
    "rlr": "agp_models.rlr:RLR",
}


def method_names() -> list[str]:
    return list(_METHODS)


def method_class(name: str) -> type[AnomalyModel]:
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of: {', '.join(_METHODS)}")
    module, attr = _METHODS[name].split(":")
    return getattr(importlib.import_module(module), attr)
