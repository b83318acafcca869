"""OneNIP: neighbourhood mask, prompt selection, Dice loss, refiner, checkpoint round trip,
traceability, training-step contract and a short end-to-end training run.

Tiny CPU setting everywhere: random-init ConvNeXt-atto stages 0–1 (strides 4 and 8, 40 + 80
channels), 64 px images, token grid 8×8 (feature_stride 8), width 64, one encoder and one
decoder block. ConvNeXt stage outputs are layer-normed, roughly centred maps, like the linear
bottleneck outputs of the paper's EfficientNet; post-ReLU maps of a random ResNet are dominated
by one constant vector, which a tiny transformer needs far more steps to get past.
"""

from __future__ import annotations

import io
import os
import warnings

import agp_models  # noqa: F401  (before timm)
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image
from torch.utils.data import DataLoader

from agp_data.anomaly_synthesis import SynthesisConfig, synthesize
from agp_data.dataset import AnomalyDataset
from agp_data.layouts import load_samples
from agp_data.training_view import TrainingView
from agp_models.backbones import build_backbone
from agp_models.base import BackboneConfig
from agp_models.metrics import compute_metrics
from agp_models.onenip import OneNIP, OneNIPConfig, Refiner, dice_loss, onenip_attention_mask
from agp_models.postprocess import postprocess

SIZE = 64
CATEGORIES = ("checker", "ring", "stripes")


# -- generated images: three visually distinct categories, defects with exact masks ----------
def normal_image(category: str, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    if category == "stripes":  # blue horizontal stripes, phase jitter
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (yy + rng.uniform(-1.5, 1.5)) / 12)
        a, b = np.array([40, 60, 150.0]), np.array([150, 170, 230.0])
    elif category == "checker":  # orange/brown checkerboard, ±1 px offset
        oy, ox = rng.integers(-1, 2, 2)
        t = (((yy + oy) // 8 + (xx + ox) // 8) % 2).astype(float)
        a, b = np.array([200, 120, 40.0]), np.array([90, 60, 30.0])
    else:  # yellow ring on green, ±2 px position jitter
        cy, cx = SIZE / 2 + rng.uniform(-2, 2, 2)
        r = np.hypot(yy - cy, xx - cx)
        t = ((r > SIZE * 0.18) & (r < SIZE * 0.38)).astype(float)
        a, b = np.array([30, 70, 50.0]), np.array([210, 190, 90.0])
    image = (1 - t)[..., None] * a + t[..., None] * b + rng.normal(0, 4, (SIZE, SIZE, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def defective_image(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark / bright / red blob or scratch (1–4 % of the image); mask = changed pixels."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    if rng.random() < 0.5:
        cy, cx = rng.uniform(10, SIZE - 10, 2)
        ry, rx = rng.uniform(3.5, 7, 2)
        region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    else:
        cy, cx = rng.uniform(12, SIZE - 12, 2)
        angle, length = rng.uniform(0, np.pi), rng.uniform(10, 18)
        across = np.abs(-(yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle))
        along = np.abs((yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle))
        region = (across <= 1.2) & (along <= length)
    colour = [np.array([20, 20, 20.0]), np.array([250, 250, 250.0]), np.array([200, 30, 30.0])][int(rng.integers(0, 3))]
    out = image.astype(float)
    out[region] = 0.3 * out[region] + 0.7 * colour
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out, (out != image).any(axis=-1)


def tiny_config(**overrides) -> OneNIPConfig:
    values = dict(
        backbone=BackboneConfig(name="convnext_atto", pretrained="no"), layers=[0, 1], image_size=SIZE,
        feature_stride=8, width=64, heads=4, ffn=128, encoder_depth=1, decoder_depth=1,
        neighbourhood_size=4, refiner_channels=32, dropout=0.0, smoothing_sigma=2.0, score_pool=4,
    )
    values.update(overrides)
    return OneNIPConfig(**values)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the machine's cores are shared, and results stay reproducible."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    cfg = tiny_config()
    return build_backbone(cfg.backbone, cfg.layers, cfg.image_size)


def normalise(images: list[np.ndarray], backbone) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    return (x - mean) / std


def normal_batches(backbone, per_category: int, seed: int, batch_size: int = 6) -> list[dict]:
    rng = np.random.default_rng(seed)
    images, names = [], []
    for category in CATEGORIES:
        images += [normal_image(category, rng) for _ in range(per_category)]
        names += [category] * per_category
    x = normalise(images, backbone)
    return [{"image": x[i : i + batch_size], "category": names[i : i + batch_size]} for i in range(0, len(names), batch_size)]


def training_batch(backbone, seed: int = 0) -> dict:
    """One hand-built batch with every extra (as TrainingView would deliver it)."""
    rng = np.random.default_rng(seed)
    images = [normal_image(c, rng) for c in CATEGORIES for _ in range(2)]
    prompts = [normal_image(c, rng) for c in CATEGORIES for _ in range(2)]
    synth = [synthesize(img, rng, SynthesisConfig(probability=1.0)) for img in images]
    return {
        "image": normalise(images, backbone),
        "index": torch.arange(len(images)),
        "prompt_image": normalise(prompts, backbone),
        "anomaly_image": normalise([a for a, _ in synth], backbone),
        "anomaly_mask": torch.from_numpy(np.stack([m for _, m in synth])).float().unsqueeze(1),
        "category": [c for c in CATEGORIES for _ in range(2)],
    }


# -- neighbourhood mask ------------------------------------------------------------------------
def test_neighbourhood_mask_hides_exactly_the_window() -> None:
    allowed = onenip_attention_mask((5, 5), 3)
    assert allowed.shape == (25, 25) and allowed.dtype == torch.bool

    def hidden(y: int, x: int) -> set[tuple[int, int]]:
        row = allowed[y * 5 + x]
        return {(j // 5, j % 5) for j in range(25) if not row[j]}

    # written out by hand: centre, corner and edge tokens of the 5×5 grid, window 3×3
    assert hidden(2, 2) == {(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1), (3, 2), (3, 3)}
    assert hidden(0, 0) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert hidden(0, 2) == {(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)}
    assert hidden(4, 3) == {(3, 2), (3, 3), (3, 4), (4, 2), (4, 3), (4, 4)}
    # per axis the windows cover 2+3+3+3+2 = 13 positions: 13² = 169 hidden pairs
    assert int((~allowed).sum()) == 169
    assert torch.equal(onenip_attention_mask((5, 5), 2), allowed)  # even size: radius size // 2
    assert onenip_attention_mask((5, 5), 0) is None
    with pytest.raises(ValueError, match="hides the whole"):
        onenip_attention_mask((5, 5), 9)


def test_masked_attention_weights_are_exactly_zero(backbone) -> None:
    torch.manual_seed(1)
    model = OneNIP(tiny_config(neighbourhood_size=3), backbone).eval()
    grid = model.grid
    allowed = onenip_attention_mask(grid, 3)
    attention = model.transformer.decoder[0].prompt_to_target
    prompt, target = torch.randn(2, 64, 64), torch.randn(2, 64, 64)
    pos = model.transformer.pos_embed.table()
    with torch.no_grad():
        _, probs = attention.attn(prompt + pos, target + pos, target, attn_mask=allowed, return_attention=True)
    assert probs.shape == (2, 4, 64, 64)
    assert torch.all(probs[..., ~allowed] == 0.0)
    assert torch.all(probs[..., allowed] > 0.0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 64))
    # the prompt→target output of token (3, 3) ignores the target tokens of its 3×3 window
    query = 3 * grid[1] + 3
    window = (~allowed[query]).nonzero().flatten()
    changed = target.clone()
    changed[:, window] += 5.0 * torch.randn(2, len(window), 64)
    with torch.no_grad():
        before = attention(prompt, target, pos, model.transformer.attention_mask)
        after = attention(prompt, changed, pos, model.transformer.attention_mask)
    torch.testing.assert_close(after[:, query], before[:, query], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 0], before[:, 0])  # token (0, 0) does see them


# -- prompt selection --------------------------------------------------------------------------
def test_prompt_selection_by_similarity_and_by_class(backbone) -> None:
    torch.manual_seed(2)
    model = OneNIP(tiny_config(), backbone).eval()
    model.fit_inference_state(normal_batches(backbone, per_category=3, seed=10))
    assert model.pool_categories == sorted(CATEGORIES)
    assert model.pool_features.shape == (3, 40 + 80, 8, 8)
    rng = np.random.default_rng(99)
    names = [c for c in CATEGORIES for _ in range(4)]
    x = normalise([normal_image(c, rng) for c in names], backbone)
    chosen = model.select_prompts(model.extract(x))
    assert [model.pool_categories[i] for i in chosen.tolist()] == names

    by_class = OneNIP(tiny_config(prompt_selection="class"), backbone).eval()
    by_class.load_state_dict(model.state_dict())
    shuffled = ["stripes", "checker", "ring", "ring"]
    picked = by_class.select_prompts(model.extract(x[:4]), {"category": shuffled})
    assert [by_class.pool_categories[i] for i in picked.tolist()] == shuffled
    with pytest.raises(ValueError, match="no prompt for categories"):
        by_class.select_prompts(model.extract(x[:1]), {"category": ["bottle"]})
    with pytest.raises(RuntimeError, match="fit_inference_state"):
        OneNIP(tiny_config(), backbone).predict(x[:1])


# -- losses and refiner ------------------------------------------------------------------------
def test_dice_loss_hand_computed() -> None:
    pred = torch.tensor([[[0.5, 0.5], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]).unsqueeze(1)
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]).unsqueeze(1)
    # sample 1: overlap 0.5, Σp² = 0.5, Σt² = 1 → 1 − (2·0.5 + 1) / (1.5 + 1) = 0.2
    # sample 2: all zero → 1 − 1 / 1 = 0
    assert dice_loss(pred, target).item() == pytest.approx(0.1)
    assert dice_loss(pred[:1], target[:1], smooth=0.0).item() == pytest.approx(1 - 1 / 1.5)
    assert dice_loss(target, target).item() == pytest.approx(0.0)
    # a normal image predicted at 0.5 everywhere: 1 − 1 / (4·0.25 + 1) = 0.5
    assert dice_loss(torch.full((1, 1, 2, 2), 0.5), torch.zeros(1, 1, 2, 2)).item() == pytest.approx(0.5)


def test_refiner_output_sizes(backbone) -> None:
    refiner = Refiner(192, channels=16)
    assert refiner(torch.rand(2, 192, 5, 7)).shape == (2, 1, 20, 28)
    model = OneNIP(tiny_config(), backbone)
    assert model.channels == 120
    probs = model.refine(torch.rand(3, 120, 8, 8), (SIZE, SIZE)).detach()
    assert probs.shape == (3, 1, SIZE, SIZE) and float(probs.min()) >= 0.0 and float(probs.max()) <= 1.0


# -- training step -----------------------------------------------------------------------------
def test_training_step_losses_gradients_and_ablations(backbone) -> None:
    batch = training_batch(backbone)
    torch.manual_seed(3)
    model = OneNIP(tiny_config(), backbone).train()
    out = model.training_step(batch, 0.0)
    assert set(out) == {"loss", "loss_rec", "loss_res", "loss_dice"}
    assert all(torch.isfinite(v) for v in out.values())
    # Authors' code: one MSE over the stacked normal + synthetic streams = ½(L_rec + L_res).
    expected = 0.5 * (out["loss_rec"] + out["loss_res"]) + model.cfg.lam * out["loss_dice"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    torch.manual_seed(3)
    paper = OneNIP(tiny_config(reconstruction_loss="sum"), backbone).train()
    paper_out = paper.training_step(batch, 0.0)
    torch.testing.assert_close(paper_out["loss"].detach(),
                               paper_out["loss_rec"] + paper_out["loss_res"] + paper.cfg.lam * paper_out["loss_dice"])
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.transformer.parameters())
    assert all(p.grad is not None for p in model.refiner.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())
    assert not any(k.startswith("backbone") for k in model.state_dict())
    # clean features of the image and of the prompt (by prompt_index) are cached per index
    model.training_step({**batch, "prompt_index": torch.arange(6) + 100}, 0.1)
    assert set(model._feature_cache) == set(range(6)) | set(range(100, 106))

    no_restoration = OneNIP(tiny_config(restoration=False), backbone).train()
    assert no_restoration.training_step(batch, 0.0)["loss_res"].item() == 0.0
    no_refiner = OneNIP(tiny_config(refiner=False), backbone).train()
    out = no_refiner.training_step(batch, 0.0)
    assert no_refiner.refiner is None and out["loss_dice"].item() == 0.0 and out["loss_res"].item() > 0.0
    with pytest.raises(KeyError, match="prompt"):
        model.training_step({k: v for k, v in batch.items() if k != "prompt_image"}, 0.0)

    static = OneNIP(tiny_config(decoder="unidirectional"), backbone).eval()
    features = static.extract(batch["image"])
    with torch.no_grad():
        one = static.reconstruct(features, static.extract(batch["prompt_image"]))
        other = static.reconstruct(features, static.extract(batch["prompt_image"]).flip(0))
    assert one.shape == features.shape and not torch.allclose(one, other)  # the prompt matters


# -- inference state, checkpoints, tracing -----------------------------------------------------
def test_state_dict_round_trip_gives_identical_maps(backbone) -> None:
    torch.manual_seed(4)
    model = OneNIP(tiny_config(), backbone)
    model.training_step(training_batch(backbone), 0.0)["loss"].backward()  # BN statistics move
    model.eval()
    model.fit_inference_state(iter(normal_batches(backbone, per_category=2, seed=5)))  # one-shot iterator
    assert float(model.rec_high) > float(model.rec_low) > 0.0
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    torch.manual_seed(123)  # different initial weights, empty pool
    restored = OneNIP(tiny_config(), backbone).eval()
    assert restored.pool_features.shape[0] == 0
    restored.load_state_dict(state)
    assert restored.pool_categories == model.pool_categories
    x = normal_batches(backbone, per_category=1, seed=6)[0]["image"]
    first, second = model.predict(x), restored.predict(x)
    assert first.maps.shape == (3, SIZE, SIZE) and first.scores.shape == (3,)
    assert torch.equal(first.maps, second.maps) and torch.equal(first.scores, second.scores)


def test_predict_traces_and_transductive_scaling(backbone) -> None:
    torch.manual_seed(5)
    model = OneNIP(tiny_config(), backbone).eval()
    model.fit_inference_state(normal_batches(backbone, per_category=2, seed=7))

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: OneNIP):
            super().__init__()
            self.inner = inner

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            prediction = self.inner.predict(images)
            return prediction.maps, prediction.scores

    rng = np.random.default_rng(8)
    example = normalise([normal_image(c, rng) for c in CATEGORIES], backbone)
    fresh = normalise([defective_image(normal_image(c, rng), rng)[0] for c in reversed(CATEGORIES)], backbone)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes are constants by design
        traced = torch.jit.trace(Wrapper(model), (example,), check_trace=False)
        for got, want in zip(traced(fresh), Wrapper(model)(fresh)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    transductive = OneNIP(tiny_config(fusion_norm="transductive"), backbone).eval()
    transductive.load_state_dict(model.state_dict())
    rec = transductive.anomaly_maps(fresh)["rec"]
    assert float(rec.min()) >= -1e-6 and float(rec.max()) <= 1 + 1e-6
    without_refiner = OneNIP(tiny_config(refiner=False), backbone).eval()
    without_refiner.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("refiner")})
    maps = without_refiner.anomaly_maps(fresh)
    assert "refiner" not in maps and torch.equal(maps["fused"], maps["rec"])


# -- a short training run ----------------------------------------------------------------------
def _write_train_set(root: str, per_category: int) -> None:
    rng = np.random.default_rng(0)
    for category in CATEGORIES:
        folder = os.path.join(root, category, "train", "good")
        os.makedirs(folder)
        for i in range(per_category):
            Image.fromarray(normal_image(category, rng)).save(os.path.join(folder, f"{i:03d}.png"))


def test_short_training_detects_and_refiner_sharpens_localisation(backbone, tmp_path) -> None:
    """Multi-class run: 3 categories × 12 normal images, 300 steps of batch 4 (lr 5e-4 instead
    of 1e-4 so that a CPU-sized run gets somewhere; at 1e-3 the Dice refiner sometimes dies
    into predicting all-zero), synthetic anomalies on every image as the authors do.
    Test: 12 normal + 12 defective images per category.

    Measured with model seeds 0/1/2/3 (the test uses 0), one thread:
      fused S:    I-AUROC 0.833–0.867, P-AUROC 0.902–0.924, P-AP 0.229–0.324
      S_rec only: I-AUROC 0.748–0.766, P-AUROC 0.884–0.896, P-AP 0.100–0.116
      loss ratio (mean of last 20 / first 20 steps): L_rec 0.078–0.086, L_dice 0.466–0.500
    Chance: AUROC 0.5, P-AP ≈ 0.02 (defect pixels are 2 % of all pixels). Each threshold
    below sits at least 0.05 under the worst measured value.
    """
    root = str(tmp_path / "data")
    _write_train_set(root, 12)
    train_set = AnomalyDataset(load_samples("mvtec", root, split="train"), SIZE, backbone.mean, backbone.std)
    view = TrainingView(train_set, OneNIP.batch_extras, SynthesisConfig(probability=OneNIP.pseudo_anomaly_probability))
    torch.manual_seed(0)
    # The numbers above were measured with the paper's variants, which #15 turned into options
    # (the defaults now follow the authors' code); the test keeps the variant it was measured on.
    model = OneNIP(tiny_config(lr=5e-4, feature_resize="area", reconstruction_loss="sum", dice_overlap_weight=2.0,
                               refiner_init="default", prompt_selection="similarity"), backbone)
    steps = 300
    [(optimizer, scheduler)] = model.configure_optimizers(steps)
    model.train()
    step, epoch, history = 0, 0, []
    while step < steps:
        view.set_epoch(epoch)
        loader = DataLoader(view, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(epoch))
        for batch in loader:
            losses = model.training_step(batch, step / steps)
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
            scheduler.step()
            history.append({k: float(v.detach()) for k, v in losses.items()})
            step += 1
            if step == steps:
                break
        epoch += 1
    first, last = history[:20], history[-20:]
    ratios = {k: np.mean([h[k] for h in last]) / np.mean([h[k] for h in first]) for k in ("loss_rec", "loss_dice")}
    assert ratios["loss_rec"] < 0.2 and ratios["loss_dice"] < 0.6, ratios

    model.eval()
    model.fit_inference_state(DataLoader(train_set, batch_size=12))
    rng = np.random.default_rng(123)
    images, masks, labels = [], [], []
    for category in CATEGORIES:
        for _ in range(12):
            images.append(normal_image(category, rng))
            masks.append(np.zeros((SIZE, SIZE), bool))
            defective, mask = defective_image(normal_image(category, rng), rng)
            images.append(defective)
            masks.append(mask)
            labels += [0, 1]
    x = normalise(images, backbone)
    masks_array, labels_array = np.stack(masks), np.array(labels)
    with torch.no_grad():
        raw = model.anomaly_maps(x)
        prediction = model.predict(x)
    results = {}
    for name in ("fused", "rec"):
        maps, scores = postprocess(raw[name], SIZE, model.cfg.smoothing_sigma, model.cfg.score_pool)
        results[name] = compute_metrics(scores.numpy(), labels_array, maps.numpy(), masks_array)
    torch.testing.assert_close(prediction.maps, postprocess(raw["fused"], SIZE, 2.0, 4)[0])
    fused, rec = results["fused"], results["rec"]
    summary = {n: {k: round(v, 3) for k, v in r.items()} for n, r in results.items()}
    assert fused["i_auroc"] >= 0.75 and fused["p_auroc"] >= 0.85 and fused["p_ap"] >= 0.15, summary
    assert rec["i_auroc"] >= 0.68 and rec["p_auroc"] >= 0.82, summary  # reconstruction alone detects too
    assert fused["p_ap"] >= rec["p_ap"] + 0.07, summary  # the refiner sharpens localisation


# -- the authors' code as defaults (#15) --------------------------------------------------------
def test_defaults_follow_the_authors_code_and_paper_variants_stay_reachable(backbone) -> None:
    cfg = OneNIPConfig()
    assert cfg.backbone.name == "tf_efficientnet_b4.aa_in1k"
    assert (cfg.feature_resize, cfg.smoothing_sigma, cfg.reconstruction_loss, cfg.dice_overlap_weight) == \
        ("bilinear", 0.0, "stacked", 1.0)
    assert (cfg.ffn_inner_dropout, cfg.refiner_init, cfg.prompt_selection, cfg.fusion_norm) == \
        (False, "xavier", "auto", "train")
    x = normalise([normal_image("ring", np.random.default_rng(1))], backbone)
    out = backbone(x).features
    model = OneNIP(tiny_config(), backbone).eval()
    expected = torch.cat([F.interpolate(f, size=model.grid, mode="bilinear", align_corners=True) for f in out], 1)
    torch.testing.assert_close(model.extract(x), expected)
    area = OneNIP(tiny_config(feature_resize="area"), backbone).eval()
    assert not torch.allclose(area.extract(x), expected)
    # Dice numerator: authors' Σp·t + s, Eq. 7's 2·Σp·t + s.
    pred, target = torch.full((1, 1, 2, 2), 0.5), torch.ones(1, 1, 2, 2)
    assert dice_loss(pred, target, 1.0, overlap_weight=1.0).item() == pytest.approx(1 - 3 / 6)
    assert dice_loss(pred, target, 1.0, overlap_weight=2.0).item() == pytest.approx(1 - 5 / 6)
    # Dropout only around the attention and after the FFN unless the paper's inner dropout is asked for.
    inner = [OneNIP(tiny_config(dropout=0.1, ffn_inner_dropout=flag), backbone).transformer.encoder[0].ffn.ffn.drop.p
             for flag in (False, True)]
    assert inner == [0.0, 0.1]
    refiner = OneNIP(tiny_config(), backbone).refiner
    assert all(float(m.bias.abs().sum()) == 0.0 for m in refiner.modules() if isinstance(m, nn.ConvTranspose2d))


def test_auto_prompt_selection_uses_known_categories_else_similarity(backbone) -> None:
    torch.manual_seed(2)
    model = OneNIP(tiny_config(), backbone).eval()
    model.fit_inference_state(normal_batches(backbone, per_category=3, seed=10))
    rng = np.random.default_rng(7)
    x = normalise([normal_image("ring", rng) for _ in range(3)], backbone)
    features = model.extract(x)
    named = ["stripes", "checker", "ring"]
    picked = model.select_prompts(features, {"category": named})
    assert [model.pool_categories[i] for i in picked.tolist()] == named  # labelled: the code's class prompt
    similar = model.select_prompts(features)  # unlabelled (predict): the paper's similarity
    assert [model.pool_categories[i] for i in similar.tolist()] == ["ring"] * 3
    unknown = model.select_prompts(features, {"category": ["bottle"] * 3})  # a category the pool lacks
    assert torch.equal(unknown, similar)
