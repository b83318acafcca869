"""Make ``import timm`` work when torchvision's compiled extension cannot load.

The PyPI torchvision wheel is built against CUDA. Next to a CPU-only torch its ``_C``
extension fails to load, and torchvision then still registers fake (meta) kernels for
``torchvision::nms`` / ``torchvision::qnms`` at import time, which raises
``RuntimeError: operator torchvision::nms does not exist`` — and timm imports torchvision.

We only need torchvision's Python transforms, never its detection ops, so when (and only
when) the extension fails to load we declare the two operator *schemas* with no kernels.
Import time then succeeds; actually calling those ops would still raise clearly. With a
matching torch/torchvision pair (e.g. CUDA torch on a GPU machine) this module does nothing.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os

import torch

_MISSING_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the schema registrations alive for the life of the process
extension_loaded: bool | None = None


def _extension_path() -> str | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    package_dir = list(spec.submodule_search_locations)[0]
    finder = importlib.machinery.FileFinder(
        package_dir, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    )
    ext = finder.find_spec("_C")
    return ext.origin if ext else None


def ensure_torchvision_importable() -> bool:
    """Returns True when torchvision's own extension loaded, False when schemas were declared."""
    global _library, extension_loaded
    if extension_loaded is not None:
        return extension_loaded
    path = _extension_path()
    if path is None:  # torchvision not installed: timm falls back on its own, nothing to do
        extension_loaded = False
        return False
    try:
        torch.ops.load_library(path)
        extension_loaded = True
    except (OSError, ImportError, RuntimeError):
        extension_loaded = False
        _library = torch.library.Library("torchvision", "FRAGMENT")
        for name, schema in _MISSING_SCHEMAS.items():
            if not torch._C._dispatch_has_kernel(f"torchvision::{name}") and not _op_exists(name):
                _library.define(schema)
        os.environ.setdefault("AGP_TORCHVISION_OPS", "schemas-only")
    return extension_loaded


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False
