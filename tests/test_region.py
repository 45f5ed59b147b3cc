"""Region control: the quadratic model, the Hutchinson diagonal, δ from real updates, the check, adaptation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer_client.region import Decision, RegionConfig, RegionController

torch.set_num_threads(1)


def _tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


def _data(seed: int = 1, n: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g), torch.rand(n, generator=g) + 0.5


def _weighted_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (nn.functional.cross_entropy(model(x), y, reduction="none") * w).mean()


def test_prediction_at_zero_delta_equals_loss0() -> None:
    model = _tiny_mlp()
    x, y, w = _data()
    ctl = RegionController(RegionConfig(seed=3))
    batches = [(_weighted_ce(model, x[:16], y[:16], w[:16]), 16), (_weighted_ce(model, x[16:], y[16:], w[16:]), 16)]
    fit = ctl.fit(list(model.parameters()), batches, step=0)
    with torch.no_grad():
        whole = float(_weighted_ce(model, x, y, w))
    assert fit.loss0 == pytest.approx(whole, rel=1e-6)  # n-weighted mean of equal-size batch means
    assert ctl.predict(list(model.parameters())) == fit.loss0
    assert float(ctl.delta(list(model.parameters())).abs().max()) == 0.0


def test_error_on_a_diagonal_hessian_toy_shrinks_as_the_cube_of_the_step() -> None:
    """L(w) = Σ exp(a_i w_i) has an exactly diagonal Hessian, so one Rademacher probe is exact and the
    remaining error is the Taylor remainder, O(step³) (crest-algorithm.md section 10, check 7)."""
    a = torch.tensor([0.5, -1.0, 1.5, 0.8, -0.3])
    w = nn.Parameter(torch.tensor([0.2, -0.4, 0.1, 0.3, 0.5]))
    ctl = RegionController(RegionConfig(curvature="raw", seed=0))
    fit = ctl.fit([w], [(torch.exp(a * w).sum(), 1)], step=0)
    exact_h = (a**2 * torch.exp(a * w)).detach()
    assert torch.allclose(ctl._h0, exact_h, rtol=1e-6)  # type: ignore[arg-type]
    w0, g0 = w.detach().clone(), ctl._g0
    assert g0 is not None
    errors = []
    for lr in (0.2, 0.1, 0.05, 0.025):
        with torch.no_grad():
            w.copy_(w0 - lr * g0)
            true = float(torch.exp(a * w).sum())
        predicted = ctl.predict([w])
        expected_change = -lr * float(g0 @ g0) + 0.5 * lr**2 * float(g0 @ (exact_h * g0))  # type: ignore[operator]
        assert predicted - fit.loss0 == pytest.approx(expected_change, rel=1e-5)
        errors.append(abs(true - predicted))
    ratios = [errors[i] / errors[i + 1] for i in range(3)]
    assert all(6.5 < r < 9.5 for r in ratios), ratios  # halving the step divides the error by ~8


def test_hutchinson_mean_converges_to_the_explicit_hessian_diagonal() -> None:
    model = _tiny_mlp()
    x, y, w = _data()
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        chunks, lo = [], 0
        for s in shapes:
            chunks.append(flat[lo : lo + s.numel()].reshape(s))
            lo += s.numel()
        h = torch.tanh(x @ chunks[0].T + chunks[1])
        logits = h @ chunks[2].T + chunks[3]
        return (nn.functional.cross_entropy(logits, y, reduction="none") * w).mean()

    hessian = torch.autograd.functional.hessian(loss_of, flat0)
    exact = torch.diagonal(hessian)
    probes = 4000
    ctl = RegionController(RegionConfig(curvature="raw", hutchinson_probes=probes, seed=5))
    _, est = ctl.hutchinson_diagonal(_weighted_ce(model, x, y, w), params)
    # v_i (Hv)_i = H_ii + Σ_{j≠i} v_i v_j H_ij: unbiased, with variance Σ_{j≠i} H_ij² per probe.
    sigma = torch.sqrt(((hessian**2).sum(1) - exact**2) / probes)
    assert ((est - exact).abs() <= 4 * sigma + 1e-7).all()
    assert float((est - exact).norm() / exact.norm()) < 0.05


def test_delta_is_the_sum_of_real_optimizer_updates_and_one_gradient_reaches_the_optimizer() -> None:
    model = _tiny_mlp()
    params = list(model.parameters())
    x, y, w = _data(n=64)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
    ctl = RegionController(RegionConfig())
    sentinel = [torch.full_like(p, 7.0) for p in params]
    for p, s in zip(params, sentinel, strict=True):
        p.grad = s.clone()
    ctl.fit(params, [(_weighted_ce(model, x, y, w), 64)], step=0)
    assert all(
        p.grad is not None and torch.equal(p.grad, s) for p, s in zip(params, sentinel, strict=True)
    )  # fit never touches .grad
    start = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    updates = torch.zeros_like(start)
    for step in range(5):
        xb, yb, wb = x[step * 8 : step * 8 + 8], y[step * 8 : step * 8 + 8], w[step * 8 : step * 8 + 8]
        expected = torch.autograd.grad(_weighted_ce(model, xb, yb, wb), params)
        opt.zero_grad(set_to_none=True)
        _weighted_ce(model, xb, yb, wb).backward()
        assert all(
            p.grad is not None and torch.allclose(p.grad, g, atol=1e-7) for p, g in zip(params, expected, strict=True)
        )  # 1x
        before = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        opt.step()
        updates += torch.cat([p.detach().reshape(-1) for p in params]) - before
        assert ctl.after_step() == Decision.CHECK  # interval 1 until the second fit
    assert torch.allclose(ctl.delta(params), updates, atol=1e-6)
    assert not torch.allclose(updates, torch.zeros_like(updates))
    assert torch.allclose(updates, torch.cat([p.detach().reshape(-1) for p in params]) - start, atol=1e-6)


def test_interval_and_coresets_adapt_to_the_curvature_ratio() -> None:
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    ctl = RegionController(RegionConfig(curvature="raw"), max_coresets=12)
    assert (ctl.interval, ctl.num_coresets) == (1, 5)
    ctl.fit([w], [(4.0 * (w**2).sum(), 10)], step=0)  # h = 8 everywhere
    assert (ctl.interval, ctl.num_coresets) == (1, 5)  # the first fit only records the curvature
    fit = ctl.fit([w], [((w**2).sum() * 1.5, 10)], step=7)  # h = 3: ratio 8/3 -> interval 3
    assert (fit.interval, fit.num_coresets) == (3, 12)  # P = min(5 * 3, cap 12)
    assert [ctl.after_step() for _ in range(6)] == [Decision.NONE, Decision.NONE, Decision.CHECK] * 2
    ctl.fit([w], [(100.0 * (w**2).sum(), 10)], step=20)  # curvature rose: interval back to 1, P = 5
    assert (ctl.interval, ctl.num_coresets) == (1, 5)
    assert ctl.stats.fits == 3 and ctl.stats.last_interval == 1


def test_hessian_every_k_fits_keeps_the_curvature_and_interval_in_between() -> None:
    """hessian_every=3: fits 0 and 3 estimate the Hessian diagonal; fits 1 and 2 take the gradient alone (at the
    current parameters) and keep the last estimate's curvature, interval and P, through a checkpoint too."""
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    ctl = RegionController(RegionConfig(curvature="raw", hessian_every=3), max_coresets=12)
    ctl.fit([w], [(4.0 * (w**2).sum(), 10)], step=0)  # estimated: h = 8
    assert torch.allclose(ctl._h0, torch.full((3,), 8.0))
    fit = ctl.fit([w], [((w**2).sum() * 1.5, 10)], step=5)  # gradient only: h stays 8, interval stays 1
    assert torch.allclose(ctl._g0, 3.0 * w.detach()) and torch.allclose(ctl._h0, torch.full((3,), 8.0))
    assert (fit.interval, fit.num_coresets, fit.curvature_norm) == (1, 5, pytest.approx(8.0 * 3**0.5))
    other = RegionController(RegionConfig(curvature="raw", hessian_every=3), max_coresets=12)
    other.load_state_dict(ctl.state_dict())
    for c in (ctl, other):
        fit = c.fit([w], [((w**2).sum() * 1.5, 10)], step=9)  # the third fit: still the first estimate
        assert (fit.interval, fit.curvature_norm) == (1, pytest.approx(8.0 * 3**0.5))
        fit = c.fit([w], [((w**2).sum() * 1.5, 10)], step=12)  # the fourth: estimated, h = 3 -> interval 8/3
        assert (fit.interval, fit.num_coresets) == (3, 12) and torch.allclose(c._h0, torch.full((3,), 3.0))
    assert ctl.stats.fits == other.stats.fits == 4
    with pytest.raises(ValueError, match="hessian_every must be >= 1, received 0"):
        RegionConfig(hessian_every=0)


def test_check_reselects_beyond_tau_and_state_round_trips() -> None:
    model = _tiny_mlp()
    params = list(model.parameters())
    x, y, w = _data()
    ctl = RegionController(RegionConfig(tau=0.1, seed=2))
    fit = ctl.fit(params, [(_weighted_ce(model, x, y, w), 32)], step=0)
    keep = ctl.check(params, fit.loss0 * 1.05, step=1)
    redo = ctl.check(params, fit.loss0 * 1.5, step=2)
    assert not keep.reselect and keep.relative_error == pytest.approx(0.05 / 1.05)
    assert redo.reselect and redo.predicted == fit.loss0
    assert (ctl.stats.checks, ctl.stats.reselections) == (2, 1)
    state = ctl.state_dict()
    other = RegionController(RegionConfig(tau=0.1, seed=99))
    other.load_state_dict(state)
    with torch.no_grad():
        params[0].add_(0.01)
    assert other.predict(params) == ctl.predict(params)
    assert torch.equal(other._generator.get_state(), ctl._generator.get_state())
    with pytest.raises(ValueError, match="version 0"):
        other.load_state_dict({**state, "version": 0})
    with pytest.raises(ValueError, match="mode 'crest'"):
        RegionController(RegionConfig(mode="fixed")).load_state_dict(state)


def test_fixed_mode_reselects_every_fixed_steps_and_config_errors_name_the_value() -> None:
    ctl = RegionController(RegionConfig(mode="fixed", steps_per_round=3))
    assert [ctl.after_step() for _ in range(3)] == [Decision.NONE, Decision.NONE, Decision.RESELECT]
    # A fixed region takes every coreset of the round, and asks for the next lead_steps before its end.
    fixed = RegionConfig(mode="fixed", steps_per_round=3, coresets_per_interval=2)
    led = RegionController(fixed, max_coresets=7, lead_steps=1)
    assert led.num_coresets == 7 and [led.after_step() for _ in range(2)] == [Decision.NONE, Decision.RESELECT]
    with pytest.raises(ValueError, match="received 'adam'"):
        RegionConfig(curvature="adam")
    with pytest.raises(ValueError, match="received 0"):
        RegionConfig(tau=0)
    assert math.isnan(RegionController().stats.last_relative_error)
