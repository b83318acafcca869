"""agp_models.postprocess: scipy-equal smoothing, hand-checked pooling, traceable graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from agp_models.postprocess import gaussian_smooth, image_scores, postprocess, upsample


@pytest.mark.parametrize(("height", "width"), [(40, 56), (5, 9)])  # 5x9: radius 16 > map size
@pytest.mark.parametrize("sigma", [4.0, 1.5])
def test_gaussian_smooth_equals_scipy_gaussian_filter(
    height: int, width: int, sigma: float
) -> None:
    maps = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    smoothed = gaussian_smooth(maps, sigma).numpy()
    for index in range(maps.shape[0]):
        expected = ndimage.gaussian_filter(maps[index].double().numpy(), sigma, truncate=4.0)
        assert np.abs(smoothed[index] - expected).max() < 1e-5


def test_gaussian_smooth_sigma_zero_is_identity_and_edges_use_scipy_reflect() -> None:
    maps = torch.rand(2, 6, 7)
    assert torch.equal(gaussian_smooth(maps, 0.0), maps)
    # A constant row stays constant only with a symmetric boundary; a step at the border
    # distinguishes scipy 'reflect' (edge repeated) from 'mirror' (torch's F.pad reflect).
    step = torch.zeros(1, 1, 12)
    step[0, 0, 0] = 1.0
    smoothed = gaussian_smooth(step, 1.0)[0, 0].double().numpy()
    expected = ndimage.gaussian_filter1d(step[0, 0].double().numpy(), 1.0, mode="reflect")
    mirrored = ndimage.gaussian_filter1d(step[0, 0].double().numpy(), 1.0, mode="mirror")
    assert np.abs(smoothed - expected).max() < 1e-6
    assert np.abs(smoothed - mirrored).max() > 1e-2


def by_hand_scores(maps: np.ndarray, pool: int) -> np.ndarray:
    scores = []
    for anomaly_map in maps.astype(np.float64):
        window_h, window_w = min(pool, anomaly_map.shape[0]), min(pool, anomaly_map.shape[1])
        means = [
            anomaly_map[top : top + window_h, left : left + window_w].mean()
            for top in range(anomaly_map.shape[0] - window_h + 1)
            for left in range(anomaly_map.shape[1] - window_w + 1)
        ]
        scores.append(max(means))
    return np.array(scores)


@pytest.mark.parametrize("pool", [16, 3, 30])  # 30: larger than the 20-px side -> clamped
def test_image_scores_are_max_of_stride_one_window_means(pool: int) -> None:
    maps = torch.rand(2, 20, 24, generator=torch.Generator().manual_seed(1))
    maps[1, 5:9, 10:14] += 3.0
    expected = by_hand_scores(maps.numpy(), pool)
    assert np.abs(image_scores(maps, pool).double().numpy() - expected).max() < 1e-6


def test_image_scores_pool_zero_or_one_is_plain_max() -> None:
    maps = torch.tensor([[[0.1, 0.7], [0.3, 0.2]], [[-1.0, -2.0], [-0.5, -3.0]]])
    assert image_scores(maps, 0).tolist() == pytest.approx([0.7, -0.5])
    assert image_scores(maps, 1).tolist() == pytest.approx([0.7, -0.5])
    # 2x2 window on a 2x2 map: the mean of the whole map.
    assert image_scores(maps, 2).tolist() == pytest.approx([0.325, -1.625])


def test_upsample_is_bilinear_half_pixel() -> None:
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    assert upsample(maps, 4).shape == (1, 4, 4)
    assert upsample(torch.rand(3, 8, 8), (16, 24)).shape == (3, 16, 24)
    # align_corners=False: output x=0..3 samples input at -0.25, 0.25, 0.75, 1.25 (clamped).
    assert upsample(maps, 4)[0, 0].tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])


def test_postprocess_composes_upsample_smooth_score() -> None:
    raw = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(2))
    maps, scores = postprocess(raw, 32, 4.0, 16)
    assert maps.shape == (2, 32, 32) and scores.shape == (2,)
    expected = gaussian_smooth(upsample(raw, 32), 4.0)
    assert torch.allclose(maps, expected)
    assert torch.allclose(scores, image_scores(expected, 16))


class _PostprocessModule(torch.nn.Module):
    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return postprocess(raw, 32, 4.0, 8)


def test_postprocess_traces_to_torchscript() -> None:
    raw = torch.rand(2, 8, 8)
    traced = torch.jit.trace(_PostprocessModule(), raw)
    other = torch.rand(2, 8, 8)
    for got, want in zip(traced(other), _PostprocessModule()(other)):
        assert torch.allclose(got, want)


def test_postprocess_exports_to_onnx(tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    raw = torch.rand(2, 8, 8)
    path = tmp_path / "postprocess.onnx"
    torch.onnx.export(_PostprocessModule(), (raw,), str(path), input_names=["raw"], dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.rand(2, 8, 8)
    got = session.run(None, {"raw": other.numpy()})
    for got_array, want in zip(got, _PostprocessModule()(other)):
        assert np.abs(got_array - want.numpy()).max() < 1e-5


def test_score_sigma_scores_another_smoothing_than_the_pixel_map() -> None:
    # RLR's authors: pixel metrics on the unsmoothed map, image score from the σ=4-smoothed one.
    raw = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(3))
    maps, scores = postprocess(raw, 32, 0.0, 0, score_sigma=4.0)
    assert torch.equal(maps, upsample(raw, 32))
    assert torch.allclose(scores, gaussian_smooth(upsample(raw, 32), 4.0).flatten(1).amax(dim=1))
    assert not torch.allclose(scores, maps.flatten(1).amax(dim=1))
    same_maps, same_scores = postprocess(raw, 32, 4.0, 16, score_sigma=None)
    assert torch.equal(same_scores, postprocess(raw, 32, 4.0, 16)[1]) and torch.equal(same_maps, postprocess(raw, 32, 4.0, 16)[0])
