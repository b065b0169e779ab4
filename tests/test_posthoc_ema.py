"""Post-hoc EMA (posthoc_ema.py): profile length algebra, the tracked EMA against its closed-form
weights, reconstruction of tracked and untracked lengths, exact resume, and the CLI checkpoint."""
import argparse
import io
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import posthoc_ema as pe
from models.checkpoint import extract_state_dict, load_checkpoint_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(6, 5), (5,), (3, 2, 2)]


def random_params(generator, shapes=SHAPES):
    return [torch.randn(shape, generator=generator) for shape in shapes]


def reference_weights(step, gamma):
    """Slow reference: step s gets the power-function mass int_{s-1}^{s} tau^gamma dtau, normalised."""
    raw = [((s / step) ** (gamma + 1) - ((s - 1) / step) ** (gamma + 1)) for s in range(1, step + 1)]
    total = math.fsum(raw)
    return [r / total for r in raw]


# ------------------------------------------------------------------ sigma_rel <-> gamma

def test_sigma_rel_gamma_closed_form_and_edm2_pairs():
    # EDM2's tracked lengths: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> gamma 6.94
    assert pe.sigma_rel_to_gamma(0.05) == pytest.approx(16.97219860, abs=1e-7)
    assert pe.sigma_rel_to_gamma(0.10) == pytest.approx(6.93720394, abs=1e-7)
    for sigma in (0.001, 0.01, 0.05, 0.07, 0.10, 0.2, 0.28):
        g = pe.sigma_rel_to_gamma(sigma)
        # the defining cubic sigma^2 (g+2)^2 (g+3) = g+1 holds to rounding
        assert abs(sigma ** 2 * (g + 2) ** 2 * (g + 3) - (g + 1)) < 1e-12 * (g + 1)
        assert pe.gamma_to_sigma_rel(g) == pytest.approx(sigma, rel=1e-13)
    for g in (0.0, 0.3, 1.0, 6.94, 16.97, 100.0, 1e4):
        assert pe.sigma_rel_to_gamma(pe.gamma_to_sigma_rel(g)) == pytest.approx(g, rel=1e-12, abs=1e-12)
    assert pe.gamma_to_sigma_rel(0.0) == pytest.approx(1 / math.sqrt(12), rel=1e-15)  # uniform average
    # the formula is the std of the density (g+1) x^g on [0, 1], integrated numerically
    x = np.linspace(0.0, 1.0, 2_000_001)
    for g in (0.5, 6.94, 16.97):
        density = (g + 1) * x ** g
        mean = np.trapezoid(x * density, x)
        std = math.sqrt(np.trapezoid((x - mean) ** 2 * density, x))
        assert std == pytest.approx(pe.gamma_to_sigma_rel(g), rel=1e-6)
    for bad in (0.0, -0.1, 0.29, float("nan")):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            pe.sigma_rel_to_gamma(bad)


def test_power_ema_beta():
    assert pe.power_ema_beta(1, 6.94) == 0.0  # the first update copies the parameters
    assert pe.power_ema_beta(10, 2.0) == pytest.approx(0.9 ** 3, rel=1e-15)
    assert pe.power_ema_beta(10, 2.0, delta=4) == pytest.approx(0.6 ** 3, rel=1e-15)
    with pytest.raises(ValueError):
        pe.power_ema_beta(3, 1.0, delta=4)


# ------------------------------------------------------------------ tracking

def test_tracked_ema_equals_power_function_weighting_of_history():
    generator = torch.Generator().manual_seed(0)
    history = [random_params(generator) for _ in range(300)]
    tracker = pe.PowerFunctionEMA(history[0], sigma_rels=(0.05, 0.10, 0.2))
    worst = 0.0
    for step, params in enumerate(history, start=1):
        tracker.update(params, step)
        if step in (1, 2, 7, 100, 300):
            for gamma, ema in zip(tracker.gammas, tracker.ema):
                weights = reference_weights(step, gamma)
                assert np.allclose(pe.step_weights(step, gamma, step), weights, rtol=0, atol=1e-15)
                for i, tensor in enumerate(ema):
                    expected = sum(w * history[s][i].double() for s, w in enumerate(weights))
                    worst = max(worst, (tensor.double() - expected).abs().max().item())
    assert worst < 5e-7, worst  # fp32 lerps against a float64 sum over the history


def test_update_rejects_out_of_order_steps_and_skips_are_exact():
    generator = torch.Generator().manual_seed(1)
    params = random_params(generator)
    tracker = pe.PowerFunctionEMA(params)
    tracker.update(params, 1)
    with pytest.raises(ValueError, match="already holds step 1"):
        tracker.update(params, 1)
    # an update after a gap of k steps equals k updates with unchanged parameters
    a, b = pe.PowerFunctionEMA(params), pe.PowerFunctionEMA(params)
    for step in range(1, 6):
        params = random_params(generator)
        a.update(params, step)
        b.update(params, step)
    newer = random_params(generator)
    for step in range(6, 10):
        a.update(newer, step)
    b.update(newer, 9)
    for ea, eb in zip(a.ema, b.ema):
        assert all(torch.allclose(x, y, rtol=0, atol=1e-6) for x, y in zip(ea, eb))


def test_resume_is_bitwise_equal_to_unbroken():
    generator = torch.Generator().manual_seed(2)
    history = [random_params(generator) for _ in range(40)]
    unbroken = pe.PowerFunctionEMA(history[0])
    for step, params in enumerate(history, start=1):
        unbroken.update(params, step)

    first = pe.PowerFunctionEMA(history[0])
    for step, params in enumerate(history[:17], start=1):
        first.update(params, step)
    buffer = io.BytesIO()
    torch.save({"posthoc_ema": first.state_dict()}, buffer)
    del first
    buffer.seek(0)
    resumed = pe.PowerFunctionEMA(random_params(generator))  # a fresh run's start, then the checkpoint
    resumed.load_state_dict(torch.load(buffer, weights_only=True)["posthoc_ema"])
    assert resumed.step == 17
    for step, params in enumerate(history[17:], start=18):
        resumed.update(params, step)
    for e_resumed, e_unbroken in zip(resumed.ema, unbroken.ema):
        assert all(torch.equal(x, y) for x, y in zip(e_resumed, e_unbroken))

    with pytest.raises(ValueError, match="sigma_rels"):
        pe.PowerFunctionEMA(history[0], sigma_rels=(0.05, 0.2)).load_state_dict(unbroken.state_dict())
    with pytest.raises(ValueError, match="other tensors"):
        pe.PowerFunctionEMA(history[0][:2]).load_state_dict(unbroken.state_dict())


# ------------------------------------------------------------------ reconstruction

def test_profile_inner_products_match_numerical_integration():
    steps, gammas = [30.0, 50.0, 50.0], [2.5, 7.0, 0.0]
    closed = pe.profile_inner_products(steps, gammas, steps, gammas)
    tau = np.linspace(0.0, 50.0, 4_000_001)
    profiles = [np.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), 0.0) for t, g in zip(steps, gammas)]
    for i in range(3):
        for j in range(3):
            numeric = np.trapezoid(profiles[i] * profiles[j], tau)
            assert closed[i, j] == pytest.approx(numeric, rel=2e-5)
    # the ratio form does not overflow for long runs and large exponents
    far = pe.profile_inner_products([4e5, 4e5], [16.97, 500.0], [1e5], [500.0])
    assert np.all(np.isfinite(far))


def write_run(exp_dir, num_steps, every, seed, shapes=SHAPES, extra_trackers=()):
    """Track (0.05, 0.10) on a random walk of parameters and write snapshots every ``every`` steps."""
    generator = torch.Generator().manual_seed(seed)
    params = random_params(generator, shapes)
    tracker = pe.PowerFunctionEMA(params)
    names = [f"p{i}" for i in range(len(shapes))]
    for step in range(1, num_steps + 1):
        params = [p + 0.1 * torch.randn(p.shape, generator=generator) for p in params]
        tracker.update(params, step)
        for other in extra_trackers:
            other.update(params, step)
        if step % every == 0:
            path = pe.save_snapshot(exp_dir, step, names, tracker, extra={"samples_seen": step * 4})
            assert path == os.path.join(exp_dir, "posthoc-ema", f"{step:07d}.pt")
    return tracker, names


def test_reconstructing_a_tracked_profile_gives_its_weights(tmp_path):
    tracker, names = write_run(str(tmp_path), 200, 20, seed=3)
    paths = [p for _, p in pe.list_step_files(os.path.join(tmp_path, "posthoc-ema"))]
    assert len(paths) == 10
    snapshot = load_checkpoint_file(paths[-1])
    assert snapshot["step"] == 200 and snapshot["sigma_rels"] == [0.05, 0.10]
    assert snapshot["source"] == {"samples_seen": 800} and list(snapshot["ema"][0]) == names

    for target_step, k in ((200, 0), (200, 1), (100, 1)):
        sigma = tracker.sigma_rels[k]
        state, plan = pe.reconstruct(paths, sigma, target_step=target_step, return_plan=True)
        assert plan["fit_errors"][0] < 1e-6
        assert all(c[1] <= target_step for c in plan["columns"])
        x = plan["weights"][:, 0]
        # the per-step weights of the combination are the tracked profile's closed-form weights
        combined = sum(w * pe.step_weights(c[1], c[3], 200) for w, c in zip(x, plan["columns"]))
        expected = pe.step_weights(target_step, pe.sigma_rel_to_gamma(sigma), 200)
        assert np.abs(combined - expected).max() < 1e-9
        # and the reconstructed weights are the snapshot's own to rounding
        own = load_checkpoint_file(pe.snapshot_path(str(tmp_path), target_step))["ema"][k]
        for name in names:
            assert torch.allclose(state[name], own[name], rtol=0, atol=1e-6)
    # errors a user can cause are one line naming the fix
    with pytest.raises(pe.PosthocEMAError, match="not a snapshot step; available: 20, 40"):
        pe.reconstruct(paths, 0.07, target_step=130)
    with pytest.raises(pe.PosthocEMAError, match="--sigma-rel"):
        pe.reconstruct(paths, 0.5)


def test_intermediate_length_beats_both_tracked_on_toy_problem(tmp_path):
    """Noisy SGD on a quadratic whose optimum drifts linearly: theta_t = theta_{t-1} + eta (opt_t -
    theta_{t-1}) + eta * noise * xi_t with opt_t = v t / T, v = +-1 per coordinate. A long EMA
    averages the noise away but lags the drift; the error to opt_T is (mean bias)^2 + variance,
    both in closed form for any per-step weights, minimised near sigma_rel 0.07 for these values,
    strictly between EDM2's tracked 0.05 and 0.10."""
    num_steps, eta, noise, every = 2000, 0.1, 2.0, 100
    shapes = [(64, 128), (4096,), (32, 128)]
    dims = sum(math.prod(s) for s in shapes)

    # closed-form expected squared error per coordinate for per-step weights w
    mean = np.zeros(num_steps + 1)
    var = np.zeros(num_steps + 1)
    for t in range(1, num_steps + 1):
        mean[t] = mean[t - 1] + eta * (t / num_steps - mean[t - 1])
        var[t] = (1 - eta) ** 2 * var[t - 1] + (eta * noise) ** 2
    s = np.arange(1, num_steps + 1)
    cov = var[np.minimum.outer(s, s)] * (1 - eta) ** np.abs(np.subtract.outer(s, s))

    def expected_error(w):
        return (w @ mean[1:] - 1.0) ** 2 + w @ cov @ w

    grid = np.round(np.arange(0.03, 0.1501, 0.005), 3)
    curve = [expected_error(pe.step_weights(num_steps, pe.sigma_rel_to_gamma(g), num_steps)) for g in grid]
    best = float(grid[int(np.argmin(curve))])
    assert 0.06 <= best <= 0.08, best

    # the simulated run: tracked 0.05/0.10 with snapshots, and a directly tracked best length to compare
    generator = torch.Generator().manual_seed(4)
    direction = [torch.randint(0, 2, shape, generator=generator).float() * 2 - 1 for shape in shapes]
    theta = [torch.zeros(shape) for shape in shapes]
    tracker = pe.PowerFunctionEMA(theta)
    direct = pe.PowerFunctionEMA(theta, sigma_rels=(best,))
    names = [f"w{i}" for i in range(len(shapes))]
    for step in range(1, num_steps + 1):
        theta = [th + eta * (d * step / num_steps - th) + eta * noise * torch.randn(th.shape, generator=generator)
                 for th, d in zip(theta, direction)]
        tracker.update(theta, step)
        direct.update(theta, step)
        if step % every == 0:
            pe.save_snapshot(str(tmp_path), step, names, tracker)

    def error(tensors):
        return sum(((t.double() - d.double()) ** 2).sum().item() for t, d in zip(tensors, direction)) / dims

    paths = [p for _, p in pe.list_step_files(os.path.join(tmp_path, "posthoc-ema"))]
    state, plan = pe.reconstruct(paths, best, return_plan=True)
    errors = {"0.05 tracked": error(tracker.ema[0]), "0.10 tracked": error(tracker.ema[1]),
              f"{best} reconstructed": error([state[n] for n in names]), f"{best} tracked": error(direct.ema[0])}
    expected = {"0.05": expected_error(pe.step_weights(num_steps, tracker.gammas[0], num_steps)),
                "0.10": expected_error(pe.step_weights(num_steps, tracker.gammas[1], num_steps)),
                str(best): min(curve)}
    print(f"\ntoy problem: best sigma_rel {best}; measured {errors}; expected {expected}; "
          f"fit error {plan['fit_errors'][0]:.2e}")
    reconstructed = errors[f"{best} reconstructed"]
    assert reconstructed < 0.95 * min(errors["0.05 tracked"], errors["0.10 tracked"])
    assert reconstructed == pytest.approx(errors[f"{best} tracked"], rel=0.01)
    assert reconstructed == pytest.approx(expected[str(best)], rel=0.05)
    assert plan["fit_errors"][0] < 0.01


# ------------------------------------------------------------------ CLI

class TinyNet(torch.nn.Module):
    """Parameters and BatchNorm buffers (the buffers are not tracked and come from the template)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.norm = torch.nn.BatchNorm1d(16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)).relu())


def test_cli_writes_generate_checkpoint_from_template(tmp_path, capsys):
    exp = str(tmp_path / "exp")
    torch.manual_seed(5)
    model = TinyNet()
    with torch.no_grad():
        model.norm.running_mean.normal_()
    names = [n for n, _ in model.named_parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    tracker = pe.PowerFunctionEMA(model.parameters())
    for step in range(1, 41):
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        tracker.update(model.parameters(), step)
        if step % 10 == 0:
            pe.save_snapshot(exp, step, names, tracker)
    template = {"model": model.state_dict(), "ema": model.state_dict(), "opt": optimizer.state_dict(),
                "args": argparse.Namespace(model="tiny", learning_rate=1e-3), "steps": 40, "epoch": 0,
                "scaler": None, "data": {"samples_seen": 160}}
    os.makedirs(os.path.join(exp, "checkpoints"))
    torch.save(template, os.path.join(exp, "checkpoints", "0000040.pt"))

    out = str(tmp_path / "phema-{sigma_rel}.pt")
    pe.main(["--exp-dir", exp, "--sigma-rel", "0.07,0.05", "--out", out])
    assert "4 snapshots up to step 40" in capsys.readouterr().out
    paths = [p for _, p in pe.list_step_files(os.path.join(exp, "posthoc-ema"))]
    for sigma, tracked in ((0.07, None), (0.05, tracker.ema[0])):
        written = load_checkpoint_file(out.format(sigma_rel=sigma))
        assert set(written) == (set(template) - {"opt", "scaler"}) | {"posthoc_ema", "integrity"}  # sealed
        assert written["args"] == template["args"] and written["steps"] == 40 and written["data"] == template["data"]
        assert list(written["ema"]) == list(template["ema"])  # same keys in the same order
        expected = pe.reconstruct(paths, sigma)
        for name, value in written["ema"].items():
            if name in expected:
                assert torch.equal(value, expected[name]), name
            else:  # buffers come from the template
                assert torch.equal(value, template["ema"][name]), name
        assert all(torch.equal(written["model"][k], v) for k, v in template["model"].items())
        if tracked is not None:  # a tracked length reproduces the tracked EMA
            assert all(torch.allclose(written["ema"][n], t, rtol=0, atol=1e-6) for n, t in zip(names, tracked))
        record = written["posthoc_ema"]
        assert record["sigma_rel"] == sigma and record["step"] == 40
        assert record["snapshots"] == ["0000010.pt", "0000020.pt", "0000030.pt", "0000040.pt"]
        assert np.asarray(record["weights"]).shape == (4, 2)
        assert sum(map(sum, record["weights"])) == pytest.approx(1.0, abs=1e-9)
        assert record["kept_from_template"] == ["norm.num_batches_tracked", "norm.running_mean", "norm.running_var"]
        # what generate.py does with it: extract "ema" and load it into the model by name
        TinyNet().load_state_dict(extract_state_dict(written, "ema"), strict=True)

    # --step picks an earlier snapshot; an explicit --template is used as given
    pe.main(["--exp-dir", exp, "--sigma-rel", "0.1", "--step", "20", "--out", str(tmp_path / "s20.pt"),
             "--template", os.path.join(exp, "checkpoints", "0000040.pt")])
    written = load_checkpoint_file(str(tmp_path / "s20.pt"))
    snapshot = load_checkpoint_file(os.path.join(exp, "posthoc-ema", "0000020.pt"))
    assert written["posthoc_ema"]["snapshots"] == ["0000010.pt", "0000020.pt"]
    assert all(torch.allclose(written["ema"][n], snapshot["ema"][1][n], rtol=0, atol=1e-6) for n in names)

    # user errors: one line naming the flag
    with pytest.raises(pe.PosthocEMAError, match=r"one file for 2 --sigma-rel values"):
        pe.main(["--exp-dir", exp, "--sigma-rel", "0.07", "0.08", "--out", str(tmp_path / "x.pt")])
    other = {**template, "ema": {"fc1.weight": torch.zeros(3, 3)}}
    torch.save(other, str(tmp_path / "other.pt"))
    with pytest.raises(pe.PosthocEMAError, match="not from the run"):
        pe.main(["--exp-dir", exp, "--sigma-rel", "0.07", "--template", str(tmp_path / "other.pt"),
                 "--out", str(tmp_path / "x.pt")])
    assert not os.path.exists(tmp_path / "x.pt")


def test_cli_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "posthoc_ema.py"), "--exp-dir", str(tmp_path),
                             "--sigma-rel", "0.07"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("posthoc_ema.py: error: no post-hoc EMA")


def test_generate_samples_from_the_reconstruction(tmp_path):
    """A tiny SiT's run: generate.py reads the tool's checkpoint and samples from its "ema" (the
    images equal those of a checkpoint holding the reconstruction by hand, not the template's)."""
    import generate
    from models import SiT

    kwargs = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                  num_classes=4, encoder_depth=1)
    exp = str(tmp_path / "exp")
    torch.manual_seed(6)
    model = SiT(**kwargs)
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    tracker = pe.PowerFunctionEMA(params)
    with torch.no_grad():
        for step in range(1, 31):  # a parameter random walk standing in for training
            for p in params:
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
            tracker.update(params, step)
            if step % 10 == 0:
                pe.save_snapshot(exp, step, names, tracker)
    template = {"model": model.state_dict(), "ema": model.state_dict(), "opt": {},
                "args": argparse.Namespace(model_kwargs=dict(kwargs)), "steps": 30}
    torch.save(template, os.path.join(tmp_path, "template.pt"))
    out = str(tmp_path / "phema.pt")
    pe.main(["--exp-dir", exp, "--sigma-rel", "0.08", "--template", str(tmp_path / "template.pt"), "--out", out])
    by_hand = {**template, "ema": {**template["ema"], **pe.reconstruct(
        [p for _, p in pe.list_step_files(os.path.join(exp, "posthoc-ema"))], 0.08)}}
    torch.save(by_hand, str(tmp_path / "by_hand.pt"))

    def sample(ckpt):
        argv = ["--ckpt", ckpt, "--vae", "none", "--resolution", "8", "--num-fid-samples", "4",
                "--per-proc-batch-size", "4", "--sample_dir", str(tmp_path / ("samples-" + os.path.basename(ckpt))),
                "--mode", "ode", "--num-steps", "3", "--cfg-scale", "1", "--device", "cpu"]
        folder = generate.main(generate.parse_args(argv))
        with np.load(folder + ".npz") as f:
            return f["arr_0"]

    images = sample(out)
    assert images.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(images, sample(str(tmp_path / "by_hand.pt")))
    assert np.abs(images.astype(int) - sample(str(tmp_path / "template.pt"))).max() > 0
