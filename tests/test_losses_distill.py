"""The training objective (xtoken_ext.distill): oracles O-18 / O-19 and the masked next-token CE."""
from __future__ import annotations

import math

import pytest
import torch

from xtoken_ext.distill import combine_losses, next_token_ce, weighted_kd


def test_o18_dynamic_scaling_value_and_gradient_multipliers():
    ce = torch.tensor(2.0, requires_grad=True)
    kd = torch.tensor(0.5, requires_grad=True)
    loss, scale = combine_losses(ce, kd)
    assert math.isclose(float(loss.detach()), 4.0) and math.isclose(float(scale), 4.0)  # always 2·CE
    loss.backward()
    assert math.isclose(float(kd.grad), 4.0) and math.isclose(float(ce.grad), 1.0)


def test_o18_zero_kd_scale_is_one():
    loss, scale = combine_losses(torch.tensor(2.0), torch.tensor(0.0))
    assert float(scale) == 1.0 and float(loss) == 2.0


def test_o19_multi_teacher_sum():
    kd = weighted_kd([torch.tensor(0.2), torch.tensor(1.5)], [0.2, 0.8])
    assert math.isclose(float(kd), 1.24, rel_tol=1e-6)
    loss, scale = combine_losses(torch.tensor(0.62), kd)
    assert math.isclose(float(loss), 1.24, rel_tol=1e-6) and math.isclose(float(scale), 0.5, rel_tol=1e-6)


def test_fixed_mode_and_errors():
    loss, scale = combine_losses(torch.tensor(2.0), torch.tensor(0.5), mode="fixed", kd_weight=1.0, ce_weight=0.1)
    assert math.isclose(float(loss), 0.7, rel_tol=1e-6) and float(scale) == 1.0
    with pytest.raises(ValueError, match="mode"):
        combine_losses(torch.tensor(1.0), torch.tensor(1.0), mode="adaptive")
    with pytest.raises(ValueError, match="weights"):
        weighted_kd([torch.tensor(1.0)], [0.5, 0.5])


def test_next_token_ce_masks_padding_and_uses_normalizer():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    lp = torch.log_softmax(logits, -1)
    terms = [-lp[b, p, ids[b, p + 1]] for b in range(2) for p in range(4) if mask[b, p + 1]]
    expected = torch.stack(terms).mean()
    assert torch.allclose(next_token_ce(logits, ids, mask), expected, atol=1e-6)
    assert torch.allclose(next_token_ce(logits, ids, mask, normalizer=12), torch.stack(terms).sum() / 12, atol=1e-6)
