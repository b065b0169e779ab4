"""models/vae.py: loading (local, missing, offline hub), moments, posterior sampling, uint8 decoding."""
import os
from types import SimpleNamespace

import pytest
import torch

from models.vae import (LATENT_SCALE, VAE_HUB, VAEWeightsMissing, decode_to_uint8, downsample_factor,
                        encode_moments, latent_channels, load_vae, sample_posterior)
from preprocessing.synthetic import save_tiny_vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(str(tmp_path_factory.mktemp("tiny_vae")))


def test_load_local_folder(vae_dir):
    vae = load_vae(vae_dir)
    assert not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    assert latent_channels(vae) == 4 and downsample_factor(vae) == 8


def test_missing_folder_names_path_and_flag(tmp_path):
    missing = str(tmp_path / "no_such_vae")
    with pytest.raises(VAEWeightsMissing, match="no_such_vae") as info:
        load_vae(missing)
    msg = str(info.value)
    assert "--vae DIR" in msg and "huggingface.co/stabilityai/sd-vae-ft-mse" in msg
    assert isinstance(info.value, RuntimeError)


def test_folder_without_weights(tmp_path):
    with pytest.raises(VAEWeightsMissing, match="not a save_pretrained folder"):
        load_vae(str(tmp_path))


@pytest.mark.parametrize("spec,hub", [("ema", VAE_HUB["ema"]), ("someorg/no-such-vae", "someorg/no-such-vae")])
def test_hub_name_offline(spec, hub):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: no network is attempted
    with pytest.raises(VAEWeightsMissing, match="--vae DIR") as info:
        load_vae(spec)
    assert f"https://huggingface.co/{hub}" in str(info.value)
    assert f"hf download {hub}" in str(info.value)


def test_encode_moments_is_mean_then_std(vae_dir):
    vae = load_vae(vae_dir)
    images = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    moments = encode_moments(vae, images)
    assert moments.shape == (2, 8, 4, 6) and moments.dtype == torch.float32
    with torch.no_grad():
        h = vae.quant_conv(vae.encoder(images.float() / 127.5 - 1))  # the posterior's parameters
    mean, logvar = h.chunk(2, dim=1)
    torch.testing.assert_close(moments[:, :4], mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(moments[:, 4:], torch.exp(0.5 * logvar.clamp(-30, 20)), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="uint8"):
        encode_moments(vae, images.float())


def test_sample_posterior_closed_form():
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(3, 4, 2, 2, generator=g), torch.rand(3, 4, 2, 2, generator=g)
    assert torch.equal(sample_posterior(torch.cat([mean, torch.zeros_like(std)], 1)), mean * LATENT_SCALE)
    z = sample_posterior(torch.cat([mean, std], 1), generator=torch.Generator().manual_seed(7))
    noise = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(7))
    assert z.dtype == torch.float32 and torch.equal(z, (mean + std * noise) * LATENT_SCALE)
    assert LATENT_SCALE == 0.18215


class _IdentityDecoder(torch.nn.Module):
    """decode(z) returns z itself, to test the pixel mapping alone."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = None

    def decode(self, z):
        self.seen = z
        return SimpleNamespace(sample=z)


def test_decode_to_uint8_mapping():
    dec = _IdentityDecoder()
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, -1 + 0.5 / 127.5]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = decode_to_uint8(dec, x * LATENT_SCALE)
    torch.testing.assert_close(dec.seen, x)  # decode sees z / LATENT_SCALE
    assert out.shape == (1, 1, 6, 3) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 1]  # clamp, -1 -> 0, 0 -> 128, 1 -> 255, half up
    pixels = torch.arange(256, dtype=torch.float32).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    back = decode_to_uint8(dec, (pixels / 127.5 - 1) * LATENT_SCALE)
    assert torch.equal(back[0, 0, :, 0], torch.arange(256, dtype=torch.uint8))  # encoder's input map inverts


def test_decode_real_vae(vae_dir):
    vae = load_vae(vae_dir)
    out = decode_to_uint8(vae, torch.randn(2, 4, 3, 5))
    assert out.shape == (2, 24, 40, 3) and out.dtype == torch.uint8
