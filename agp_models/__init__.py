"""Models: frozen backbones, the three methods, their registry, and metrics."""

from agp_models._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # must run before anything imports timm
