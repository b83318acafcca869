"""The shared layers' dropout: the cheaper CPU masks must be dropout, exactly in expectation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from agp_models.layers import Dropout, MultiHeadAttention, dropout, torch_dropout_masks

LEVELS = 1 << 16


def _effective(p: float) -> float:
    return round(p * LEVELS) / LEVELS


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drops_the_rate_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    n = 1 << 20
    out = dropout(torch.ones(n), p)
    dropped = (out == 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped - p) < 5 * sigma
    kept = out[out != 0]
    assert torch.all(kept == kept[0])
    assert kept[0].item() == pytest.approx(1 / (1 - _effective(p)), rel=1e-6)
    assert out.double().mean().item() == pytest.approx(1.0, abs=5 * sigma / (1 - p))


def test_masks_follow_the_seed_and_are_independent_across_elements():
    torch.manual_seed(3)
    first = dropout(torch.ones(4096), 0.5)
    torch.manual_seed(3)
    assert torch.equal(first, dropout(torch.ones(4096), 0.5))
    assert not torch.equal(first, dropout(torch.ones(4096), 0.5))
    # neighbouring elements share a random word: their drops must still be uncorrelated
    torch.manual_seed(0)
    drops = (dropout(torch.ones(1 << 20), 0.5) == 0).double().reshape(-1, 4)
    correlation = torch.corrcoef(drops.T)
    off_diagonal = correlation[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 0.01


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.3)
    y.backward(torch.ones_like(y))
    kept = (y != 0).float()
    torch.testing.assert_close(x.grad, kept / (1 - _effective(0.3)))


def test_inactive_and_edge_cases():
    x = torch.randn(100)
    assert dropout(x, 0.3, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.count_nonzero(dropout(x, 1.0)) == 0  # beyond the 16-bit masks: F.dropout's
    half = dropout(torch.randn(256, 256, dtype=torch.bfloat16), 0.2)
    assert half.dtype == torch.bfloat16
    module = Dropout(0.2).eval()
    assert module(x) is x
    assert isinstance(module, torch.nn.Dropout)  # same state dict and repr as before


def test_torch_masks_reproduce_f_dropout():
    x = torch.randn(1000)
    with torch_dropout_masks():
        torch.manual_seed(5)
        ours = dropout(x, 0.25)
    torch.manual_seed(5)
    torch.testing.assert_close(ours, F.dropout(x, 0.25, True))


def test_attention_dropout_is_unbiased(one_torch_thread):
    torch.manual_seed(0)
    attention = MultiHeadAttention(16, 2, attn_drop=0.4)
    query, key = torch.randn(1, 5, 16), torch.randn(1, 7, 16)
    with torch.no_grad():
        attention.eval()
        expected = attention(query, key)
        attention.train()
        draws = torch.stack([attention(query, key) for _ in range(4000)])
        single = draws[0]
    assert not torch.allclose(single, expected, atol=1e-3)  # dropout is on in training
    # the mean over draws converges to the deterministic output
    spread = draws.std(dim=0) / math.sqrt(len(draws))
    assert torch.all((draws.mean(dim=0) - expected).abs() < 5 * spread + 1e-6)
