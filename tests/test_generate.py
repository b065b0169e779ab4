"""generate.py: determinism across processes and batch sizes, restart, npz format, errors."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fileio
import generate
from models.vae import pixels_to_uint8
from sampling.errors import GenerateError
from sampling.seeds import sample_labels, sample_noise
from models import SiT
from models.checkpoint import atomic_save
from samplers import euler_sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIXEL_KWARGS = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                    num_classes=4, encoder_depth=1)
LATENT_KWARGS = {**PIXEL_KWARGS, "in_channels": 4}


def tiny_checkpoint(path, kwargs, with_model_kwargs=True):
    """A checkpoint like train.py's, with weights large enough to give varied images."""
    torch.manual_seed(0)
    model = SiT(**kwargs)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    train_args = argparse.Namespace(model_kwargs=dict(kwargs)) if with_model_kwargs else argparse.Namespace()
    atomic_save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": train_args,
                 "steps": 0}, path)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        sample_size=16)
    vae.save_pretrained(root / "tinyvae")
    pixel_model = tiny_checkpoint(str(root / "pixel.pt"), PIXEL_KWARGS)
    tiny_checkpoint(str(root / "latent.pt"), LATENT_KWARGS)
    return {"root": root, "pixel": pixel_model, "pixel_ckpt": str(root / "pixel.pt"),
            "latent_ckpt": str(root / "latent.pt"), "vae": str(root / "tinyvae")}


pytestmark = pytest.mark.usefixtures("one_thread")


def run_inprocess(argv):
    """Run generate.main in this process; returns the sample folder."""
    return generate.main(generate.parse_args(argv))


def run_subprocess(argv, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(launcher + ["generate.py", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def pngs(folder):
    """{name: mtime} of the PNGs in ``folder``."""
    return {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder) if n.endswith(".png")}


def load(folder):
    with np.load(folder + ".npz") as f:
        return f["arr_0"]


def latent_args(files, out, batch, *extra):
    return ["--ckpt", files["latent_ckpt"], "--vae", files["vae"], "--resolution", "16", "--num-fid-samples",
            "10", "--per-proc-batch-size", str(batch), "--sample_dir", str(out), "--mode", "sde",
            "--num-steps", "6", "--cfg-scale", "2.0", "--guidance-high", "0.7", "--device", "cpu", *extra]


def pixel_args(files, out, batch, *extra):
    return ["--ckpt", files["pixel_ckpt"], "--vae", "none", "--resolution", "8", "--num-fid-samples", "12",
            "--per-proc-batch-size", str(batch), "--sample_dir", str(out), "--mode", "ode", "--num-steps", "5",
            "--device", "cpu", *extra]


def test_same_npz_for_any_process_count_and_batch_size(files):
    out = files["root"] / "determinism"
    reference = load(run_inprocess(latent_args(files, out / "a", 4)))
    assert reference.shape == (10, 16, 16, 3) and reference.dtype == np.uint8
    assert len(np.unique(reference)) > 20  # the tiny VAE decodes to varied pixels, not a constant

    other_batch = load(run_inprocess(latent_args(files, out / "b", 3)))
    np.testing.assert_array_equal(other_batch, reference)

    result = run_subprocess(latent_args(files, out / "c", 2), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = generate.main(generate.parse_args(latent_args(files, out / "c", 2, "--print-npz-path")))
    np.testing.assert_array_equal(load(folder), reference)
    # the authors' naming, with the model and probe depth read from the checkpoint
    assert os.path.basename(folder) == "custom-enc1-latent-size-16-vae-tinyvae-cfg-2.0-seed-0-sde-"


def test_restart_writes_only_missing_pngs_and_matches_unbroken_run(files, capsys):
    out = files["root"] / "restart"
    unbroken = load(run_inprocess(pixel_args(files, out / "full", 4)))

    folder = run_inprocess(pixel_args(files, out / "killed", 4, "--max-batches", "2"))
    assert not os.path.exists(folder + ".npz")
    first = pngs(folder)
    assert sorted(first) == [f"{i:06d}.png" for i in range(8)]
    # a write killed mid-PNG: fileio's temporary, owned by a process that no longer exists (no pid is this high)
    killed = fileio.temp_path(os.path.join(folder, "000009.png")).replace(f"-{os.getpid()}-", "-999999999-")
    open(killed, "wb").write(b"trunc")

    run_inprocess(pixel_args(files, out / "killed", 5))  # another batch size on restart
    assert f"removed stale temporary file {killed} (5 B; its process 999999999 has exited)" in capsys.readouterr().out
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(12)] + ["provenance.json"]
    assert {n: t for n, t in pngs(folder).items() if n in first} == first
    np.testing.assert_array_equal(load(folder), unbroken)
    first_all = pngs(folder)

    # A deleted PNG is resampled alone; a complete npz is detected and left alone.
    os.remove(os.path.join(folder, "000006.png"))
    os.remove(folder + ".npz")
    before = pngs(folder)
    run_inprocess(pixel_args(files, out / "killed", 4))
    after = pngs(folder)
    assert {n: t for n, t in after.items() if n in before} == before and sorted(after) == sorted(first_all)
    np.testing.assert_array_equal(load(folder), unbroken)
    capsys.readouterr()
    npz_mtime = os.stat(folder + ".npz").st_mtime_ns
    run_inprocess(pixel_args(files, out / "killed", 4))
    assert "already holds all 12 samples" in capsys.readouterr().out
    assert os.stat(folder + ".npz").st_mtime_ns == npz_mtime


def test_npz_format_and_cfg_one_equals_unguided_sampler(files):
    out = files["root"] / "cfg"
    images = load(run_inprocess(pixel_args(files, out, 5, "--cfg-scale", "1")))
    assert images.shape == (12, 8, 8, 3) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255 and len(np.unique(images)) > 200

    # The same 12 samples by hand: per-index noise, labels from the global seed, plain Euler.
    model = files["pixel"].eval()
    z, _ = sample_noise(range(12), (3, 8, 8), 0, 0, "cpu")
    y = sample_labels(12, 4, 0)
    x = euler_sampler(model, z, y, num_steps=5, cfg_scale=1.0)
    np.testing.assert_array_equal(images, pixels_to_uint8(x).numpy())

    # Guidance scale 3 on an interval that holds none of the 5 steps' times (1, .8, .6, .4, .2)
    # never runs the null label: the same images.
    no_interval = load(run_inprocess(pixel_args(files, out, 5, "--cfg-scale", "3",
                                                "--guidance-low", "0.05", "--guidance-high", "0.15")))
    np.testing.assert_array_equal(no_interval, images)
    guided = load(run_inprocess(pixel_args(files, out, 5, "--cfg-scale", "3", "--name_add", "guided")))
    assert np.abs(guided.astype(int) - images).max() > 10


def test_compile_flag_gives_the_same_images(files):
    # dynamo with the eager backend: the real graph capture (guided and unguided batch shapes, the
    # Autocast wrapper) without inductor's minutes of CPU compilation; tests/test_gpu.py runs inductor
    out = files["root"] / "compile"
    args = ("--cfg-scale", "2", "--guidance-high", "0.5")  # both the 2B (guided) and B (unguided) graphs
    eager = load(run_inprocess(pixel_args(files, out / "eager", 5, *args)))
    compiled = load(run_inprocess(pixel_args(files, out / "compiled", 5, *args, "--compile",
                                             "--compile-backend", "eager")))
    np.testing.assert_array_equal(compiled, eager)
    assert len(np.unique(eager)) > 200


def test_per_index_noise_and_labels():
    z_all, eps_all = sample_noise([0, 1, 2, 3], (4, 2, 2), 5, 7, "cpu")
    z_two, eps_two = sample_noise([3, 1], (4, 2, 2), 5, 7, "cpu")
    assert eps_all.shape == (5, 4, 4, 2, 2)
    torch.testing.assert_close(z_two, z_all[[3, 1]], rtol=0, atol=0)
    torch.testing.assert_close(eps_two, eps_all[:, [3, 1]], rtol=0, atol=0)
    assert not torch.equal(sample_noise([0], (4,), 0, 8, "cpu")[0], z_all[:1, :, 0, 0])

    labels = sample_labels(60, 6, 0, balanced=True)
    assert torch.bincount(labels, minlength=6).tolist() == [10] * 6
    assert torch.equal(labels, sample_labels(60, 6, 0, balanced=True))
    assert not torch.equal(labels, sample_labels(60, 6, 1, balanced=True))
    uniform = sample_labels(1000, 6, 0)
    assert uniform.min() == 0 and uniform.max() == 5
    with pytest.raises(GenerateError, match="divisible"):
        sample_labels(61, 6, 0, balanced=True)


def test_user_errors_give_one_line_and_exit_code_2(files):
    out = str(files["root"] / "errors")
    # The authors' checkpoint layout (no model_kwargs) loaded into a model of another size.
    authors_style = str(files["root"] / "0400000.pt")
    tiny_checkpoint(authors_style, PIXEL_KWARGS, with_model_kwargs=False)
    result = run_subprocess(["--ckpt", authors_style, "--model", "SiT-S/8", "--vae", "none", "--resolution", "16",
                             "--num-classes", "4", "--num-fid-samples", "2", "--sample_dir", out, "--device", "cpu"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--model SiT-S/8 contradicts checkpoint" in lines[0] and "depth=2" in lines[0]
    assert "Traceback" not in result.stderr

    with pytest.raises(GenerateError, match="divisible"):
        run_inprocess(pixel_args(files, out, 4, "--balanced-labels", "--num-fid-samples", "10"))
    with pytest.raises(GenerateError, match="--resolution 9 must be a multiple of 2"):
        run_inprocess(pixel_args(files, out, 4, "--resolution", "9"))
    with pytest.raises(GenerateError, match="takes 8x8 inputs but --resolution 16"):
        run_inprocess(pixel_args(files, out, 4, "--resolution", "16"))
    run_inprocess(pixel_args(files, out, 4, "--num-fid-samples", "2", "--name_add", "settings"))
    with pytest.raises(GenerateError, match="made by something else .num_steps 5 there, 7 now"):
        run_inprocess(pixel_args(files, out, 4, "--num-fid-samples", "2", "--name_add", "settings",
                                 "--num-steps", "7"))
    with pytest.raises(GenerateError, match="--num-classes 1000 contradicts checkpoint .*num_classes=4"):
        run_inprocess(pixel_args(files, out, 4, "--num-classes", "1000"))
    for argv in (["--cfg-scale", "0.5", "--ckpt", "x.pt"], ["--cfg-scale", "1.5"]):
        with pytest.raises(SystemExit) as exit_info:
            generate.parse_args(argv)
        assert exit_info.value.code == 2


@pytest.mark.parametrize("argv,message", [
    (["--num-steps", "0"], "--num-steps must be >= 1, got 0"),
    (["--mode", "sde", "--num-steps", "1"], "--mode sde needs --num-steps >= 2"),
    (["--per-proc-batch-size", "0"], "--per-proc-batch-size must be >= 1, got 0"),
    (["--num-fid-samples", "0"], "--num-fid-samples must be >= 1, got 0"),
    (["--guidance-low", "-0.1"], "--guidance-low must be in [0, 1], got -0.1"),
    (["--guidance-high", "1.5"], "--guidance-high must be in [0, 1], got 1.5"),
    (["--cfg-scale", "2", "--guidance-low", "0.5", "--guidance-high", "0.5"],
     "--guidance-low 0.5 must be below --guidance-high 0.5 with --cfg-scale 2.0 > 1"),
    (["--cfg-scale", "2", "--guidance-low", "0.7", "--guidance-high", "0.2"], "--guidance-low 0.7 must be below"),
    (["--solver", "dopri5", "--atol", "0"], "--atol must be > 0, got 0.0"),
    (["--solver", "dopri5", "--rtol=-1e-3"], "--rtol must be > 0, got -0.001"),
    (["--atol", "1e-5"], "--atol applies to --solver dopri5 only"),
    (["--solver", "dopri5", "--heun"], "--heun contradicts --solver dopri5"),
    (["--mode", "sde", "--solver", "heun"], "--solver heun is an ODE solver; drop it with --mode sde"),
])
def test_numeric_flags_out_of_range_are_one_usage_line(files, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.parse_args(pixel_args(files, files["root"] / "ranges", 4, *argv))
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in last and message in last, last  # argparse: "<prog>: error: <message>"
    # an empty interval is fine without guidance (nothing to turn off), and equal ends of [0, 1] too
    generate.parse_args(pixel_args(files, files["root"] / "ranges", 4, "--cfg-scale", "1", "--guidance-low", "0.5",
                                   "--guidance-high", "0.5"))
