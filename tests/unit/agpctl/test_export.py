"""``agpctl export``: ONNX (run with onnxruntime) and TorchScript files reproduce the PyTorch
maps and scores, with normalisation and inference state (OneNIP's prompt pool) inside."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from agpctl.cli import cli
from agpctl.inference.export import export_model, run_exported, verification_images
from agpctl.models import build_model
from agpctl.runs import load_run
from helpers import tiny_run_config

# Independent check in these tests (the exporter verifies with its own, looser bound).
ATOL = 1e-4


def pytorch_reference(model, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The method's own predict on images normalised the way agp's data pipeline does."""
    mean = torch.tensor(model.backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.backbone.std).view(1, 3, 1, 1)
    with torch.no_grad():
        prediction = model.predict((images - mean) / std)
    return prediction.maps.numpy(), prediction.scores.numpy()


def assert_matches(path: str, fmt: str, model, batch: int | None = None) -> None:
    images = verification_images(model.cfg.image_size, 4, seed=123)
    if batch:
        images = images[:batch]
    ref_maps, ref_scores = pytorch_reference(model, images)
    maps, scores = run_exported(open(path, "rb").read(), fmt, images)
    assert maps.shape == ref_maps.shape and scores.shape == ref_scores.shape
    assert np.abs(maps - ref_maps).max() <= ATOL
    assert np.abs(scores - ref_scores).max() <= ATOL
    assert ref_maps.std() > 0  # the comparison is not between two constant maps


def test_cli_exports_agpnet_to_onnx_and_it_matches_pytorch(trained_run, tmp_path):
    out = str(tmp_path / "agpnet.onnx")
    result = CliRunner().invoke(cli, ["export", "--run", trained_run, "--format", "onnx", "--out", out, "--json"])
    assert result.exit_code == 0, result.output
    reported = json.loads(result.output)
    assert reported["map_max_abs_diff"] <= reported["tolerance"]
    assert reported["batch_size"] is None  # a dynamic batch axis: any batch size runs
    model = load_run(trained_run, torch.device("cpu")).model
    assert_matches(out, "onnx", model)
    assert_matches(out, "onnx", model, batch=1)

    import onnx

    metadata = {p.key: p.value for p in onnx.load(out).metadata_props}
    thresholds = json.loads(metadata["thresholds"])
    stored = load_run(trained_run, torch.device("cpu")).thresholds
    assert thresholds["image"] == pytest.approx(stored["image"])


def test_cli_exports_agpnet_to_torchscript_with_any_batch_size(trained_run, tmp_path):
    out = str(tmp_path / "agpnet.pt")
    result = CliRunner().invoke(cli, ["export", "--run", trained_run, "--format", "torchscript", "--out", out])
    assert result.exit_code == 0, result.output
    assert "max abs diff" in result.output
    model = load_run(trained_run, torch.device("cpu")).model
    assert_matches(out, "torchscript", model)
    assert_matches(out, "torchscript", model, batch=1)
    extra = {"agp.json": ""}
    torch.jit.load(out, _extra_files=extra)
    assert json.loads(extra["agp.json"])["method"] == "agpnet"


def test_export_at_another_image_size_resizes_inside(trained_run, tmp_path):
    model = load_run(trained_run, torch.device("cpu")).model
    result = export_model(model, str(tmp_path / "big.pt"), "torchscript", image_size=96)
    module = torch.jit.load(str(tmp_path / "big.pt"))
    maps, scores = module(torch.rand(2, 3, 96, 96))
    assert maps.shape == (2, 96, 96) and scores.shape == (2,)
    assert result.map_max_abs_diff <= result.tolerance


def built_method(method: str):
    model = build_model(tiny_run_config(method)).eval()
    if method == "onenip":  # prompt pool (two categories) and score normalisation, as after training
        normal = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        model.fit_inference_state([{"image": normal, "category": ["a", "a", "b", "b"]}])
    return model


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("method", ["onenip", "rlr"])
def test_other_methods_export_and_match(method, fmt, tmp_path):
    model = built_method(method)
    out = str(tmp_path / f"{method}.{fmt}")
    result = export_model(model, out, fmt)
    assert result.map_max_abs_diff <= result.tolerance
    assert result.batch_size is None  # dynamic batch in ONNX too
    assert_matches(out, fmt, model)
    assert_matches(out, fmt, model, batch=1)
    if method == "onenip":
        # The prompt pool travels inside the file: an emptied pool in the live model does not matter.
        model.pool_features = model.pool_features[:0]
        maps, _ = run_exported(open(out, "rb").read(), fmt, verification_images(64, result.batch_size or 2))
        assert np.isfinite(maps).all()
