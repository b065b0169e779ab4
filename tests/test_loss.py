"""Flow-matching + probe loss: interpolants, time sampling, time-bin weights, vs a slow loop."""
import math

import pytest
import torch
import torch.nn.functional as F

from loss import LSEP_Loss, LSEPLoss, interpolant, sample_time, time_bin_weights


def test_interpolants_closed_form():
    t = torch.tensor([0.0, 0.25, 1.0])
    a, s, da, ds = interpolant(t, "linear")
    torch.testing.assert_close(a, 1 - t)
    torch.testing.assert_close(s, t)
    torch.testing.assert_close(da, -torch.ones(3))
    torch.testing.assert_close(ds, torch.ones(3))
    a, s, da, ds = interpolant(t, "cosine")
    torch.testing.assert_close(a, torch.tensor([1.0, math.cos(math.pi / 8), 0.0]), atol=1e-7, rtol=0)
    torch.testing.assert_close(s, torch.tensor([0.0, math.sin(math.pi / 8), 1.0]), atol=1e-7, rtol=0)
    # derivatives by finite differences
    h = 1e-3
    t64 = torch.tensor([0.3], dtype=torch.float64)
    for path in ("linear", "cosine"):
        up, down = interpolant(t64 + h, path), interpolant(t64 - h, path)
        mid = interpolant(t64, path)
        for k in (0, 1):
            torch.testing.assert_close((up[k] - down[k]) / (2 * h), mid[k + 2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="--path-type"):
        interpolant(t, "edm")


def test_time_sampling_distributions():
    torch.manual_seed(0)
    u = sample_time(100_000, "uniform")
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    lin = sample_time(100_000, "lognormal", "linear")
    # t = sigma / (1 + sigma) with log sigma ~ N(0, 1): median at sigma = 1 -> t = 0.5
    assert abs(lin.median().item() - 0.5) < 0.01
    cos = sample_time(100_000, "lognormal", "cosine")
    assert abs(cos.median().item() - 0.5) < 0.01  # 2/pi atan(1) = 0.5
    assert abs((cos < 2 / math.pi * math.atan(math.exp(-1))).float().mean().item() - 0.1587) < 0.01


def test_steps_weights_hand_computed():
    # 4 bins of [0, 1]: weights linspace(0.1, 0.4, 4) = 0.1, 0.2, 0.3, 0.4; t = 1 falls in the last bin.
    t = torch.tensor([0.0, 0.2499, 0.25, 0.5, 0.74, 0.75, 0.999, 1.0])
    w = time_bin_weights(t, 0.1, 0.4, 4)
    torch.testing.assert_close(w, torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3, 0.4, 0.4, 0.4]))
    # The released schedule: 10 bins 0.0225 -> 0.03.
    w = time_bin_weights(torch.tensor([0.05, 0.95, 1.0]), 0.0225, 0.03, 10)
    torch.testing.assert_close(w, torch.tensor([0.0225, 0.03, 0.03]))


class ProbeModel(torch.nn.Module):
    """Returns a fixed velocity map of the input and logits from a linear map, records inputs."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(12, 3)

    def forward(self, x, t, y):
        self.seen = (x.clone(), t.clone())
        return 0.5 * x, self.lin(x.flatten(1)) * (1 + t[:, None])


def slow_reference(loss_fn, model, x, y, t, noise):
    """The authors' loop: per-bin masks, per-sample CE, weighted sum / count."""
    a, s, da, ds = (v.view(-1, 1, 1, 1) for v in interpolant(t, loss_fn.path_type))
    xt = a * x + s * noise
    out, logits = model(xt, t, y)
    den = ((out - (da * x + ds * noise)) ** 2).mean(dim=(1, 2, 3))
    if loss_fn.weights_type == "constant":
        return den, loss_fn.weight_class * F.cross_entropy(logits, y)
    n = loss_fn.n_weights
    weights = torch.linspace(loss_fn.weight_start, loss_fn.weight_end, n)
    total, count = 0.0, 0
    for i in range(n):
        mask = (t >= i / n) & (t < (i + 1) / n) if i < n - 1 else (t >= i / n)
        if mask.any():
            total = total + (weights[i] * F.cross_entropy(logits[mask], y[mask], reduction="none")).sum()
            count += int(mask.sum())
    return den, total / count


@pytest.mark.parametrize("weights_type", ["constant", "steps"])
@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("weighting", ["uniform", "lognormal"])
def test_loss_equals_slow_reference(weights_type, path_type, weighting):
    torch.manual_seed(0)
    model = ProbeModel()
    x = torch.randn(64, 3, 2, 2)
    y = torch.randint(0, 3, (64,))
    loss_fn = LSEPLoss(path_type=path_type, weighting=weighting, weights_type=weights_type,
                       weight_class=0.05, weight_start=0.01, weight_end=0.05, n_weights=5)
    torch.manual_seed(7)
    den, probe, acc, _ = loss_fn(model, x, dict(y=y))
    # Re-draw the same time and noise as the loss did.
    torch.manual_seed(7)
    t = sample_time(64, weighting, path_type)
    noise = torch.randn_like(x)
    ref_den, ref_probe = slow_reference(loss_fn, model, x, y, t, noise)
    torch.testing.assert_close(den, ref_den)
    torch.testing.assert_close(probe, ref_probe)
    _, logits = model(*model.seen, y)
    torch.testing.assert_close(acc, (logits.argmax(1) == y).float().mean())


def test_authors_constructor_and_no_probe_model():
    fn = LSEP_Loss(prediction="v", path_type="linear", weighting="uniform", multi_weights=[0.0225, 0.03, 10, "steps"])
    assert (fn.weight_start, fn.weight_end, fn.n_weights, fn.weights_type) == (0.0225, 0.03, 10, "steps")

    def no_probe(x, t, y):
        return torch.zeros_like(x), None
    den, probe, acc, _ = fn(no_probe, torch.ones(4, 1, 2, 2), dict(y=torch.zeros(4, dtype=torch.long)))
    # v-target of the linear path is e - x; the zero prediction's loss is E[(e - 1)^2] per sample.
    assert den.shape == (4,) and probe.item() == 0 and acc.item() == 0
    with pytest.raises(ValueError, match="--weights-type"):
        LSEPLoss(weights_type="cosine")
    with pytest.raises(ValueError, match="--prediction"):
        LSEPLoss(prediction="eps")


def test_loss_at_known_time_is_exact():
    """t forced to 1 (lognormal sigma -> inf is not reachable, so patch the sampler): x_t = e, v = e - x."""
    x = torch.full((2, 1, 1, 1), 3.0)
    loss_fn = LSEPLoss()

    def model(xt, t, y):
        model.t = t
        return xt, None  # predicts v = x_t
    torch.manual_seed(0)
    den = loss_fn(model, x, dict(y=torch.zeros(2, dtype=torch.long))).denoising
    t = model.t.view(-1)
    torch.manual_seed(0)
    torch.rand(2)
    e = torch.randn(2)
    xt = (1 - t) * 3 + t * e
    torch.testing.assert_close(den, (xt - (e - 3)) ** 2)
