"""Samplers on a closed form: data ~ N(mu_y, s^2 I) has an exact linear-path velocity field."""
import math

import pytest
import torch

from samplers import euler_maruyama_sampler, euler_sampler, score_from_velocity


class GaussianVelocity(torch.nn.Module):
    """Exact E[e - x | x_t] for x ~ N(mu[y], s^2 I) on x_t = (1 - t) x + t e; the null label
    (index num_classes) gets mean 0. Records the batch sizes and labels it is called with."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu = torch.cat([torch.as_tensor(mu, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
        self.s = s
        self.num_classes = len(mu)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], float(t[0]), y.clone()))
        x, t = x.double(), t.double().view(-1, 1, 1, 1)
        mu = self.mu[y].view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * self.s ** 2 + t ** 2
        v = (t - (1 - t) * self.s ** 2) / var * (x - (1 - t) * mu) - mu
        return v.float(), None


def draw(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 2, 2, generator=g)


@pytest.mark.parametrize("kind,steps,tol", [("euler", 100, 0.03), ("heun", 20, 0.03), ("sde", 250, 0.05)])
def test_samplers_recover_the_gaussian(kind, steps, tol):
    mu, s = [1.5, -2.0], 0.5
    model = GaussianVelocity(mu, s)
    z = draw()
    y = torch.arange(4000) % 2
    torch.manual_seed(1)
    if kind == "sde":
        x = euler_maruyama_sampler(model, z, y, num_steps=steps)
    else:
        x = euler_sampler(model, z, y, num_steps=steps, heun=(kind == "heun"))
    assert x.dtype == torch.float64
    for label in (0, 1):
        xs = x[y == label]
        assert abs(xs.mean().item() - mu[label]) < tol
        assert abs(xs.std().item() - s) < tol * 2


def test_heun_is_more_accurate_than_euler_at_equal_steps():
    model = GaussianVelocity([1.0], 0.3)
    z = draw(64)
    y = torch.zeros(64, dtype=torch.long)
    exact = euler_sampler(model, z, y, num_steps=2000)
    err_euler = (euler_sampler(model, z, y, num_steps=10) - exact).abs().max()
    err_heun = (euler_sampler(model, z, y, num_steps=10, heun=True) - exact).abs().max()
    assert err_heun < err_euler / 3  # the last step stays Euler (no correction), as the authors do


def test_ode_flow_map_closed_form():
    # mu = 0, s = 1: x_t ~ N(0, var_t) with var_t = (1-t)^2 + t^2, and the flow is x_t = sqrt(var_t) e,
    # so integrating from t = 1 (var 1) to t = 0 (var 1) returns the noise itself.
    model = GaussianVelocity([0.0], 1.0)
    z = draw(8)
    x = euler_sampler(model, z, torch.zeros(8, dtype=torch.long), num_steps=50, heun=True)
    torch.testing.assert_close(x, z.double(), rtol=0, atol=1e-3)
    x = euler_sampler(model, z, torch.zeros(8, dtype=torch.long), num_steps=50)
    assert 1e-3 < (x - z.double()).abs().max() < 0.1  # Euler is first order: visibly worse


def test_score_from_velocity_linear_closed_form():
    v, x, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), 0.3
    torch.testing.assert_close(score_from_velocity(v, x, t), ((t - 1) * v - x) / t)


def test_sde_steps_and_final_noise_free_step():
    model = GaussianVelocity([0.0], 1.0)
    z = draw(4)
    noise = torch.zeros(9, 4, 1, 2, 2)
    euler_maruyama_sampler(model, z, torch.zeros(4, dtype=torch.long), num_steps=10, noise=noise)
    times = [c[1] for c in model.calls]
    expect = torch.linspace(1, 0.04, 10).tolist()
    assert times == pytest.approx(expect, abs=1e-7)  # 9 noisy steps + the drift-only step from 0.04
    # Given noise is used: a callable and a tensor of the same values agree; different noise differs.
    noise = torch.randn(9, 4, 1, 2, 2)
    a = euler_maruyama_sampler(model, z, torch.zeros(4, dtype=torch.long), num_steps=10, noise=noise)
    b = euler_maruyama_sampler(model, z, torch.zeros(4, dtype=torch.long), num_steps=10, noise=lambda i: noise[i])
    c = euler_maruyama_sampler(model, z, torch.zeros(4, dtype=torch.long), num_steps=10, noise=-noise)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_cfg_scale_one_equals_no_cfg_and_never_calls_null():
    model = GaussianVelocity([1.0, -1.0], 0.5)
    z, y = draw(6), torch.tensor([0, 1, 0, 1, 0, 1])
    plain = euler_sampler(model, z, y, num_steps=10, cfg_scale=1.0)
    assert all(n == 6 for n, _, _ in model.calls)
    near = euler_sampler(model, z, y, num_steps=10, cfg_scale=1.0 + 1e-9)
    torch.testing.assert_close(plain, near, rtol=1e-6, atol=1e-6)


def test_cfg_combination_and_null_label_only_inside_interval():
    model = GaussianVelocity([2.0, -1.0], 0.5)
    z, y = draw(4), torch.tensor([0, 1, 1, 0])
    model.calls.clear()
    euler_sampler(model, z, y, num_steps=10, cfg_scale=4.0, guidance_low=0.3, guidance_high=0.65)
    for n, t, labels in model.calls:
        inside = 0.3 <= t <= 0.65
        assert n == (8 if inside else 4), (t, n)
        if inside:
            assert torch.equal(labels[4:], torch.full((4,), 2))  # null label = num_classes
    assert sum(n == 8 for n, _, _ in model.calls) == 4  # t = 0.6, 0.5, 0.4, 0.3

    # One guided Euler step equals u + s (c - u) by hand.
    model.calls.clear()
    x1 = euler_sampler(model, z, y, num_steps=1, cfg_scale=3.0)
    with torch.no_grad():
        t1 = torch.ones(4)
        c = model(z, t1, y)[0].double()
        u = model(z, t1, torch.full_like(y, 2))[0].double()
    torch.testing.assert_close(x1, z.double() - (u + 3.0 * (c - u)))

    # SDE: CFG on the drift, same interval rule.
    model.calls.clear()
    euler_maruyama_sampler(model, z, y, num_steps=10, cfg_scale=2.0, guidance_low=0.0, guidance_high=0.5)
    assert [n for n, _, _ in model.calls] == [8 if t <= 0.5 else 4 for _, t, _ in model.calls]


def test_explicit_null_label_overrides_the_model():
    model = GaussianVelocity([2.0, -1.0], 0.5)
    model.calls.clear()
    euler_sampler(model, draw(2), torch.tensor([0, 1]), num_steps=1, cfg_scale=2.0, null_label=0)
    assert torch.equal(model.calls[0][2], torch.tensor([0, 1, 0, 0]))
    assert math.isfinite(model.calls[0][1])
