"""The adaptive ODE solver (--solver dopri5, torchdiffeq): the exact flow map of a Gaussian, one
solve per sample whatever the batch, NFE counted and stored, guidance inside it, and Euler/Heun
left as they were."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchdiffeq import odeint

import generate
from samplers import Dopri5Failed, dopri5_sampler, euler_sampler
from sampling.identity import PIXEL_SETTINGS, identity_key
from sampling.npz import png_path
from test_generate import files, load, pixel_args, run_inprocess  # noqa: F401  (files: the fixture)
from test_samplers import GaussianVelocity, draw

pytestmark = pytest.mark.usefixtures("one_thread")

MU, S = [1.5, -2.0], 0.5


class RowRecorder(GaussianVelocity):
    """GaussianVelocity that also records every row's time and label, and may fail on a call."""

    def __init__(self, mu, s, fail_at=None):
        super().__init__(mu, s)
        self.rows, self.fail_at = [], fail_at

    def forward(self, x, t, y):
        if self.fail_at is not None and len(self.rows) == self.fail_at:
            raise RuntimeError("model failed")
        self.rows.append((t.double().clone(), y.clone()))
        return super().forward(x, t, y)


def exact_flow_map(z, y, mu=MU, s=S):
    """Data x0 ~ N(mu_y, s^2) per dimension, x_t = (1 - t) x0 + t e: x_t ~ N((1 - t) mu, var_t) with
    var_t = (1 - t)^2 s^2 + t^2, and the ODE of v = E[e - x0 | x_t] moves x_t = (1 - t) mu + sqrt(var_t) z.
    From t = 1 (var 1: the noise z) to t = 0: x_0 = mu_y + s z, affine in z."""
    return torch.tensor(mu, dtype=torch.float64)[y].view(-1, 1, 1, 1) + s * z.double()


def test_dopri5_hits_the_exact_flow_map_and_euler_does_not():
    z, y = draw(32).double(), torch.arange(32) % 2  # float64 latents: the model computes in float64 too
    exact = exact_flow_map(z, y)
    tol = 1e-7
    x, nfe, guided = dopri5_sampler(GaussianVelocity(MU, S), z, y, atol=tol, rtol=tol)
    # Bound: each accepted step keeps its local error below 1 in the RMS norm of error / (atol + rtol |x|),
    # so the global error is at most (steps) x (atol + rtol max|x|) times how much the flow stretches an
    # error on its way to t = 0: sqrt(var_0 / var_t) <= s / min_t sqrt(var_t) = 0.5 / sqrt(0.2) < 1.2.
    # dopri5 spends 2 evaluations choosing its first step and 6 per step (nfe - 2) / 6 >= accepted steps.
    steps = (nfe.double() - 2) / 6
    scale = tol + tol * exact.abs().amax(dim=(1, 2, 3))
    rms = (x - exact).pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert (rms <= 1.2 * steps * scale).all(), (rms.max(), (1.2 * steps * scale).min())
    assert (x - exact).abs().max() < 1e-5  # measured 3e-7
    assert guided.sum() == 0 and (nfe > 0).all()

    # At the defaults (atol 1e-6, rtol 1e-3) it is looser: measured 0.017 in 24 evaluations, against
    # Euler's 0.05 in 50.
    x_default, nfe_default, _ = dopri5_sampler(GaussianVelocity(MU, S), z, y)
    err_default = (x_default - exact).abs().max()
    err_euler = (euler_sampler(GaussianVelocity(MU, S), z, y, num_steps=50) - exact).abs().max()
    err_tight = (x - exact).abs().max()
    assert err_euler > 0.02 and err_tight < err_euler / 1e4  # Euler: first order, 0.05 measured
    assert err_default < err_euler / 2 and nfe_default.double().mean() < 30


def test_each_sample_is_solved_alone_whatever_its_batch():
    """The lockstep batching adds nothing: a batch gives, bit for bit, what torchdiffeq gives on each
    sample alone (a row-independent model: the exact Gaussian velocity), steps and NFE included."""
    z, y = draw(6), torch.tensor([0, 1, 1, 0, 1, 0])
    kwargs = dict(cfg_scale=2.5, guidance_low=0.2, guidance_high=0.7, atol=1e-5, rtol=1e-4)
    x, nfe, guided = dopri5_sampler(GaussianVelocity(MU, S), z, y, **kwargs)
    for i in range(6):
        xi, ni, gi = dopri5_sampler(GaussianVelocity(MU, S), z[i:i + 1], y[i:i + 1], **kwargs)
        assert torch.equal(xi[0], x[i]) and ni.item() == nfe[i] and gi.item() == guided[i]
    other = dopri5_sampler(GaussianVelocity(MU, S), z[[4, 1, 2]], y[[4, 1, 2]], **kwargs)[0]
    assert torch.equal(other, x[[4, 1, 2]])

    # The slow reference: torchdiffeq called directly on one sample, the guided velocity written out.
    model = GaussianVelocity(MU, S)
    calls = []

    def velocity(t, state):
        calls.append(float(t))

        def v(label):
            return model(state[None].float(), torch.full((1,), float(t)), torch.tensor([label]))[0].double()[0]

        c = v(y[3].item())
        if 0.2 <= float(t) <= 0.7:
            u = v(2)  # the null label
            return u + 2.5 * (c - u)
        return c

    ref = odeint(velocity, z[3].double(), torch.tensor([1.0, 0.0], dtype=torch.float64), rtol=1e-4, atol=1e-5,
                 method="dopri5", options={"step_t": torch.tensor([0.0], dtype=torch.float64),
                                           "jump_t": torch.tensor([0.2, 0.7], dtype=torch.float64)})[-1]
    assert torch.equal(ref, x[3]) and len(calls) == nfe[3]
    assert min(calls) >= 0.0 and max(calls) <= 1.0  # the last step ends on t = 0 (no overshoot)


def test_nfe_counts_model_rows_and_guidance_follows_the_interval():
    model = RowRecorder(MU, S)
    z, y = draw(5).double(), torch.tensor([0, 1, 0, 1, 1])  # float64: the model sees the solver's times
    low, high = 0.3, 0.6
    x, nfe, guided = dopri5_sampler(model, z, y, cfg_scale=3.0, guidance_low=low, guidance_high=high)
    rows = [(t, label) for ts, ys in model.rows for t, label in zip(ts.tolist(), ys.tolist())]
    null = [t for t, label in rows if label == 2]
    assert null and all(low <= t <= high for t in null)  # the null label only inside the interval
    # one velocity evaluation = one row per sample, plus one null-label row when guided
    assert len(rows) == nfe.sum() + guided.sum() and len(null) == guided.sum()
    assert ((guided > 0) & (guided < nfe)).all()
    # 2 evaluations pick the first step, 6 per step tried (dopri5 reuses its last stage), and one
    # more at each end of the interval, where the solver stops and restarts on the other side
    assert ((nfe - 2 - 2) % 6 == 0).all()
    # rows strictly inside the interval were all guided: as many null rows as rows at those times
    inside = [t for t, label in rows if label != 2 and low < t < high]
    assert len(inside) == len([t for t in null if low < t < high])

    # The same guided field over all of [0, 1] (no jumps) agrees with Heun at many steps.
    model = GaussianVelocity(MU, S)
    x, nfe, _ = dopri5_sampler(model, z, y, cfg_scale=3.0, atol=1e-9, rtol=1e-9)
    ref = euler_sampler(model, z, y, num_steps=4000, heun=True, cfg_scale=3.0)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    assert ((nfe - 2) % 6 == 0).all()


def test_autoguidance_inside_dopri5():
    z, y = draw(4).double(), torch.tensor([0, 1, 1, 0])
    main, guide = GaussianVelocity(MU, S), RowRecorder(MU, 1.0)
    alone, nfe_alone, _ = dopri5_sampler(main, z, y)
    # a guide identical to the main model: v_g + w (v_m - v_g) = v_m exactly, the same solve
    same, nfe_same, guided = dopri5_sampler(main, z, y, cfg_scale=4.0, guide_model=GaussianVelocity(MU, S))
    assert torch.equal(same, alone) and torch.equal(nfe_same, nfe_alone) and torch.equal(guided, nfe_alone)
    # a bad guide (wider data): evaluated with the true labels, only inside the interval
    pushed, _, guided = dopri5_sampler(main, z, y, cfg_scale=2.0, guidance_high=0.5, guide_model=guide)
    assert all(label in (0, 1) for _, ys in guide.rows for label in ys.tolist())
    assert all(t <= 0.5 for ts, _ in guide.rows for t in ts.tolist()) and (guided > 0).all()
    # w > 1 pushes away from the guide's wider spread: samples end closer to their class mean
    mean = torch.tensor(MU, dtype=torch.float64)[y].view(-1, 1, 1, 1)
    assert (pushed - mean).abs().mean() < (alone - mean).abs().mean()


def test_failures_end_the_solve_in_one_line_without_hanging():
    z, y = draw(3), torch.tensor([0, 1, 0])
    with pytest.raises(Dopri5Failed, match=r"dopri5 gave up on a sample \(max_num_steps exceeded.*loosen --rtol"):
        dopri5_sampler(GaussianVelocity(MU, S), z, y, atol=1e-12, rtol=1e-12, max_steps=3)
    with pytest.raises(RuntimeError, match="model failed"):  # the model's own error, from the caller's thread
        dopri5_sampler(RowRecorder(MU, S, fail_at=4), z, y)


# ---- generate.py --solver dopri5 ----

def test_generate_dopri5_reports_and_stores_nfe(files, capsys):
    out = files["root"] / "dopri5"
    argv = ("--solver", "dopri5", "--cfg-scale", "2", "--guidance-low", "0.3", "--guidance-high", "0.8")
    folder = run_inprocess(pixel_args(files, out / "a", 4, *argv))
    text = capsys.readouterr().out
    assert "ode dopri5 (--atol 1e-06, --rtol 0.001)" in text and "NFE per sample: mean" in text
    images = load(folder)
    with np.load(folder + ".npz") as f:
        stored = json.loads(f["provenance"].tobytes().decode())
    on_disk = json.load(open(os.path.join(folder, "provenance.json")))
    assert stored["nfe"] == on_disk["nfe"]
    chunks = [Image.open(png_path(folder, i)).info for i in range(12)]
    counts = [(int(info["nfe"]), int(info["nfe_guided"])) for info in chunks]
    assert stored["nfe"]["mean"] == pytest.approx(np.mean([n for n, _ in counts])) and stored["nfe"]["min"] >= 8
    assert stored["nfe"]["forward_passes_mean"] == pytest.approx(np.mean([n + g for n, g in counts]))
    assert stored["settings"]["solver"] == "dopri5" and stored["settings"]["atol"] == 1e-6
    assert f"{stored['nfe']['mean']:.1f} velocity evaluations" in text or f"mean {stored['nfe']['mean']:.1f}" in text

    # one solve per sample: the same npz for another batch size (and with torch.compile, dynamic batch)
    np.testing.assert_array_equal(load(run_inprocess(pixel_args(files, out / "b", 5, *argv))), images)
    compiled = run_inprocess(pixel_args(files, out / "c", 4, *argv, "--compile", "--compile-backend", "eager"))
    np.testing.assert_array_equal(load(compiled), images)
    # tighter tolerances: more evaluations, other (nearby) pixels
    tight = run_inprocess(pixel_args(files, out / "d", 4, *argv, "--rtol", "1e-6", "--atol", "1e-8"))
    assert json.load(open(os.path.join(tight, "provenance.json")))["nfe"]["mean"] > stored["nfe"]["mean"]
    assert np.abs(load(tight).astype(int) - images).max() < 30

    # complete: detected as such (the measured NFE is not part of the identity key)
    run_inprocess(pixel_args(files, out / "a", 4, *argv))
    assert "already holds all 12 samples" in capsys.readouterr().out
    # Euler in the same folder is another sample set
    with pytest.raises(generate.GenerateError, match="solver None there, dopri5 now|solver dopri5 there, None now"):
        run_inprocess(pixel_args(files, out / "a", 4, "--cfg-scale", "2", "--guidance-low", "0.3",
                                 "--guidance-high", "0.8"))


def test_euler_and_heun_identities_and_images_are_unchanged(files):
    out = files["root"] / "fixed"
    euler = run_inprocess(pixel_args(files, out / "euler", 4, "--cfg-scale", "2"))
    named = run_inprocess(pixel_args(files, out / "named", 4, "--cfg-scale", "2", "--solver", "euler"))
    np.testing.assert_array_equal(load(named), load(euler))
    heun = run_inprocess(pixel_args(files, out / "heun", 4, "--cfg-scale", "2", "--heun"))
    named = run_inprocess(pixel_args(files, out / "named-heun", 4, "--cfg-scale", "2", "--solver", "heun"))
    np.testing.assert_array_equal(load(named), load(heun))
    for folder in (euler, heun, named):
        identity = json.load(open(os.path.join(folder, "provenance.json")))
        assert tuple(identity["settings"]) == PIXEL_SETTINGS and "nfe" not in identity and "guide" not in identity
        assert Image.open(png_path(folder, 0)).info.get("nfe") is None  # no text chunks: the PNG bytes as before
    assert identity_key(json.load(open(os.path.join(named, "provenance.json")))) == \
        identity_key(json.load(open(os.path.join(heun, "provenance.json"))))
    assert os.path.basename(named) == os.path.basename(heun)
