"""The Stable Diffusion VAE: the single place that loads it and converts pixels <-> latents.

Used by preprocessing (encode), train.py (sample latents from stored moments) and generate.py
(decode samples). Conventions follow REPA / LSEP (docs/method.md, "Training recipe"): pixels enter the encoder as
x / 127.5 - 1, the dataset stores the posterior moments (mean, std) with 2C channels (8 for the SD-VAE),
and the diffusion model sees z = normalize(mean + std * N(0, 1)). ``LatentNorm`` is that normalisation,
read from the latents' record (vae-sd/dataset.json, which checkpoints carry in their provenance):
``(latent - shift) * scale`` with the VAE config's scaling/shift factor (the SD-VAE: 0.18215, 0), or
``(latent - mean_c) / std_c`` with per-channel statistics of the encoded data (encode --latent-norm).
"""
import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from errors import UserError
from models.checkpoint import weights_sha256

LATENT_SCALE = 0.18215  # SD-VAE latent scale (its config's scaling_factor); records without one use it
NORM_KINDS = ("scale", "per-channel")  # encode --latent-norm
LATENT_CHANNELS = 4  # SD-VAE default; code should ask latent_channels(vae) instead
LATENT_DOWNSAMPLE = 8  # SD-VAE spatial factor (4 resolution levels); see downsample_factor(vae)
VAE_HUB = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
ENCODE_VAE = VAE_HUB["mse"]  # the VAE the authors encode ImageNet with


class VAEWeightsMissing(UserError, RuntimeError):
    """The VAE weights could not be found locally or fetched from the Hugging Face hub."""


class LatentNormError(UserError, ValueError):
    """A latents' record whose normalisation fields are unusable (hand-edited or damaged)."""


def config_factors(vae) -> tuple:
    """(scaling_factor, shift_factor) of a diffusers VAE's config as floats; no shift_factor (None) is 0."""
    config = dict(vae.config)
    scale, shift = config.get("scaling_factor"), config.get("shift_factor")
    return float(LATENT_SCALE if scale is None else scale), float(shift or 0.0)


def _finite_list(values, what, positive=False):
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise LatentNormError(f"{what} must be a list of numbers, got {values!r}") from None
    if not out or not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
        raise LatentNormError(f"{what} must be a non-empty list of finite{' positive' if positive else ''} numbers")
    return out


@dataclass(frozen=True)
class LatentNorm:
    """How stored latents become model inputs and back: ``z = normalize(latent)``, ``latent = denormalize(z)``.

    kind "scale": ``z = (latent - shift) * scale`` with the VAE config's scaling_factor / shift_factor
    (the SD-VAE's 0.18215 / 0 give today's z bit for bit). kind "per-channel": ``z = (latent - mean[c]) /
    std[c]`` with the mean and std of the posterior samples over the whole encoded dataset (encode
    --latent-norm per-channel); scale / shift are then the VAE config's factors, recorded but unused.
    Built from the latents' record (``from_record``), the one source for training and decoding.
    """
    kind: str = "scale"
    scale: float = LATENT_SCALE
    shift: float = 0.0
    mean: Optional[tuple] = None
    std: Optional[tuple] = None

    @classmethod
    def from_record(cls, record):
        """The normalisation a latents' record says. None, or a record written before these fields
        existed (no latent_norm / latent_shift), is the SD-VAE's 0.18215 / 0: what training used then."""
        record = record or {}
        if "latent_norm" not in record and "latent_shift" not in record:
            return cls()
        kind = record.get("latent_norm", "scale")
        if kind not in NORM_KINDS:
            raise LatentNormError(f"latent_norm {kind!r} is not one of {', '.join(NORM_KINDS)}")
        scale, = _finite_list([record.get("latent_scale", LATENT_SCALE)], "latent_scale", positive=True)
        shift, = _finite_list([record.get("latent_shift", 0.0)], "latent_shift")
        if kind == "scale":
            return cls("scale", scale, shift)
        mean = _finite_list(record.get("latent_mean") or (), "latent_mean")
        std = _finite_list(record.get("latent_std") or (), "latent_std", positive=True)
        if len(mean) != len(std):
            raise LatentNormError(f"latent_mean has {len(mean)} channels but latent_std {len(std)}")
        return cls("per-channel", scale, shift, mean, std)

    def fields(self) -> dict:
        """The record fields of this normalisation (what encode writes next to the VAE's identity)."""
        out = {"latent_norm": self.kind, "latent_scale": self.scale, "latent_shift": self.shift}
        if self.kind == "per-channel":
            out.update(latent_mean=list(self.mean), latent_std=list(self.std))
        return out

    @property
    def channels(self):
        """Channels the statistics are for (None: any, kind "scale")."""
        return None if self.mean is None else len(self.mean)

    def describe(self) -> str:
        if self.kind == "scale":
            return f"scale {self.scale:g}, shift {self.shift:g}"
        return (f"per-channel mean/std of the data over {self.channels} channels (mean {self.mean[0]:.4g}, "
                f"std {self.std[0]:.4g} for channel 0)")

    def _stats(self, like):
        if like.shape[1] != len(self.mean):
            raise ValueError(f"per-channel statistics of {len(self.mean)} channels for latents of {like.shape[1]}")
        shape = (1, len(self.mean)) + (1,) * (like.ndim - 2)
        mean = torch.tensor(self.mean, dtype=torch.float64).to(like.device, like.dtype).view(shape)
        std = torch.tensor(self.std, dtype=torch.float64).to(like.device, like.dtype).view(shape)
        return mean, std

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents [B, C, ...] -> model inputs z."""
        if self.kind == "scale":
            return (latents if self.shift == 0 else latents - self.shift) * self.scale
        mean, std = self._stats(latents)
        return (latents - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Model outputs z [B, C, ...] -> VAE latents (what the decoder takes); inverts ``normalize``."""
        if self.kind == "scale":
            x = z / self.scale
            return x if self.shift == 0 else x + self.shift
        mean, std = self._stats(z)
        return z * std + mean


class PosteriorStats:
    """Per-channel mean and std of the posterior sample distribution over many moments arrays,
    in closed form: for z = mu + sigma * eps (eps ~ N(0, 1)) over all images and pixels,
    mean_c = E[mu] and var_c = E[sigma^2 + mu^2] - mean_c^2. Sums are float64; adding the same
    arrays in the same order gives the same bits."""

    def __init__(self, channels):
        self.channels = channels
        self.sum_mu = np.zeros(channels, dtype=np.float64)
        self.sum_sq = np.zeros(channels, dtype=np.float64)
        self.count = 0

    def add(self, moments):
        """One moments array (2C, h, w) = (mean, std), as encode stores it."""
        m = np.asarray(moments, dtype=np.float64).reshape(2 * self.channels, -1)
        mu, sigma = m[:self.channels], m[self.channels:]
        self.sum_mu += mu.sum(axis=1)
        self.sum_sq += (mu * mu + sigma * sigma).sum(axis=1)
        self.count += mu.shape[1]

    def result(self):
        """(mean, std) as tuples of C floats."""
        mean = self.sum_mu / self.count
        var = np.maximum(self.sum_sq / self.count - mean * mean, 0.0)
        return tuple(float(v) for v in mean), tuple(float(v) for v in np.sqrt(var))


def set_latent_norm(vae, norm):
    """Give a decoder the normalisation of the latents it will decode (read by ``decode_to_uint8``);
    train.py and generate.py set the one of the latents' record once they have checked the VAE."""
    vae.latent_norm = norm
    return vae


def decoder_mismatch(vae, record):
    """Why ``vae`` cannot decode latents of ``record`` by its normalisation, or None: a record that
    states its factors (written since they are recorded) must name the VAE config's scaling / shift
    factor; older records (the SD-VAE's 0.18215 / 0 by convention) are not checked."""
    if not record or "latent_shift" not in record:
        return None
    scale, shift = config_factors(vae)
    if (scale, shift) != (float(record.get("latent_scale", LATENT_SCALE)), float(record["latent_shift"])):
        return (f"its config's scaling_factor / shift_factor are {scale:g} / {shift:g} but the latents were encoded "
                f"with {float(record.get('latent_scale', LATENT_SCALE)):g} / {float(record['latent_shift']):g}")
    return None


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _is_hub_name(spec):
    """True for "org/name" that is not an existing local path."""
    return _HUB_NAME.fullmatch(spec) is not None and not os.path.exists(spec)


def _missing_message(spec, reason):
    name = VAE_HUB.get(spec, spec)
    hubs = [name] if _is_hub_name(name) else list(VAE_HUB.values())
    what = f"hub model '{name}'" if _is_hub_name(name) else f"local folder '{spec}'"
    h = hubs[-1]
    return "\n".join([
        f"Could not load the SD-VAE weights from the {what}: {reason}.",
        "The weights come from " + " or ".join(f"https://huggingface.co/{x}" for x in hubs) + ".",
        "On a machine with internet, download them once, either into the Hugging Face cache",
        f"    hf download {h}        (older huggingface_hub: huggingface-cli download {h})",
        "or into a folder that you copy here:",
        f"    python -c \"from diffusers import AutoencoderKL; "
        f"AutoencoderKL.from_pretrained('{h}').save_pretrained('DIR')\"",
        "and pass that folder with --vae DIR (a save_pretrained folder: config.json + weights).",
    ])


def load_vae(spec: str, device="cpu"):
    """Load an AutoencoderKL in eval mode with gradients off.

    spec: "ema" / "mse" (the two SD-VAEs of VAE_HUB), any hub name "org/name", or a local
    save_pretrained folder. The hub cache is tried first (no network), then the hub itself.
    Raises VAEWeightsMissing with download instructions when neither works.
    """
    from diffusers import AutoencoderKL

    name = VAE_HUB.get(spec, spec)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")  # diffusers-internal noise
        vae = _from_pretrained(AutoencoderKL, spec, name)
    return vae.eval().requires_grad_(False).to(device)


def _from_pretrained(AutoencoderKL, spec, name):
    if not _is_hub_name(name):
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise VAEWeightsMissing(_missing_message(spec, "no such folder"))
        try:
            return AutoencoderKL.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise VAEWeightsMissing(_missing_message(spec, f"not a save_pretrained folder ({e})")) from e
    try:
        return AutoencoderKL.from_pretrained(name, local_files_only=True)  # the cache, no network
    except (OSError, ValueError):
        try:
            return AutoencoderKL.from_pretrained(name)
        except (OSError, ValueError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            reason = f"not in the local Hugging Face cache, and the hub failed ({type(e).__name__}: {first_line})"
            raise VAEWeightsMissing(_missing_message(spec, reason)) from e


def latent_channels(vae) -> int:
    """Channels of z (4 for the SD-VAE); stored moments have twice as many."""
    return int(vae.config.latent_channels)


def downsample_factor(vae) -> int:
    """Pixels per latent along each side: 2 per extra resolution level (8 for the SD-VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_moments(vae, images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images [B,3,H,W] -> float32 posterior moments [B, 2C, H/f, W/f] = cat(mean, std)."""
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(
            f"encode_moments expects uint8 images [B,3,H,W], got {images_uint8.dtype} "
            f"{tuple(images_uint8.shape)}"
        )
    param = next(vae.parameters())
    # Plain NCHW whatever the input's layout: a permuted NHWC batch would pick other conv kernels.
    x = images_uint8.to(param.device, torch.float32).contiguous() / 127.5 - 1
    posterior = vae.encode(x.to(param.dtype)).latent_dist
    return torch.cat([posterior.mean, posterior.std], dim=1).float()


def sample_posterior(moments: torch.Tensor, generator=None, norm=None) -> torch.Tensor:
    """Stored moments [B, 2C, h, w] -> z = norm.normalize(mean + std * N(0,1)), float32.

    ``norm``: the LatentNorm of the latents' record (None: the SD-VAE's, z = latent * 0.18215).
    Noise comes from `generator` (which must live on moments' device) or the global RNG.
    """
    mean, std = moments.float().chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return (norm or LatentNorm()).normalize(mean + std * noise)


@torch.no_grad()
def pixels_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images [B,3,H,W] -> uint8 [B,H,W,3]: floor(clamp(127.5 x + 128, 0, 255)).

    Round-to-nearest of (x + 1) * 127.5 (halves up), so -1 -> 0, 0 -> 128, 1 -> 255 and a pixel p
    read in as x = p / 127.5 - 1 comes back as p. DiT's sampler maps the same way; the authors'
    generate.py truncates (floor(127.5 x + 127.5)), half a level darker on average.
    """
    x = torch.clamp(127.5 * x.float() + 128.0, 0, 255).floor()
    return x.permute(0, 2, 3, 1).to(torch.uint8)


def uint8_to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B,3,H,W] -> float32 in [-1, 1] (the model input of pixel-space training)."""
    return images.float() / 127.5 - 1


def decode_to_uint8(vae, z: torch.Tensor, norm=None) -> torch.Tensor:
    """Normalised latents z [B,C,h,w] -> uint8 images [B,H,W,3] (on z's device), via pixels_to_uint8.

    The decoder receives ``norm.denormalize(z)``; ``norm`` defaults to the one ``set_latent_norm`` gave
    the decoder, else the SD-VAE's (z / 0.18215)."""
    norm = norm or getattr(vae, "latent_norm", None) or LatentNorm()
    param = next(vae.parameters())
    x = vae.decode(norm.denormalize(z.to(param.device, param.dtype))).sample
    return pixels_to_uint8(x).to(z.device)


def vae_identity(vae, spec) -> dict:
    """What identifies a VAE in the records of artefacts made with it (vae-sd/dataset.json, checkpoints,
    sample sets): the spec and resolved name, hashes of its config, all its weights, and its
    encoder half (``encoder.*`` + ``quant_conv.*``, which alone fixes the latents), its geometry, and its
    config's normalisation (latent_scale / latent_shift: scaling_factor / shift_factor, None as 0).
    encode adds the normalisation it chose (LatentNorm.fields) to the latents' record."""
    name = VAE_HUB.get(spec, spec)
    if not _is_hub_name(name):
        name = os.path.abspath(os.path.expanduser(name))
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    state = vae.state_dict()
    return {
        "spec": spec, "name": name, "class": type(vae).__name__,
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "weights_sha256": weights_sha256(state),
        "encoder_sha256": weights_sha256(state, prefixes=("encoder.", "quant_conv.")),
        "latent_channels": latent_channels(vae), "downsample_factor": downsample_factor(vae),
        "latent_scale": config_factors(vae)[0], "latent_shift": config_factors(vae)[1],
    }
