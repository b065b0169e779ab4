"""Latents of any diffusers AutoencoderKL and their normalisation (models.vae.LatentNorm): what encode
records, the closed-form per-channel statistics, and the one record that training, previews and
generate.py all normalise / denormalise with. Tiny random VAEs of 4 and 16 latent channels."""
import json
import os

import numpy as np
import pytest
import torch

import generate
import sampling.run as s_run
import train
import training.loop as t_loop
import training.preview as t_preview
from models.vae import (LATENT_SCALE, LatentNorm, LatentNormError, PosteriorStats, decode_to_uint8, load_vae,
                        sample_posterior, vae_identity)
from sampling.errors import GenerateError
from training.errors import TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")

SD3_FACTORS = (1.5305, 0.0609)


def tiny_vae(folder, latent_channels=4, seed=0, **config):
    """A random AutoencoderKL (8x downsampling, ~70k parameters) saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=latent_channels,
                  norm_num_groups=4, sample_size=32, **config).save_pretrained(folder)
    return folder


def vae16(folder, factors=SD3_FACTORS):
    """SD3-like: 16 channels, no quant convs, its own scaling / shift factor (the same weights for any factors)."""
    return tiny_vae(folder, 16, scaling_factor=factors[0], shift_factor=factors[1], use_quant_conv=False,
                    use_post_quant_conv=False)


def make_images(root, n=6):
    from PIL import Image

    from preprocessing.dataset_tools import main as tools

    rng = np.random.default_rng(0)
    raw = os.path.join(root, "raw")
    for i in range(n):
        os.makedirs(os.path.join(raw, f"n0{i % 2}"), exist_ok=True)
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(os.path.join(raw, f"n0{i % 2}", f"{i}.png"))
    data = os.path.join(root, "data")
    tools(["convert", "--source", raw, "--dest", os.path.join(data, "images"), "--resolution", "32x32",
           "--workers", "0"])
    return data


def encode(data, vae, *extra):
    from preprocessing.dataset_tools import main as tools

    tools(["encode", "--source", os.path.join(data, "images"), "--dest", os.path.join(data, "vae-sd"),
           "--workers", "0", "--vae", vae, *extra])
    with open(os.path.join(data, "vae-sd", "dataset.json"), "rb") as f:
        raw = f.read()
    return json.loads(raw)["vae"], raw


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    yield
    reset_accelerate()


#################################################################################
#                          LatentNorm and its statistics                        #
#################################################################################

def test_older_records_read_as_sd_vae_and_sd_vae_inputs_are_unchanged_bitwise(tmp_path):
    older = {"spec": "mse", "encoder_sha256": "0" * 64, "latent_channels": 4, "latent_scale": LATENT_SCALE}
    for record in (None, {}, older):
        norm = LatentNorm.from_record(record)
        assert (norm.kind, norm.scale, norm.shift, norm.mean, norm.std) == ("scale", 0.18215, 0.0, None, None)
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(2, 4, 3, 3, generator=g), torch.rand(2, 4, 3, 3, generator=g)
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    z = sample_posterior(torch.cat([mean, std], 1), torch.Generator().manual_seed(5), LatentNorm.from_record(older))
    assert torch.equal(z, (mean + std * noise) * 0.18215)  # today's formula, bit for bit
    assert torch.equal(LatentNorm().denormalize(z), z / 0.18215)
    # an SD-VAE-configured VAE records 0.18215 / 0 from its config: the same normalisation
    record = vae_identity(load_vae(tiny_vae(str(tmp_path / "sd"))), str(tmp_path / "sd"))
    assert (record["latent_scale"], record["latent_shift"]) == (0.18215, 0.0)
    assert LatentNorm.from_record(record) == LatentNorm()


def test_round_trips_and_values():
    x = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(1)) * 3 + 0.5
    scale = LatentNorm("scale", *SD3_FACTORS)
    torch.testing.assert_close(scale.normalize(x), (x - 0.0609) * 1.5305, rtol=0, atol=0)
    torch.testing.assert_close(scale.denormalize(scale.normalize(x)), x, rtol=0, atol=2e-6)
    mean, std = tuple(np.linspace(-1, 1, 16)), tuple(np.linspace(0.5, 2, 16))
    per = LatentNorm("per-channel", *SD3_FACTORS, mean, std)
    z = per.normalize(x)
    assert float(z[0, 15, 0, 0]) == pytest.approx((float(x[0, 15, 0, 0]) - 1.0) / 2.0, rel=1e-6)
    assert float(z[2, 0, 1, 1]) == pytest.approx((float(x[2, 0, 1, 1]) + 1.0) / 0.5, rel=1e-6)
    torch.testing.assert_close(per.denormalize(z), x, rtol=0, atol=2e-6)
    assert LatentNorm.from_record(per.fields()) == per and LatentNorm.from_record(scale.fields()) == scale
    with pytest.raises(LatentNormError, match="latent_std must be"):
        LatentNorm.from_record({**per.fields(), "latent_std": [1.0] * 15 + [0.0]})
    with pytest.raises(LatentNormError, match="latent_norm 'other'"):
        LatentNorm.from_record({**per.fields(), "latent_norm": "other"})


def test_per_channel_statistics_closed_form_against_samples():
    """mean_c = E[mu], var_c = E[sigma^2 + mu^2] - mean_c^2 over images and pixels, against many draws."""
    rng = np.random.default_rng(0)
    channels, arrays = 3, []
    for _ in range(5):
        mu = rng.normal([[[0.5]], [[-2.0]], [[0.0]]], [[[1.0]], [[0.3]], [[2.0]]], (channels, 4, 4))
        sigma = rng.uniform(0.1, [[[0.5]], [[1.5]], [[0.2]]], (channels, 4, 4))
        arrays.append(np.concatenate([mu, sigma]).astype(np.float32))
    stats = PosteriorStats(channels)
    for a in arrays:
        stats.add(a)
    mean, std = stats.result()
    moments = np.stack(arrays).astype(np.float64)
    mu, sigma = moments[:, :channels], moments[:, channels:]
    draws = mu[None] + sigma[None] * rng.standard_normal((20000,) + mu.shape)  # 20000 posterior samples each
    brute_mean, brute_std = draws.mean(axis=(0, 1, 3, 4)), draws.std(axis=(0, 1, 3, 4))
    np.testing.assert_allclose(mean, brute_mean, atol=3e-3)
    np.testing.assert_allclose(std, brute_std, rtol=2e-3)
    exact_mean = mu.mean(axis=(0, 2, 3))
    exact_var = (sigma ** 2 + mu ** 2).mean(axis=(0, 2, 3)) - exact_mean ** 2
    np.testing.assert_allclose(mean, exact_mean, rtol=1e-12)
    np.testing.assert_allclose(np.square(std), exact_var, rtol=1e-12)
    assert std[2] > 1.5 and std[1] < 1.2  # channel 2: wide means; channel 1: narrow means, wider noise


#################################################################################
#                     encode -> train -> generate, one record                  #
#################################################################################

def test_sixteen_channels_per_channel_encode_train_generate(tmp_path, fresh_accelerate_state, monkeypatch):
    from dataset import CustomDataset
    from test_train import tiny_argv

    data = make_images(str(tmp_path))
    vae = vae16(str(tmp_path / "vae16"))
    record, raw = encode(data, vae, "--latent-norm", "per-channel")
    assert (record["latent_norm"], record["latent_scale"], record["latent_shift"]) == ("per-channel", 1.5305, 0.0609)
    assert record["latent_channels"] == 16 and len(record["latent_mean"]) == len(record["latent_std"]) == 16
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(data, "vae-sd")) for f in fs
                   if f.endswith(".npy"))
    moments = np.stack([np.load(f) for f in files]).astype(np.float64)
    mu, sigma = moments[:, :16], moments[:, 16:]
    np.testing.assert_allclose(record["latent_mean"], mu.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(np.square(record["latent_std"]),
                               (mu ** 2 + sigma ** 2).mean(axis=(0, 2, 3)) - mu.mean(axis=(0, 2, 3)) ** 2, rtol=1e-10)
    # a rerun (nothing to encode) and a resume (two files deleted) give the same record, byte for byte
    assert encode(data, vae, "--latent-norm", "per-channel")[1] == raw
    os.remove(files[1]), os.remove(files[4])
    assert encode(data, vae, "--latent-norm", "per-channel")[1] == raw
    dataset = CustomDataset(data)
    norm = dataset.latent_norm
    assert norm == LatentNorm.from_record(record) and norm.kind == "per-channel" and dataset.latent_shape[0] == 32

    # training: the data's norm turns moments into inputs, previews decode with it; in_channels 16 from the data
    seen = {"train": [], "preview": []}
    real_sample, real_decode = t_loop.sample_posterior, t_preview.decode_to_uint8
    monkeypatch.setattr(t_loop, "sample_posterior", lambda m, generator=None, norm=None: (
        seen["train"].append(norm), real_sample(m, generator, norm))[1])
    monkeypatch.setattr(t_preview, "decode_to_uint8", lambda v, z, norm=None: (
        seen["preview"].append(v.latent_norm), real_decode(v, z, norm))[1])
    argv = tiny_argv(data, tmp_path, "c16", "--resolution", 32, "--max-train-steps", 2, "--sampling-steps", 2,
                     "--vae", vae)
    train.main(train.parse_args(argv))
    assert seen["train"] and all(n == norm for n in seen["train"])
    assert seen["preview"] and all(n == norm for n in seen["preview"])
    checkpoint = torch.load(tmp_path / "c16" / "checkpoints" / "0000002.pt", weights_only=False)
    assert checkpoint["config"]["in_channels"] == 16
    assert checkpoint["provenance"]["data"]["vae"] == record

    # training with a VAE of other factors (same weights and encoder): one line
    other = vae16(str(tmp_path / "vae16_other"), (1.0, 0.0))
    reset_accelerate()
    with pytest.raises(TrainingError, match=r"^--vae .*vae16_other cannot decode .*scaling_factor / shift_factor "
                                            r"are 1 / 0 but the latents were encoded with 1.5305 / 0.0609[^\n]*$"):
        train.main(train.parse_args(tiny_argv(data, tmp_path, "c16b", "--resolution", 32, "--max-train-steps", 1,
                                              "--sampling-steps", 1, "--vae", other)))

    # generate.py: the decoder receives exactly denormalize(sampler output) with the training statistics
    decoded = []
    real_run_decode = s_run.decode_to_uint8

    def spy(v, z, norm=None):
        original = v.decode

        def capture(latents):
            decoded.append((v.latent_norm, z.clone(), latents.clone()))
            return original(latents)
        v.decode = capture
        try:
            return real_run_decode(v, z, norm)
        finally:
            del v.decode
    monkeypatch.setattr(s_run, "decode_to_uint8", spy)
    ckpt = tmp_path / "c16" / "checkpoints" / "0000002.pt"
    gen = ["--ckpt", str(ckpt), "--num-fid-samples", "2", "--per-proc-batch-size", "2", "--sample_dir",
           str(tmp_path / "s"), "--mode", "ode", "--num-steps", "3", "--device", "cpu"]
    folder = generate.main(generate.parse_args(gen + ["--vae", vae]))
    with np.load(folder + ".npz") as f:
        assert f["arr_0"].shape == (2, 32, 32, 3)
    assert len(decoded) == 1
    used, z, latents = decoded[0]
    assert used == norm
    assert torch.equal(latents, norm.denormalize(z))
    mean, std = torch.tensor(norm.mean).view(1, 16, 1, 1), torch.tensor(norm.std).view(1, 16, 1, 1)
    torch.testing.assert_close(latents, z * std.float() + mean.float(), rtol=0, atol=0)
    with pytest.raises(GenerateError, match=r"^--vae .*vae16_other cannot decode the latents 0000002.pt was trained "
                                            r"on: .*1 / 0 but the latents were encoded with 1.5305 / 0.0609[^\n]*$"):
        generate.main(generate.parse_args(gen + ["--vae", other]))


def test_scale_norm_from_config_and_resume_refuses_other_norm(tmp_path, fresh_accelerate_state):
    """16 channels with --latent-norm scale: z = (latent - 0.0609) * 1.5305; re-encoding the data per
    channel under a run is refused at its resume, and the SD-VAE factors of a 4-channel VAE record as 0.18215 / 0."""
    from dataset import CustomDataset
    from test_train import tiny_argv

    data = make_images(str(tmp_path))
    vae = vae16(str(tmp_path / "vae16"))
    record, _ = encode(data, vae)
    assert (record["latent_norm"], record["latent_scale"], record["latent_shift"]) == ("scale", 1.5305, 0.0609)
    assert "latent_mean" not in record
    dataset = CustomDataset(data)
    moments = dataset[0].moments[None]
    z = sample_posterior(moments, torch.Generator().manual_seed(3), dataset.latent_norm)
    mean, std = moments.chunk(2, 1)
    expected = (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(3)) - 0.0609) * 1.5305
    assert torch.equal(z, expected)
    import probe  # probe.py's inputs use the latents' own normalisation too
    x0, _, _ = probe.ProbeInputs(dataset, torch.tensor([0]), seed=4)[0]
    eps = torch.randn(mean.shape[1:], generator=probe.sample_generator(4, 0, "posterior"))
    torch.testing.assert_close(x0, (mean[0] + std[0] * eps - 0.0609) * 1.5305, rtol=0, atol=0)
    argv = tiny_argv(data, tmp_path, "run", "--resolution", 32, "--max-train-steps", 1, "--vae", vae)
    train.main(train.parse_args(argv))
    encode(data, vae, "--latent-norm", "per-channel")  # the data changes normalisation under the run
    reset_accelerate()
    with pytest.raises(TrainingError, match=r"^--data-dir .* normalised with per-channel .* but .*0000001.pt was "
                                            r"trained with scale 1.5305, shift 0.0609; resume with the data[^\n]*$"):
        train.main(train.parse_args(argv + ["--max-train-steps", "2", "--resume-step", "-1"]))

    # a 4-channel SD-VAE-configured VAE: 0.18215 / 0, and an older record (no normalisation fields) is kept
    # byte for byte by a rerun of encode
    data4 = make_images(str(tmp_path / "four"))
    sd = tiny_vae(str(tmp_path / "sd"))
    record4, _ = encode(data4, sd)
    assert (record4["latent_norm"], record4["latent_scale"], record4["latent_shift"]) == ("scale", 0.18215, 0.0)
    path = os.path.join(data4, "vae-sd", "dataset.json")
    with open(path) as f:
        meta = json.load(f)
    for key in ("latent_norm", "latent_shift"):
        del meta["vae"][key]
    with open(path, "w") as f:
        json.dump(meta, f)
    with open(path, "rb") as f:
        older = f.read()
    assert encode(data4, sd)[1] == older
    assert CustomDataset(data4).latent_norm == LatentNorm()


def test_decode_uses_the_norm_it_was_given():
    class Identity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def decode(self, z):
            self.seen = z
            return type("Out", (), {"sample": z})()

    dec = Identity()
    z = torch.full((1, 3, 1, 2), 0.5)
    decode_to_uint8(dec, z)
    assert torch.equal(dec.seen, z / 0.18215)  # no norm given: the SD-VAE's
    dec.latent_norm = LatentNorm("scale", *SD3_FACTORS)
    decode_to_uint8(dec, z)
    assert torch.equal(dec.seen, z / 1.5305 + 0.0609)
