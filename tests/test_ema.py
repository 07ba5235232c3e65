"""EMA of the weights: the update rule exactly, the cosine schedule, checkpoints, running with EMA weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from s2v_core.ema import EMA, cosine_momentum


def make_module():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_schedule_runs_from_start_to_end_on_a_cosine():
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_momentum(100, 100, 0.996) == 1.0 and cosine_momentum(250, 100, 0.996) == 1.0
    assert cosine_momentum(25, 100, 0.9, 0.99) == pytest.approx(0.99 - 0.09 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_update_is_m_shadow_plus_one_minus_m_weight():
    module = make_module()
    ema = EMA(module, total_steps=10, momentum_start=0.9)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    module.train()(torch.randn(5, 3))  # moves the BatchNorm running statistics
    m = ema.update(module, step=3)
    assert m == cosine_momentum(3, 10, 0.9)
    for name, param in module.named_parameters():
        exact = before[name].double() * m + param.detach().double() * (1.0 - m)
        assert torch.allclose(ema.shadow[name].double(), exact, rtol=1e-7, atol=1e-8), name
        assert torch.equal(ema.shadow[name], before[name].mul(m).add_(param.detach(), alpha=1.0 - m)), name
    assert torch.equal(ema.buffers["1.running_mean"], module[1].running_mean)


def test_applied_runs_with_ema_weights_and_restores_the_module():
    module = make_module().eval()
    ema = EMA(module, total_steps=5)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(3.0)
    x = torch.randn(2, 3)
    trained = module(x)
    with ema.applied(module):
        assert torch.allclose(module(x), make_module().eval()(x))
    assert torch.equal(module(x), trained)


def test_state_dict_round_trip_and_errors():
    module = make_module()
    ema = EMA(module, total_steps=7, momentum_start=0.99)
    ema.update(module, step=2)
    other = EMA(make_module(), total_steps=1)
    other.load_state_dict(ema.state_dict())
    assert other.step == 2 and other.total_steps == 7 and other.momentum(2) == ema.momentum(2)
    assert all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ema.shadow)
    with pytest.raises(ValueError, match="parameter names differ"):
        EMA(nn.Linear(2, 2), total_steps=1).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="momentum_start"):
        EMA(module, total_steps=5, momentum_start=1.1)
    with pytest.raises(ValueError, match="lacks parameter"):
        ema.update(nn.Linear(3, 4), step=3)
