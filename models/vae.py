"""The Stable Diffusion VAE: the single place that loads it and converts pixels <-> latents.

Used by preprocessing (encode), train.py (sample latents from stored moments) and generate.py
(decode samples). Conventions follow REPA / LSEP (docs/method.md, "Training recipe"): pixels enter the encoder as
x / 127.5 - 1, the dataset stores the posterior moments (mean, std) with 8 channels, and the
diffusion model sees z = (mean + std * N(0, 1)) * 0.18215.
"""
import hashlib
import json
import os
import re
import warnings

import torch

from errors import UserError
from models.checkpoint import weights_sha256

LATENT_SCALE = 0.18215  # SD-VAE latent scale (the config's scaling_factor); z = latent * LATENT_SCALE
LATENT_CHANNELS = 4  # SD-VAE default; code should ask latent_channels(vae) instead
LATENT_DOWNSAMPLE = 8  # SD-VAE spatial factor (4 resolution levels); see downsample_factor(vae)
VAE_HUB = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
ENCODE_VAE = VAE_HUB["mse"]  # the VAE the authors encode ImageNet with


class VAEWeightsMissing(UserError, RuntimeError):
    """The VAE weights could not be found locally or fetched from the Hugging Face hub."""


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


def sample_posterior(moments: torch.Tensor, generator=None) -> torch.Tensor:
    """Stored moments [B, 2C, h, w] -> z = (mean + std * N(0,1)) * LATENT_SCALE, float32.

    Noise comes from `generator` (which must live on moments' device) or the global RNG.
    """
    mean, std = moments.float().chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return (mean + std * noise) * LATENT_SCALE


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


def decode_to_uint8(vae, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents z [B,C,h,w] -> uint8 images [B,H,W,3] (on z's device), via pixels_to_uint8."""
    param = next(vae.parameters())
    x = vae.decode(z.to(param.device, param.dtype) / LATENT_SCALE).sample
    return pixels_to_uint8(x).to(z.device)


def vae_identity(vae, spec) -> dict:
    """What identifies a VAE in the records of artefacts made with it (vae-sd/dataset.json, checkpoints,
    sample sets): the spec and resolved name, hashes of its config, all its weights, and its
    encoder half (``encoder.*`` + ``quant_conv.*``, which alone fixes the latents), and its geometry."""
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
        "latent_scale": LATENT_SCALE,
    }
