"""Autoguidance (--guide-ckpt): v = v_guide + w (v_main - v_guide) with the true labels inside the
guidance interval; w = 1 or an identical guide give the main model bit for bit; CFG unchanged;
the guide is checked against the main model and is part of the sample set's identity."""
import argparse
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

import generate
from models import SiT
from models.checkpoint import atomic_save, load_model
from models.vae import pixels_to_uint8
from samplers import euler_maruyama_sampler, euler_sampler, score_from_velocity
from sampling.errors import GenerateError
from sampling.identity import identity_differences, identity_key
from sampling.seeds import sample_labels, sample_noise
from test_generate import (PIXEL_KWARGS, files, load, pixel_args, run_inprocess,  # noqa: F401  (files: fixture)
                           run_subprocess)
from test_samplers import GaussianVelocity, draw

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the samplers ----

def test_one_guided_euler_step_by_hand_with_the_true_labels():
    main, guide = GaussianVelocity([2.0, -1.0], 0.5), GaussianVelocity([1.0, 0.0], 1.0)
    z, y = draw(4), torch.tensor([0, 1, 1, 0])
    x1 = euler_sampler(main, z, y, num_steps=1, cfg_scale=3.0, guide_model=guide)
    with torch.no_grad():
        v_m = main(z, torch.ones(4), y)[0].double()
        v_g = guide(z, torch.ones(4), y)[0].double()
    torch.testing.assert_close(x1, z.double() - (v_g + 3.0 * (v_m - v_g)), rtol=0, atol=0)
    # both models see the batch once (no 2B concatenation) with the true labels, never the null label
    for model in (main, guide):
        assert [(n, labels.tolist()) for n, _, labels in model.calls] == [(4, y.tolist())] * 2


def test_guide_runs_only_inside_the_interval_and_sde_combines_drifts():
    main, guide = GaussianVelocity([2.0, -1.0], 0.5), GaussianVelocity([1.0, 0.0], 1.0)
    z, y = draw(4), torch.tensor([0, 1, 1, 0])
    euler_sampler(main, z, y, num_steps=10, cfg_scale=4.0, guidance_low=0.3, guidance_high=0.65, guide_model=guide)
    assert [round(t, 6) for _, t, _ in guide.calls] == [0.6, 0.5, 0.4, 0.3]
    assert len(main.calls) == 10 and all(n == 4 for n, _, _ in main.calls)

    # SDE, 2 points (t = 1, then 0.04, then the drift-only step to 0), zero noise: the guided drift
    # d_g + w (d_m - d_g), each drift v - t s(v) with the score from its own velocity.
    main.calls.clear()
    x = euler_maruyama_sampler(main, z, y, num_steps=2, cfg_scale=2.5, guide_model=guide,
                               noise=torch.zeros(1, 4, 1, 2, 2))
    ref = z.double()
    for t_cur, t_next in ((1.0, 0.04), (0.04, 0.0)):
        with torch.no_grad():
            tt = torch.full((4,), t_cur)
            v_m, v_g = main(ref.float(), tt, y)[0].double(), guide(ref.float(), tt, y)[0].double()
        d_m = v_m - t_cur * score_from_velocity(v_m, ref, t_cur)
        d_g = v_g - t_cur * score_from_velocity(v_g, ref, t_cur)
        ref = ref + (t_next - t_cur) * (d_g + 2.5 * (d_m - d_g))
    torch.testing.assert_close(x, ref, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["euler", "heun", "sde"])
def test_weight_one_and_an_identical_guide_give_the_main_model_bitwise(kind):
    z, y = draw(6), torch.tensor([0, 1, 1, 0, 1, 0])
    noise = torch.randn(7, 6, 1, 2, 2, generator=torch.Generator().manual_seed(1))

    def run(**kwargs):
        main = GaussianVelocity([2.0, -1.0], 0.5)
        if kind == "sde":
            return euler_maruyama_sampler(main, z, y, num_steps=8, noise=noise, **kwargs)
        return euler_sampler(main, z, y, num_steps=8, heun=kind == "heun", **kwargs)

    alone = run()
    never = GaussianVelocity([1.0, 0.0], 1.0)
    assert torch.equal(run(cfg_scale=1.0, guide_model=never), alone) and never.calls == []
    # v_m == v_g bit for bit, so v_g + w (v_m - v_g) = v_g + w * 0 = v_m exactly, for any w
    for w in (1.5, 3.0, 7.25):
        assert torch.equal(run(cfg_scale=w, guide_model=GaussianVelocity([2.0, -1.0], 0.5)), alone)


def reference_cfg(model, z, y, num_steps, scale, low, high, null, heun=False):
    """Classifier-free guided Euler/Heun written out step by step: the conditional and the
    null-label batch run together inside [low, high], combined as u + s (c - u)."""
    x = z.double()
    times = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()

    def velocity(x, t, guided):
        if not guided:
            return model(x.float(), torch.full((len(y),), t), y=y)[0].double()
        out = model(torch.cat([x, x]).float(), torch.full((2 * len(y),), t), y=torch.cat([y, torch.full_like(y, null)]))
        cond, uncond = out[0].double().chunk(2)
        return uncond + scale * (cond - uncond)

    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        guided = scale > 1 and low <= t <= high
        d = velocity(x, t, guided)
        x_next = x + (t_next - t) * d
        if heun and i < num_steps - 1:
            x_next = x + (t_next - t) * (0.5 * d + 0.5 * velocity(x_next, t_next, guided))
        x = x_next
    return x


def test_cfg_is_unchanged_against_the_written_out_reference(files):
    model = GaussianVelocity([2.0, -1.0], 0.5)
    z, y = draw(5), torch.tensor([0, 1, 1, 0, 1])
    for heun in (False, True):
        x = euler_sampler(model, z, y, num_steps=9, heun=heun, cfg_scale=2.5, guidance_low=0.2, guidance_high=0.7)
        assert torch.equal(x, reference_cfg(model, z, y, 9, 2.5, 0.2, 0.7, 2, heun))

    # generate.py's CFG images: those of the reference on the tiny SiT (null label = its 4 classes)
    out = files["root"] / "cfg-unchanged"
    images = load(run_inprocess(pixel_args(files, out, 5, "--cfg-scale", "3", "--guidance-low", "0.3",
                                           "--guidance-high", "0.7")))
    with torch.no_grad():
        x = reference_cfg(files["pixel"].eval(), sample_noise(range(12), (3, 8, 8), 0, 0, "cpu")[0],
                          sample_labels(12, 4, 0), 5, 3.0, 0.3, 0.7, 4)
    np.testing.assert_array_equal(images, pixels_to_uint8(x).numpy())


# ---- generate.py --guide-ckpt ----

def checkpoint(path, kwargs, seed, path_type=None, model_weights_seed=None):
    """A train.py-like checkpoint of SiT(**kwargs) with random weights; ``model_weights_seed``: other
    weights in the "model" entry than in "ema"."""
    def weights(s):
        torch.manual_seed(s)
        model = SiT(**kwargs)
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.1)
        return model.state_dict()

    args = argparse.Namespace(model_kwargs=dict(kwargs))
    if path_type is not None:
        args.path_type = path_type
    ema = weights(seed)
    model = ema if model_weights_seed is None else weights(model_weights_seed)
    atomic_save({"model": model, "ema": ema, "opt": {}, "args": args, "steps": 0}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def guides(files):
    root = files["root"] / "guides"
    small = {**PIXEL_KWARGS, "hidden_size": 16, "depth": 1}
    return {
        "small": checkpoint(root / "small.pt", small, seed=1, model_weights_seed=2),
        "small_elsewhere": checkpoint(root / "elsewhere" / "small.pt", small, seed=3),
        "classes": checkpoint(root / "classes.pt", {**PIXEL_KWARGS, "num_classes": 6}, seed=1),
        "cosine": checkpoint(root / "cosine.pt", PIXEL_KWARGS, seed=1, path_type="cosine"),
        "no_null": checkpoint(root / "no_null.pt", {**PIXEL_KWARGS, "class_dropout_prob": 0.0, "uncond_prob": 0.0},
                              seed=4),
    }


def identity_of(folder):
    return json.load(open(os.path.join(folder, "provenance.json")))


@pytest.mark.parametrize("mode", ["ode", "sde", "dopri5"])
def test_generate_weight_one_or_the_same_checkpoint_as_guide_gives_the_main_model(files, guides, mode):
    out = files["root"] / f"autoguide-{mode}"
    sampler = {"ode": (), "sde": ("--mode", "sde"), "dopri5": ("--solver", "dopri5")}[mode]
    plain = load(run_inprocess(pixel_args(files, out / "plain", 5, *sampler, "--cfg-scale", "1")))
    folder = run_inprocess(pixel_args(files, out / "w1", 5, *sampler, "--cfg-scale", "1",
                                      "--guide-ckpt", guides["small"]))
    np.testing.assert_array_equal(load(folder), plain)
    assert "-cfg-1.0-guide-small-seed-0-" in os.path.basename(folder)
    same = run_inprocess(pixel_args(files, out / "same", 5, *sampler, "--cfg-scale", "3",
                                    "--guide-ckpt", files["pixel_ckpt"]))
    np.testing.assert_array_equal(load(same), plain)
    guided = load(run_inprocess(pixel_args(files, out / "guided", 5, *sampler, "--cfg-scale", "3",
                                           "--guide-ckpt", guides["small"])))
    cfg = load(run_inprocess(pixel_args(files, out / "cfg", 5, *sampler, "--cfg-scale", "3")))
    assert np.abs(guided.astype(int) - plain).max() > 10 and np.abs(guided.astype(int) - cfg).max() > 10


def test_the_guide_is_part_of_the_identity(files, guides):
    out = files["root"] / "autoguide-identity"
    plain = run_inprocess(pixel_args(files, out, 4, "--cfg-scale", "2"))
    guided = run_inprocess(pixel_args(files, out, 4, "--cfg-scale", "2", "--guide-ckpt", guides["small"]))
    stored = identity_of(guided)["guide"]
    expected = load_model(guides["small"])
    assert stored["weights_sha256"] == expected.weights_sha256 and stored["which"] == "ema"
    assert stored["path"] == os.path.abspath(guides["small"]) and stored["config"]["hidden_size"] == 16
    assert "guide" not in identity_of(plain)
    assert identity_key(identity_of(plain)) != identity_key(identity_of(guided))
    differ = identity_differences(identity_of(plain), identity_of(guided))
    assert differ == [f"guide none there, {expected.weights_sha256[:12]} ({os.path.abspath(guides['small'])}, "
                      "ema weights) now"]
    with np.load(guided + ".npz") as f:
        assert json.loads(f["provenance"].tobytes().decode())["guide"] == stored

    # another guide of the same file name: the same folder, refused; its "model" weights: another set
    with pytest.raises(GenerateError, match="made by something else .guide [0-9a-f]{12} .*small.pt, ema weights"):
        run_inprocess(pixel_args(files, out, 4, "--cfg-scale", "2", "--guide-ckpt", guides["small_elsewhere"]))
    raw = run_inprocess(pixel_args(files, out, 4, "--cfg-scale", "2", "--guide-ckpt", guides["small"],
                                   "--guide-weights", "model", "--name_add", "raw"))
    assert identity_of(raw)["guide"]["which"] == "model"
    assert identity_of(raw)["guide"]["weights_sha256"] == load_model(guides["small"], which="model").weights_sha256
    assert identity_of(raw)["guide"]["weights_sha256"] != stored["weights_sha256"]
    assert np.abs(load(raw).astype(int) - load(guided)).max() > 0


def test_a_guide_that_does_not_fit_is_one_line(files, guides, capsys):
    out = str(files["root"] / "autoguide-errors")
    for guide, message in ((guides["classes"], "has num_classes=6 but --ckpt .* has num_classes=4"),
                           (guides["cosine"], "has path_type=cosine but --ckpt .* has path_type=linear"),
                           (files["latent_ckpt"], "has in_channels=4 but --ckpt .* has in_channels=3")):
        with pytest.raises(GenerateError, match=f"--guide-ckpt {guide} {message}"):
            run_inprocess(pixel_args(files, out, 4, "--cfg-scale", "2", "--guide-ckpt", guide))
    result = run_subprocess(pixel_args(files, out, 4, "--cfg-scale", "2", "--guide-ckpt", guides["classes"]))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("generate.py: error: --guide-ckpt") and "num_classes=6" in lines[0]

    for argv, flag in ((["--guide-weights", "model"], "--guide-weights applies to --guide-ckpt"),
                       (["--guide-ckpt", os.path.join(out, "missing.pt")], "--guide-ckpt .*missing.pt does not exist")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            generate.parse_args(pixel_args(files, out, 4, *argv))
        assert exit_info.value.code == 2
        assert re.search(flag, capsys.readouterr().err.strip().splitlines()[-1])


def test_guidance_without_a_null_label_needs_a_guide(files, guides, capsys):
    out = files["root"] / "autoguide-no-null"
    argv = ["--ckpt", guides["no_null"], "--vae", "none", "--num-fid-samples", "4", "--sample_dir", str(out),
            "--num-steps", "4", "--device", "cpu", "--cfg-scale", "2"]
    with pytest.raises(GenerateError, match="needs the null-label row.*--guide-ckpt"):
        generate.main(generate.parse_args(argv))
    folder = generate.main(generate.parse_args(argv + ["--guide-ckpt", guides["small"]]))
    assert load(folder).shape == (4, 8, 8, 3)
    assert "Autoguidance by custom (depth 1, width 16" in capsys.readouterr().out
    shutil.rmtree(out)
