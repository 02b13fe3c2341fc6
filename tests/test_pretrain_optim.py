"""Tests of the LARS optimiser, parameter groups and schedules (pretrain/optim.py, schedules.py)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from pretrain.optim import LARS, build_optimizer, param_groups_lars
from pretrain.schedules import lr_schedule, momentum_schedule, scaled_lr


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)  # weight: decay + LARS; bias: neither
        self.bn = nn.BatchNorm1d(2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)  # like the target network: left out
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]]))
            self.fc.bias.copy_(torch.tensor([0.1, -0.1]))

    def forward(self, x):
        return self.frozen(self.bn(self.fc(x)))


def _loss(model, x):
    return (model(x) ** 2).sum() + model.fc.weight.sum()


def _hand_lars(params, grads, bufs, lr, wd, eta=1e-3, eps=1e-8, momentum=0.9, adapt=True):
    out = []
    for i, (w, g) in enumerate(zip(params, grads)):
        g = g + wd * w
        if adapt:
            wn, gn = w.norm().item(), g.norm().item()
            if wn > 0 and gn > 0:
                g = eta * wn / (gn + eps) * g
        bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
        out.append(w - lr * bufs[i])
    return out


def test_param_groups_exclude_1d_and_frozen():
    model = _Tiny()
    groups = param_groups_lars(model, weight_decay=1e-5)
    no_decay, decay = groups
    assert [p.shape for p in decay["params"]] == [torch.Size([2, 3])]
    assert len(no_decay["params"]) == 3  # fc.bias, bn.weight, bn.bias
    assert no_decay["weight_decay"] == 0 and not no_decay["lars"]
    assert decay["weight_decay"] == 1e-5 and decay["lars"]
    ids = {id(p) for g in groups for p in g["params"]}
    assert id(model.frozen.weight) not in ids and id(model.frozen.bias) not in ids


def test_lars_steps_match_hand_computation():
    torch.manual_seed(0)
    model = _Tiny()
    opt = build_optimizer(model, lr=0.5, weight_decay=0.01)
    assert isinstance(opt, LARS)
    decay = [model.fc.weight]
    no_decay = [model.fc.bias, model.bn.weight, model.bn.bias]
    bufs_d, bufs_n = [None], [None] * 3
    for step in range(3):
        x = torch.randn(4, 3)
        opt.zero_grad()
        _loss(model, x).backward()
        raw = [p.grad.clone() for p in decay + no_decay]
        exp_d = _hand_lars([p.detach().clone() for p in decay], raw[:1], bufs_d, lr=0.5, wd=0.01)
        exp_n = _hand_lars([p.detach().clone() for p in no_decay], raw[1:], bufs_n, lr=0.5, wd=0.0, adapt=False)
        frozen_before = model.frozen.weight.clone()
        opt.step()
        for p, e in zip(decay + no_decay, exp_d + exp_n):
            torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
        assert torch.equal(model.frozen.weight, frozen_before)
        torch.testing.assert_close(model.fc.weight.grad, raw[0])  # raw gradient kept for logging


def test_lars_zero_weight_skips_trust_ratio():
    w = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([{"params": [w], "weight_decay": 0.0, "lars": True}], lr=1.0, momentum=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(w.detach(), -torch.ones(2, 2))  # ratio 1 when ||w|| = 0


def test_lars_with_grad_scaler_equals_unscaled():
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    plain = _Tiny()
    scaled = copy.deepcopy(plain)
    opt_p = build_optimizer(plain, lr=0.3)
    opt_s = build_optimizer(scaled, lr=0.3)
    _loss(plain, x).backward()
    opt_p.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(_loss(scaled, x)).backward()
    scaler.unscale_(opt_s)
    scaler.step(opt_s)
    scaler.update()
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b)


def test_optimizer_state_dict_round_trip():
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    model = _Tiny()
    opt = build_optimizer(model, lr=0.2)
    _loss(model, x).backward()
    opt.step()
    clone = _Tiny()
    clone.load_state_dict(model.state_dict())
    opt2 = build_optimizer(clone, lr=0.2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if saved to disk (no aliasing)
    for m, o in ((model, opt), (clone, opt2)):
        o.zero_grad()
        _loss(m, x).backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(a, b)


def test_build_optimizer_sgd_and_errors():
    opt = build_optimizer(_Tiny(), lr=0.1, optimizer="sgd")
    assert isinstance(opt, torch.optim.SGD)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 1e-5]
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(_Tiny(), lr=0.1, optimizer="adam")


# -------------------------------------------------------------- schedules
def test_lr_schedule_shape_and_endpoints():
    peak, total, warm = 8.0, 1000, 100
    lrs = lr_schedule(peak, total, warm)
    assert lrs.shape == (total,)
    assert lrs[0] == pytest.approx(peak / 100)
    assert lrs[warm] == pytest.approx(peak)
    assert lrs[50] == pytest.approx(peak / 100 * (99 * 50 / warm + 1))
    t = 550
    assert lrs[t] == pytest.approx(1e-6 + (peak - 1e-6) * (1 + math.cos(math.pi * (t - warm) / (total - warm))) / 2)
    assert np.all(np.diff(lrs[: warm + 1]) > 0)
    assert np.all(np.diff(lrs[warm:]) <= 0)
    assert 1e-6 <= lrs[-1] < 1e-3
    assert lrs.min() >= 1e-6


def test_lr_schedule_without_warmup_and_errors():
    lrs = lr_schedule(1.0, 10, 0, eta_min=0.0)
    assert lrs[0] == pytest.approx(1.0) and np.all(np.diff(lrs) < 0)
    with pytest.raises(ValueError):
        lr_schedule(1.0, 10, 11)
    with pytest.raises(ValueError):
        lr_schedule(1.0, 0, 0)
    assert scaled_lr(1.0, 2048) == pytest.approx(8.0)
    assert scaled_lr(1.0, 256) == pytest.approx(1.0)


def test_momentum_schedule():
    taus = momentum_schedule(0.99, 500)
    assert taus.shape == (500,)
    assert taus[0] == pytest.approx(0.99)
    assert taus[250] == pytest.approx(0.995)
    assert np.all(np.diff(taus) >= 0) and taus[-1] < 1.0 and taus[-1] > 0.99999
    with pytest.raises(ValueError):
        momentum_schedule(1.5, 10)
