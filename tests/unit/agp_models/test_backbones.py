"""Frozen timm backbones (agp_models.backbones): shapes, attention maps, weights handling."""

from __future__ import annotations

import warnings

import pytest
import torch

import agp_models  # noqa: F401  (before timm)
import timm

from agp_models.backbones import (
    BackboneError,
    BackboneWeightsWarning,
    build_backbone,
    hub_reachable,
    resolve_normalisation,
)
from agp_models.base import BackboneConfig
from helpers import REPO_ROOT

MOBILENET_FILE = REPO_ROOT.parent / "shared" / "weights" / "mobilenetv2_100_imagenet.pt"
TINY_VIT = dict(name="vit_tiny_patch16_224", pretrained="no", kwargs={"depth": 4})


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Deterministic "no hub" regardless of the machine's network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


def _unfused_reference(model: torch.nn.Module, images: torch.Tensor, prefix: int):
    """Run a timm ViT with fused attention off and record every block's probabilities and output."""
    probs, outputs = [], []
    hooks = []
    for block in model.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: probs.append(o.detach())))
        hooks.append(block.register_forward_hook(lambda m, i, o: outputs.append(o.detach())))
    try:
        model.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
        for block in model.blocks:
            block.attn.fused_attn = True
    return probs, outputs


def test_vit_feature_shapes_and_strides():
    bb = build_backbone(BackboneConfig(**TINY_VIT), [2, 4], image_size=64)
    assert bb.is_vit and bb.channels == [192, 192] and bb.strides == [16, 16]
    out = bb(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in out.features] == [(2, 192, 4, 4)] * 2
    assert out.attentions is None
    bb8 = build_backbone(
        BackboneConfig(name="vit_tiny_patch16_224", pretrained="no", kwargs={"depth": 2, "patch_size": 8}), [1], 64
    )
    assert bb8.strides == [8] and tuple(bb8(torch.randn(1, 3, 64, 64)).features[0].shape) == (1, 192, 8, 8)


def test_cnn_feature_shapes_and_strides():
    bb = build_backbone(BackboneConfig(name="resnet18", pretrained="no"), [1, 2, 3], image_size=64)
    assert not bb.is_vit and bb.channels == [64, 128, 256] and bb.strides == [4, 8, 16]
    out = bb(torch.randn(2, 3, 64, 64), with_attention=True)
    assert [tuple(f.shape) for f in out.features] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    assert out.attentions is None


@pytest.mark.parametrize(
    "cfg, layers, size, prefix",
    [
        (TINY_VIT, [1, 3, 4], 64, 1),
        # DINOv2-style: CLS + 4 registers, patch 14, no CLS position embedding.
        (
            dict(
                name="vit_small_patch14_reg4_dinov2",
                pretrained="no",
                kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2},
            ),
            [1, 2],
            42,
            5,
        ),
    ],
)
def test_attention_rows_match_unfused_timm(cfg, layers, size, prefix):
    bb = build_backbone(BackboneConfig(**cfg), layers, image_size=size)
    assert bb.num_prefix_tokens == prefix
    images = torch.randn(2, 3, size, size)
    out = bb(images, with_attention=True)
    probs, outputs = _unfused_reference(bb.model, images, prefix)
    grid = size // bb.strides[0]
    for i, layer in enumerate(layers):
        attn = out.attentions[i]
        assert attn.shape == (2, bb.model.blocks[0].attn.num_heads, grid * grid)
        assert (attn >= 0).all() and (attn.sum(-1) <= 1 + 1e-5).all()
        # Dropping the CLS/register columns leaves strictly less than 1 per row.
        assert (attn.sum(-1) < 1).all()
        torch.testing.assert_close(attn, probs[layer - 1][:, :, 0, prefix:], atol=1e-5, rtol=1e-4)
        expected = outputs[layer - 1][:, prefix:].transpose(1, 2).reshape(2, -1, grid, grid)
        torch.testing.assert_close(out.features[i], expected, atol=1e-5, rtol=1e-4)


def test_frozen_and_no_grad():
    bb = build_backbone(BackboneConfig(**TINY_VIT), [4], 64)
    bb.train()
    assert not bb.training and not bb.model.training
    assert all(not p.requires_grad for p in bb.parameters())
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    out = bb(x, with_attention=True)
    out.features[0].sum().backward()  # gradients flow to inputs only
    assert x.grad is not None and all(p.grad is None for p in bb.parameters())
    # Blocks past the deepest requested one are never kept.
    assert len(bb.model.blocks) == 4
    assert len(build_backbone(BackboneConfig(**TINY_VIT), [2], 64).model.blocks) == 2


def test_pretrained_yes_offline_raises():
    assert not hub_reachable()
    cfg = BackboneConfig(name="vit_tiny_patch16_224.augreg_in21k", pretrained="yes", kwargs={"depth": 1})
    with pytest.raises(BackboneError, match="unreachable"):
        build_backbone(cfg, [1], 32)


def test_pretrained_auto_offline_warns_and_uses_random_init():
    cfg = BackboneConfig(name="vit_tiny_patch16_224.augreg_in21k", pretrained="auto", kwargs={"depth": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bb = build_backbone(cfg, [1], 32)
    relevant = [w for w in caught if issubclass(w.category, BackboneWeightsWarning)]
    assert len(relevant) == 1 and "RANDOM" in str(relevant[0].message)
    assert bb.pretrained is False and bb.weight_source == "random"


def test_unknown_model_and_bad_layers():
    with pytest.raises(BackboneError, match="unknown timm model"):
        build_backbone(BackboneConfig(name="no_such_net_v9", pretrained="no"), [1], 64)
    with pytest.raises(BackboneError, match="1..4"):
        build_backbone(BackboneConfig(**TINY_VIT), [5], 64)
    with pytest.raises(BackboneError):
        build_backbone(BackboneConfig(name="resnet18", pretrained="no"), [9], 64)


def test_weights_file_loaded_and_resampled(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)  # 14×14 grid
    path = tmp_path / "vit.pt"
    torch.save(source.state_dict(), path)
    bb = build_backbone(
        BackboneConfig(name="vit_tiny_patch16_224", weights=str(path), kwargs={"depth": 2}), [2], image_size=64
    )
    assert bb.pretrained and bb.weight_source == str(path)
    torch.testing.assert_close(bb.model.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert bb.model.pos_embed.shape == (1, 1 + 16, 192)  # resampled from 1 + 196


def test_bad_weights_files(tmp_path):
    wrong = tmp_path / "resnet.pt"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), wrong)
    with pytest.raises(BackboneError, match="found with the right shape"):
        build_backbone(BackboneConfig(name="vit_tiny_patch16_224", weights=str(wrong), kwargs={"depth": 2}), [2], 64)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="torch.load"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(garbage)), [1], 64)
    with pytest.raises(BackboneError, match="not found"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(tmp_path / "missing.pt")), [1], 64)


def test_normalisation_resolution():
    mean, std = resolve_normalisation(BackboneConfig(name="vit_small_patch16_224.dino"))
    assert mean == pytest.approx((0.485, 0.456, 0.406)) and std == pytest.approx((0.229, 0.224, 0.225))
    mean, std = resolve_normalisation(BackboneConfig(name="mobilenetv2_100", mean=[0.5] * 3, std=[0.5] * 3))
    assert mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5)


@pytest.mark.skipif(not MOBILENET_FILE.is_file(), reason="offline MobileNetV2 weights not present")
def test_mobilenet_weights_file():
    cfg = BackboneConfig(
        name="mobilenetv2_100",
        weights=str(MOBILENET_FILE),
        kwargs={"pad_type": "same"},
        mean=[0.5] * 3,
        std=[0.5] * 3,
    )
    bb = build_backbone(cfg, [1, 2, 3], image_size=64)
    assert bb.pretrained and bb.channels == [24, 32, 96] and bb.strides == [4, 8, 16]
    assert bb.mean == (0.5, 0.5, 0.5)
    state = torch.load(MOBILENET_FILE, weights_only=True)
    torch.testing.assert_close(bb.model.conv_stem.weight, state["conv_stem.weight"])
    out = bb(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape) for f in out.features] == [(1, 24, 16, 16), (1, 32, 8, 8), (1, 96, 4, 4)]
    assert all(torch.isfinite(f).all() for f in out.features)
