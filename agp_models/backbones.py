"""Frozen timm backbones: multi-layer feature maps and, for ViTs, CLS self-attention maps.

Contract: docs/BACKBONE_API.md. Every backbone is frozen (``eval()``, ``requires_grad=False``)
and returns feature maps as ``(B, C, h, w)``. Vision transformers are run block by block here
(instead of through timm's ``forward_features``) so that

- only the blocks up to the deepest requested one are evaluated, and
- the self-attention probabilities of the requested blocks can be recomputed exactly from the
  block's own ``attn.qkv`` on its normed input, while every block keeps timm's fused
  (scaled-dot-product) attention for its real forward pass. Only the CLS query row is needed,
  so the extra cost is one ``(B, heads, 1, N)`` product per requested block.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

import agp_models  # noqa: F401  (compat step: must run before timm is imported)
import timm
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import VisionTransformer

from agp_models.base import BackboneConfig

__all__ = [
    "Backbone",
    "BackboneError",
    "BackboneOutput",
    "BackboneWeightsWarning",
    "build_backbone",
    "hub_reachable",
    "resolve_normalisation",
]

HUB_TIMEOUT_S = 3.0
MIN_MATCHED_KEY_FRACTION = 0.9


class BackboneError(Exception):
    """User-facing: weights unreachable with pretrained='yes', bad weights file, unknown model."""


class BackboneWeightsWarning(UserWarning):
    """Pretrained weights were asked for ('auto') but could not be had: random init is used."""


@dataclass
class BackboneOutput:
    features: list[Tensor]  # one per requested layer, each (B, C_l, h_l, w_l)
    attentions: list[Tensor] | None  # ViT + with_attention: (B, heads, h*w) CLS->patch rows


class Backbone(nn.Module):
    """Base of the frozen backbones. ``model`` is the wrapped timm network."""

    name: str
    is_vit: bool
    channels: list[int]
    strides: list[int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pretrained: bool
    weight_source: str

    def __init__(
        self,
        model: nn.Module,
        name: str,
        layers: list[int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        pretrained: bool,
        weight_source: str,
    ):
        super().__init__()
        self.model = model
        self.name = name
        self.layers = list(layers)
        self.mean = tuple(float(v) for v in mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in std)  # type: ignore[assignment]
        self.pretrained = pretrained
        self.weight_source = weight_source
        self.freeze()

    def freeze(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        # Frozen for good: BatchNorm statistics and dropout never switch to training mode.
        return super().train(False)

    def forward(self, images: Tensor, with_attention: bool = False) -> BackboneOutput:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, layers={self.layers}, channels={self.channels}, "
            f"strides={self.strides}, weights={self.weight_source!r}"
        )


class ViTBackbone(Backbone):
    """timm ``VisionTransformer`` family (incl. DINO, DeiT, registers). Layers are 1-indexed blocks."""

    is_vit = True

    def __init__(self, model: VisionTransformer, name: str, layers: list[int], **kw: Any):
        depth = len(model.blocks)
        bad = [l for l in layers if not 1 <= l <= depth]
        if bad:
            raise BackboneError(
                f"backbone {name}: layers {bad} out of range; ViT layers are 1-indexed blocks 1..{depth}"
            )
        super().__init__(model, name, layers, **kw)
        # Unused trailing blocks are never run, so drop them (saves memory as well as time).
        model.blocks = model.blocks[: max(layers)]
        patch = model.patch_embed.patch_size
        self.patch_size = (int(patch[0]), int(patch[1]))
        self.channels = [int(model.embed_dim)] * len(layers)
        self.strides = [self.patch_size[0]] * len(layers)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.has_class_token = model.cls_token is not None
        self.num_heads = [
            int(blk.attn.num_heads) if hasattr(blk.attn, "num_heads") else 0 for blk in model.blocks
        ]

    def _grid(self, images: Tensor) -> tuple[int, int]:
        pe = self.model.patch_embed
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if hasattr(pe, "dynamic_feat_size"):
            h, w = pe.dynamic_feat_size(size)
            return int(h), int(w)
        return size[0] // self.patch_size[0], size[1] // self.patch_size[1]

    def _cls_attention(self, block: nn.Module, x: Tensor) -> Tensor:
        """Softmax(q_cls kᵀ/√d) of ``block`` for token sequence ``x`` (its input), patch columns only."""
        attn = block.attn
        if not isinstance(attn, TimmAttention):
            raise BackboneError(
                f"backbone {self.name}: attention maps need timm's standard Attention, "
                f"got {type(attn).__name__}; use a plain ViT or attention_source='decoder'"
            )
        normed = block.norm1(x)
        B, N, _ = normed.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        qkv = attn.qkv(normed).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        if self.has_class_token:
            query = q[:, :, :1]  # (B, heads, 1, d): the CLS query
        else:
            # No CLS token: average attention row of the patch queries stands in for it.
            query = q[:, :, self.num_prefix_tokens :]
        logits = (query.float() * attn.scale) @ k.float().transpose(-2, -1)
        probs = logits.softmax(dim=-1).mean(dim=2)  # (B, heads, N)
        # Columns of CLS/registers are dropped, rows are not renormalised (contract).
        return probs[:, :, self.num_prefix_tokens :]

    def forward(self, images: Tensor, with_attention: bool = False) -> BackboneOutput:
        m = self.model
        h, w = self._grid(images)
        x = m.patch_embed(images)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        x = m.norm_pre(x)
        wanted = {layer: i for i, layer in enumerate(self.layers)}
        features: list[Tensor | None] = [None] * len(self.layers)
        attentions: list[Tensor | None] = [None] * len(self.layers)
        for index, block in enumerate(m.blocks):
            layer = index + 1
            if with_attention and layer in wanted:
                attentions[wanted[layer]] = self._cls_attention(block, x)
            x = block(x)
            if layer in wanted:
                tokens = x[:, self.num_prefix_tokens :]
                features[wanted[layer]] = tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return BackboneOutput(
            features=[f for f in features if f is not None],
            attentions=[a for a in attentions if a is not None] if with_attention else None,
        )


class CNNBackbone(Backbone):
    """Any timm model that supports ``features_only`` (CNNs, also hierarchical transformers)."""

    is_vit = False

    def __init__(self, model: nn.Module, name: str, layers: list[int], **kw: Any):
        super().__init__(model, name, layers, **kw)
        info = model.feature_info
        self.channels = [int(c) for c in info.channels()]
        self.strides = [int(r) for r in info.reduction()]

    def forward(self, images: Tensor, with_attention: bool = False) -> BackboneOutput:
        out = self.model(images)
        features = list(out)
        # Some timm feature extractors (e.g. Swin) return NHWC maps: bring them to NCHW.
        features = [
            f.permute(0, 3, 1, 2) if f.shape[1] != c and f.shape[-1] == c else f
            for f, c in zip(features, self.channels)
        ]
        return BackboneOutput(features=list(features), attentions=None)


# -- weights ---------------------------------------------------------------------------


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """True when the Hugging Face hub answers a TCP connect within ``timeout`` seconds.

    Checked before asking timm for weights so that an offline machine fails in milliseconds
    (DNS failure) or at most ``timeout`` seconds, instead of after HTTP retries.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _pretrained_cfg(name: str):
    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        return None


def _cached_hub_file(name: str) -> str | None:
    """Path of the weights in the local Hugging Face cache, if timm downloaded them before."""
    cfg = _pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for filename in filenames:
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def _unwrap_state_dict(obj: Any, path: str) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "teacher", "module"):
            if key in obj and isinstance(obj[key], dict) and not isinstance(obj[key], Tensor):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise BackboneError(f"weights file {path}: not a state dict of tensors; save model.state_dict()")
    cleaned: dict[str, Tensor] = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod.", "backbone.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    return cleaned


def _load_weights_file(model: nn.Module, path: str, name: str) -> None:
    if not os.path.isfile(path):
        raise BackboneError(f"weights file {path} not found; give an existing local state-dict path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with objects, wrong format
        raise BackboneError(
            f"weights file {path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}); "
            "save a plain state_dict"
        ) from exc
    state = _unwrap_state_dict(obj, path)
    if isinstance(model, VisionTransformer):
        # Resamples the position embedding to this model's grid (file may be at 224 px).
        from timm.models.vision_transformer import checkpoint_filter_fn

        try:
            state = checkpoint_filter_fn(state, model)
        except Exception as exc:
            raise BackboneError(f"weights file {path}: does not fit {name} ({exc})") from exc
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    fraction = len(matched) / max(len(own), 1)
    if fraction < MIN_MATCHED_KEY_FRACTION:
        raise BackboneError(
            f"weights file {path}: only {len(matched)}/{len(own)} parameters of {name} found with the right "
            "shape; is it for this model (and its kwargs, e.g. pad_type)?"
        )
    model.load_state_dict(matched, strict=False)


# -- building --------------------------------------------------------------------------


def _is_vit_name(name: str, kwargs: dict[str, Any]) -> bool:
    """Builds the bare network on the meta device (no memory, no init cost) to see its class."""
    try:
        probe = _create(name, False, kwargs, vit=False, probe=True)
    except BackboneError:
        raise
    except Exception:  # a model that cannot be built on meta: it is surely no plain ViT
        return False
    return isinstance(probe, VisionTransformer)


def _create(name: str, pretrained: bool, kwargs: dict[str, Any], vit: bool, probe: bool = False, **extra: Any):
    try:
        if probe:
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False, **kwargs)
        return timm.create_model(name, pretrained=pretrained, **kwargs, **extra)
    except RuntimeError as exc:
        if "Unknown model" in str(exc) or "Invalid pretrained tag" in str(exc):
            arch = name.split(".")[0]
            raise BackboneError(
                f"unknown timm model '{name}'; list names with timm.list_models('*{arch.split('_')[0]}*', "
                "pretrained=True)"
            ) from exc
        raise


def available_layers(cfg: BackboneConfig) -> tuple[str, list[int]]:
    """("blocks", 1..depth) for a ViT or ("stages", 0..n-1) for a CNN's feature levels, from
    the network built on the meta device (cheap: no weights, no memory)."""
    kwargs = dict(cfg.kwargs)
    if _is_vit_name(cfg.name, kwargs):
        probe = _create(cfg.name, False, kwargs, vit=True, probe=True)
        return "blocks", list(range(1, len(probe.blocks) + 1))
    with torch.device("meta"):
        try:
            probe = timm.create_model(cfg.name, pretrained=False, features_only=True, **kwargs)
        except RuntimeError as exc:
            raise BackboneError(f"backbone {cfg.name}: cannot build ({exc})") from exc
    return "stages", list(range(len(probe.feature_info)))


def check_layer_sets(cfg: BackboneConfig, layer_sets: list[list[int]]) -> None:
    """Raises BackboneError naming the first layer set the backbone does not have."""
    kind, valid = available_layers(cfg)
    for layers in layer_sets:
        missing = [layer for layer in layers if layer not in valid]
        if missing or not layers:
            raise BackboneError(f"backbone {cfg.name} has {kind} {valid[0]}..{valid[-1]}; layers {list(layers)} "
                                f"do not fit it")


def build_backbone(cfg: BackboneConfig, layers: list[int], image_size: int) -> Backbone:
    """Build the frozen backbone ``cfg.name`` returning feature maps of ``layers``.

    layers: ViT -> 1-indexed transformer blocks (e.g. [3,6,9,12]); anything else -> timm
    ``features_only`` out_indices (effnet/mobilenet: 0..4 = strides 2,4,8,16,32).
    """
    if not layers:
        raise BackboneError(f"backbone {cfg.name}: no layers requested; set layers, e.g. [3,6,9,12] for a ViT")
    if cfg.pretrained not in {"auto", "yes", "no"}:
        raise BackboneError(f"backbone.pretrained must be auto|yes|no, got {cfg.pretrained!r}")
    kwargs = dict(cfg.kwargs)
    is_vit = _is_vit_name(cfg.name, kwargs)
    if is_vit:
        kwargs.setdefault("img_size", image_size)
        kwargs.setdefault("num_classes", 0)
        extra: dict[str, Any] = {}
    else:
        extra = {"features_only": True, "out_indices": tuple(layers)}

    def make(pretrained: bool, **more: Any) -> nn.Module:
        try:
            return _create(cfg.name, pretrained, kwargs, vit=is_vit, **extra, **more)
        except (IndexError, AssertionError, ValueError) as exc:
            raise BackboneError(f"backbone {cfg.name}: cannot build with layers {layers} ({exc})") from exc

    pretrained = False
    source = "random"
    if cfg.weights:
        model = make(False)
        _load_weights_file(model, cfg.weights, cfg.name)
        pretrained, source = True, cfg.weights
    elif cfg.pretrained == "no":
        model = make(False)
    else:
        cached = _cached_hub_file(cfg.name)
        model = None
        failure = ""
        if cached is not None:
            try:
                model = make(True, pretrained_cfg_overlay={"file": cached})
                pretrained, source = True, f"hub:{cfg.name} (cache)"
            except BackboneError:
                raise
            except Exception as exc:
                failure = f"cached weights unusable ({type(exc).__name__}: {exc})"
        if model is None and hub_reachable():
            try:
                model = make(True)
                pretrained, source = True, f"hub:{cfg.name}"
            except BackboneError:
                raise
            except Exception as exc:
                failure = f"download failed ({type(exc).__name__}: {exc})"
        elif model is None:
            failure = failure or "huggingface.co unreachable"
        if model is None:
            if cfg.pretrained == "yes":
                raise BackboneError(
                    f"pretrained weights for {cfg.name}: {failure}; give backbone.weights=<local file> "
                    "or pretrained='auto'/'no'"
                )
            warnings.warn(
                f"\n*** pretrained weights for {cfg.name} NOT loaded ({failure}): using RANDOM init. "
                "Results will be poor; set backbone.weights=<local file> for offline use. ***",
                BackboneWeightsWarning,
                stacklevel=2,
            )
            model = make(False)

    mean, std = resolve_normalisation(cfg, model)
    common = dict(mean=mean, std=std, pretrained=pretrained, weight_source=source)
    if is_vit:
        return ViTBackbone(model, cfg.name, layers, **common)  # type: ignore[arg-type]
    return CNNBackbone(model, cfg.name, layers, **common)


def resolve_normalisation(cfg: BackboneConfig, model: nn.Module | None = None) -> tuple[tuple, tuple]:
    """(mean, std) for a backbone name without building it (timm pretrained_cfg), cfg override wins."""
    mean: Any = None
    std: Any = None
    if model is not None:
        pcfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = pcfg.get("mean"), pcfg.get("std")
    if mean is None or std is None:
        pcfg2 = _pretrained_cfg(cfg.name)
        if pcfg2 is not None:
            mean, std = pcfg2.mean, pcfg2.std
    if mean is None or std is None:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if cfg.mean is not None:
        mean = cfg.mean
    if cfg.std is not None:
        std = cfg.std
    if len(tuple(mean)) != 3 or len(tuple(std)) != 3:
        raise BackboneError(f"backbone {cfg.name}: mean/std need 3 values each, got {mean} / {std}")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
