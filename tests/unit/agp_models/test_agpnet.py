"""AGPNet (agp_models.agpnet): schedules, mask, perturbations, EMA teacher, cache, learning."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import agp_models  # noqa: F401  (before timm)
from agp_models.agpnet import AGPNet, AGPNetConfig, minmax_normalise
from agp_models.backbones import build_backbone
from agp_models.base import BackboneConfig

SIZE = 64


def tiny_vit(patch: int = 16, depth: int = 2) -> BackboneConfig:
    return BackboneConfig(name="vit_tiny_patch16_224", pretrained="no", kwargs={"depth": depth, "patch_size": patch})


def make_model(backbone: BackboneConfig | None = None, layers: list[int] | None = None, **overrides) -> AGPNet:
    backbone = backbone or tiny_vit()
    layers = layers or [1, 2]
    settings = dict(
        backbone=backbone,
        layers=layers,
        image_size=SIZE,
        decoder_width=32,
        decoder_heads=4,
        decoder_depth=2,
        smoothing_sigma=1.0,
        score_pool=4,
    )
    settings.update(overrides)
    cfg = AGPNetConfig(**settings)
    return AGPNet(cfg, build_backbone(cfg.backbone, cfg.layers, cfg.image_size))


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann–Whitney AUROC (continuous scores: ties are negligible)."""
    scores, labels = scores.flatten().double(), labels.flatten().bool()
    ranks = torch.empty_like(scores)
    ranks[scores.argsort()] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_default_config_matches_spec():
    cfg = AGPNetConfig()
    assert cfg.backbone.name == "vit_small_patch16_224.dino" and cfg.layers == [3, 6, 9, 12]
    assert (cfg.image_size, cfg.decoder_depth, cfg.decoder_width, cfg.decoder_heads) == (256, 4, 384, 6)
    assert (cfg.ema_momentum, cfg.ema_every, cfg.attention_source) == (0.9999, 10, "both")
    assert (cfg.feature_noise, cfg.image_noise, cfg.noise_floor, cfg.image_sigma) == ("attention", "attention", 0.1, 1.0)
    assert (cfg.weight_decay, cfg.smoothing_sigma, cfg.score_pool) == (1e-4, 4.0, 16)
    # lr and schedule belong to the recipes since #15: the paper's is ViTAD's 1e-4·batch/8 at
    # batch 32, ×0.1 at 40 % of 500 epochs.
    paper = AGPNetConfig.recipes["paper"]
    assert (paper.epochs, paper.batch_size, paper.lr_for(32), paper.lr_for(8)) == (500, 32, 4e-4, 1e-4)
    assert (paper.lr_schedule, paper.lr_drop_at, paper.lr_drop_factor) == ("step", 0.4, 0.1)
    with pytest.raises(ValueError, match="feature_noise"):
        AGPNetConfig(feature_noise="gaussian")


def test_shapes_vit_and_cnn():
    vit = make_model()
    batch = {"image": torch.randn(3, 3, SIZE, SIZE), "index": torch.arange(3)}
    losses = vit.training_step(batch, 0.3)
    assert set(losses) == {"loss", "loss_feature", "loss_image"} and losses["loss"].requires_grad
    torch.testing.assert_close(losses["loss"].detach(), 0.5 * (losses["loss_feature"] + losses["loss_image"]))
    vit.eval()
    prediction = vit.predict(torch.randn(2, 3, SIZE, SIZE))
    assert prediction.maps.shape == (2, SIZE, SIZE) and prediction.scores.shape == (2,)

    cnn = make_model(BackboneConfig(name="resnet18", pretrained="no"), [1, 2, 3])
    assert cnn.fusion == "concat" and cnn.grid == (4, 4) and cnn.feature_channels == 64 + 128 + 256
    assert torch.isfinite(cnn.training_step(batch, 0.9)["loss"])
    cnn.eval()
    assert cnn.predict(torch.randn(2, 3, SIZE, SIZE)).maps.shape == (2, SIZE, SIZE)
    # ViT layers share grid and width: summed, so the target keeps the backbone width.
    assert vit.fusion == "sum" and vit.feature_channels == 192 and vit.grid == (4, 4)


def test_target_is_sum_of_affine_free_layer_norms():
    model = make_model()
    images = torch.randn(2, 3, SIZE, SIZE)
    (target,) = model.extract(images)
    maps = model.backbone(images).features
    expected = sum(
        (f - f.mean(1, keepdim=True)) / (f.var(1, unbiased=False, keepdim=True) + 1e-6).sqrt() for f in maps
    )
    torch.testing.assert_close(target, expected, atol=1e-4, rtol=1e-4)


def test_schedules():
    model = make_model()
    alphas = [model.feature_noise_alpha(p) for p in (0.0, 0.5, 0.8, 1.0)]
    assert alphas == pytest.approx([0.0, 0.625, 1.0, 1.0])
    ratios = [model.mask_ratio(p) for p in (0.0, 0.2, 0.5, 0.8, 1.0)]
    assert ratios == pytest.approx([0.6, 0.6, 0.8, 1.0, 1.0])
    assert make_model(noise_schedule="fixed").feature_noise_alpha(0.0) == 1.0

    # Noise std: β where N(M)=0, α(t)+β where N(M)=1 (measured over 8192 channels per token).
    big = make_model()
    features = torch.zeros(1, 8192, 4, 4)
    guide = torch.zeros(1, 4, 4)
    guide[0, :2] = 1.0
    for progress, alpha in ((0.0, 0.0), (0.5, 0.625), (1.0, 1.0)):
        std = big.perturb_features(features, guide, progress).std(dim=1)[0]
        assert std[2:].mean().item() == pytest.approx(0.1, rel=0.03)
        assert std[:2].mean().item() == pytest.approx(alpha + 0.1, rel=0.03)

    # Learning rate ×0.1 from 40 % of the steps on (a config outside a run takes the paper
    # recipe's lr at its own batch size, 4e-4 at 32, since #15).
    optimizer, scheduler = model.configure_optimizers(total_steps=100)[0]
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[39] == pytest.approx(4e-4) and rates[40] == pytest.approx(4e-5) and rates[99] == pytest.approx(4e-5)
    trained = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert trained == {id(p) for p in model.decoder.parameters()}  # never teacher or backbone


def test_attention_mask_peaks_where_the_backbone_fires():
    # Random ResNet at init: BN is identity and convs have no bias, so a black image gives exactly
    # zero activations; a single bright square makes the activation prior peak on its token.
    model = make_model(BackboneConfig(name="resnet18", pretrained="no"), [1, 2, 3], attention_source="prior")
    images = torch.zeros(2, 3, SIZE, SIZE)
    images[0, :, 32:48, 16:32] = 3.0  # token (2, 1) of the 4×4 grid
    images[1, :, 0:16, 48:64] = 3.0  # token (0, 3)
    target, prior = model.extract(images, with_prior=True)
    mask = model.attention_mask(target, prior)
    assert mask.shape == (2, 4, 4)
    assert torch.allclose(mask.amin(dim=(1, 2)), torch.zeros(2)) and torch.allclose(mask.amax(dim=(1, 2)), torch.ones(2))
    assert mask[0].argmax().item() == 2 * 4 + 1 and mask[1].argmax().item() == 0 * 4 + 3

    # ViT prior (CLS attention) and EMA-teacher attention: both in [0, 1], averaged for "both".
    vit = make_model(attention_source="both")
    x = torch.randn(2, 3, SIZE, SIZE)
    target, prior = vit.extract(x, with_prior=True)
    both = vit.attention_mask(target, prior)
    expected = 0.5 * (minmax_normalise(prior) + minmax_normalise(vit.teacher_attention(target)))
    torch.testing.assert_close(both, expected)
    assert both.min() >= 0 and both.max() <= 1
    received = vit.teacher_attention(target)  # column means of softmax rows: they sum to 1
    torch.testing.assert_close(received.sum(dim=(1, 2)), torch.ones(2))


def test_noise_is_confined_to_the_mask_without_floor():
    model = make_model(noise_floor=0.0)
    features = torch.randn(2, 192, 4, 4)
    guide = torch.zeros(2, 4, 4)
    guide[:, 1:3, 1:3] = torch.rand(2, 2, 2) + 0.5
    delta = model.perturb_features(features, guide, progress=0.5) - features
    outside = (guide == 0)[:, None].expand_as(delta)
    assert torch.count_nonzero(delta[outside]) == 0
    assert (delta[~outside] != 0).float().mean() > 0.99
    # With the default floor β=0.1 there is noise everywhere.
    floor = make_model().perturb_features(features, guide, progress=0.5) - features
    assert torch.count_nonzero(floor[outside]) == outside.sum()

    images = torch.randn(2, 3, SIZE, SIZE)
    for progress, ratio in ((0.0, 0.6), (0.5, 0.8), (1.0, 1.0)):
        binary = model.image_noise_mask(guide, progress, (SIZE, SIZE))
        assert (binary.flatten(1).sum(1) == round(ratio * SIZE * SIZE)).all()
        noisy = model.perturb_image(images, guide, progress)
        changed = (noisy != images).any(dim=1, keepdim=True)
        if ratio < 1:  # the same top-r pixels: zero change outside B
            assert not changed[binary == 0].any()
    # Top-r picks the pixels where the (upsampled) guide is largest.
    binary = model.image_noise_mask(guide, 0.0, (SIZE, SIZE))
    up = F.interpolate(guide[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    assert up[binary == 1].min() >= up[binary == 0].max()


def test_no_noise_mode_is_plain_reconstruction():
    model = make_model(feature_noise="none", image_noise="none")
    batch = {"image": torch.randn(2, 3, SIZE, SIZE), "index": torch.arange(2)}
    losses = model.training_step(batch, 0.7)
    (target,) = model.extract(batch["image"])
    torch.testing.assert_close(losses["loss"], F.mse_loss(model.decoder(target), target), atol=1e-3, rtol=1e-3)


def test_ema_teacher_every_ten_steps():
    model = make_model(ema_momentum=0.9)
    for t, s in zip(model.teacher.parameters(), model.decoder.parameters()):
        assert torch.equal(t, s) and not t.requires_grad
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(torch.randn_like(p))
    before = [t.clone() for t in model.teacher.parameters()]
    for step in range(1, 10):
        model.after_step(step)
    assert all(torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))
    model.after_step(10)
    for old, new, student in zip(before, model.teacher.parameters(), model.decoder.parameters()):
        torch.testing.assert_close(new, old * 0.9 + student * (1 - 0.9), rtol=1e-6, atol=1e-7)
    # "prior" mask: there is no teacher to keep up to date.
    prior_only = make_model(attention_source="prior")
    snapshot = [t.clone() for t in prior_only.teacher.parameters()]
    with torch.no_grad():
        next(prior_only.decoder.parameters()).add_(1.0)
    prior_only.after_step(10)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, prior_only.teacher.parameters()))


@pytest.mark.parametrize(
    "feature_noise, image_noise",
    [("none", "none"), ("random", "none"), ("none", "random"), ("random", "random"), ("attention", "attention"),
     ("attention", "none"), ("none", "attention")],
)
def test_table5_modes_train(feature_noise, image_noise):
    model = make_model(feature_noise=feature_noise, image_noise=image_noise)
    optimizer, scheduler = model.configure_optimizers(total_steps=3)[0]
    images = torch.randn(4, 3, SIZE, SIZE)
    start = [p.clone() for p in model.decoder.parameters()]
    for step in range(3):
        loss = model.training_step({"image": images, "index": torch.arange(4)}, step / 3)["loss"]
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        model.after_step(step + 1)
    assert any(not torch.equal(a, b) for a, b in zip(start, model.decoder.parameters()))


def test_feature_cache_runs_backbone_once_per_clean_image():
    for image_noise, expected_images in (("none", 8), ("attention", 8 + 4 * 4)):
        model = make_model(image_noise=image_noise)
        seen: list[int] = []
        model.backbone.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
        images = torch.randn(8, 3, SIZE, SIZE)
        for _epoch in range(2):
            for order in (torch.tensor([3, 0, 5, 6]), torch.tensor([1, 2, 7, 4])):
                model.training_step({"image": images[order], "index": order}, 0.5)
        assert sum(seen) == expected_images
    # Cached values (fp16 on the CPU) are the clean features of the right images.
    target, prior = model.clean_features({"image": images[[6, 1]], "index": torch.tensor([6, 1])})
    fresh_target, fresh_prior = model.extract(images[[6, 1]], with_prior=True)
    torch.testing.assert_close(target, fresh_target, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(prior, fresh_prior, atol=1e-3, rtol=1e-2)
    # Outside training (eval) the cache is never used.
    model.eval()
    count = len(seen)
    model.predict(images[:2])
    assert len(seen) == count + 1


def test_state_dict_round_trip():
    model = make_model()
    optimizer = model.configure_optimizers(10)[0][0]
    batch = {"image": torch.randn(4, 3, SIZE, SIZE), "index": torch.arange(4)}
    for step in range(2):
        loss = model.training_step(batch, 0.1)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.update_teacher()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert not any(k.startswith("backbone") for k in model.state_dict())
    assert any(k.startswith("teacher.") for k in model.state_dict())
    fresh = AGPNet(model.cfg, model.backbone)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    model.eval()
    fresh.eval()
    test_images = torch.randn(2, 3, SIZE, SIZE)
    a, b = model.predict(test_images), fresh.predict(test_images)
    assert torch.equal(a.maps, b.maps) and torch.equal(a.scores, b.scores)


def test_predict_is_traceable():
    model = make_model().eval()

    class Export(torch.nn.Module):
        def __init__(self, inner: AGPNet):
            super().__init__()
            self.inner = inner

        def forward(self, images: torch.Tensor):
            prediction = self.inner.predict(images)
            return prediction.maps, prediction.scores

    wrapper = Export(model)
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, torch.randn(2, 3, SIZE, SIZE), check_trace=False)
    other = torch.randn(2, 3, SIZE, SIZE)
    maps, scores = traced(other)
    expected = model.predict(other)
    torch.testing.assert_close(maps, expected.maps)
    torch.testing.assert_close(scores, expected.scores)


def _texture(count: int, generator: torch.Generator) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    images = []
    for _ in range(count):
        phase = torch.rand(3, generator=generator) * 6.28
        base = 0.5 * torch.sin(0.3 * xx + phase[0]) * torch.cos(0.3 * yy + phase[1]) + 0.3 * torch.sin(
            0.15 * (xx + yy) + phase[2]
        )
        images.append(torch.stack([base, 0.8 * base, 0.6 * base]) + 0.02 * torch.randn(3, 64, 64, generator=generator))
    return torch.stack(images)


def _with_blobs(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    out, masks = images.clone(), []
    for i in range(len(images)):
        cy, cx = torch.randint(12, 52, (2,), generator=generator).float()
        radius = 4 + 3 * torch.rand(1, generator=generator)
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        out[i] += (3.0 if i % 2 == 0 else -3.0) * blob  # bright and dark defects
        masks.append((blob > 0.3).float())
    return out, torch.stack(masks)


def test_short_training_detects_and_localises_blobs():
    generator = torch.Generator().manual_seed(0)
    train = _texture(32, generator)
    normal = _texture(12, generator)
    defective, masks = _with_blobs(_texture(12, generator), generator)
    model = make_model(
        tiny_vit(patch=8, depth=4),
        [2, 4],
        decoder_width=64,
        smoothing_sigma=2.0,
        lr=2e-3,
        lr_drop_at=0.8,
        ema_momentum=0.99,
    )
    steps = 100
    optimizer, scheduler = model.configure_optimizers(steps)[0]
    for step in range(steps):
        order = torch.randperm(32)[:8]
        loss = model.training_step({"image": train[order], "index": order}, step / steps)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        model.after_step(step + 1)
    model.eval()
    on_normal, on_defective = model.predict(normal), model.predict(defective)
    labels = torch.tensor([0] * 12 + [1] * 12)
    image_auroc = auroc(torch.cat([on_normal.scores, on_defective.scores]), labels)
    pixel_auroc = auroc(torch.cat([on_normal.maps, on_defective.maps]), torch.cat([torch.zeros_like(masks), masks]))
    # Measured (this seed): I-AUROC 1.000, P-AUROC 0.994. The same recipe with data seeds 1 and 2
    # gave 0.861 / 0.995 and 1.000 / 0.995. Chance is 0.5; the bounds sit below the worst seed
    # so that platform-dependent float differences in the trajectory cannot flip the test.
    assert image_auroc >= 0.8
    assert pixel_auroc >= 0.95


def test_bf16_autocast_training_and_float32_maps():
    model = make_model()
    batch = {"image": torch.randn(2, 3, SIZE, SIZE), "index": torch.arange(2)}
    for _ in range(2):  # second step reads the (fp16) feature cache under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model.training_step(batch, 0.5)
        assert torch.isfinite(losses["loss"])
        losses["loss"].backward()
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prediction = model.predict(batch["image"])
    assert prediction.maps.dtype == torch.float32 and prediction.scores.dtype == torch.float32
