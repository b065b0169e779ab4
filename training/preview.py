"""Preview grids during training: samples of the EMA model in eval mode (the authors' previews
used the training-mode model, label dropout and probe branch included), from fixed noise."""
import torch

from models.vae import decode_to_uint8, pixels_to_uint8
from samplers import euler_sampler
from seeding import derive_seed

PREVIEW_SAMPLES = 64      # images in each preview grid (the authors' 64)
PREVIEW_STEPS = 50        # Euler steps of the preview sampler
PREVIEW_CFG = 4.0         # the authors' preview guidance scale


def preview_noise(args, config, device):
    """Fixed preview noise and labels, a function of --seed only (same grid content every time)."""
    generator = torch.Generator().manual_seed(derive_seed(args.seed, -2, 0))
    size, channels = config.input_size, config.in_channels
    x = torch.randn(PREVIEW_SAMPLES, channels, size, size, generator=generator)
    y = torch.randint(0, config.num_classes, (PREVIEW_SAMPLES,), generator=generator)
    return x.to(device), y.to(device)


@torch.no_grad()
def make_preview(ema, vae, noise, labels, config, accelerator):
    """(B, H, W, 3) uint8 samples of the EMA model in eval mode (not the training-mode model); ``vae``
    decodes with the data's normalisation it carries (training.setup.check_data_vae set it)."""
    with accelerator.autocast():
        x = euler_sampler(ema, noise, labels, num_steps=PREVIEW_STEPS, cfg_scale=PREVIEW_CFG,
                          guidance_low=0.0, guidance_high=1.0, path_type=config.path_type, heun=False)
    x = x.float()
    if vae is None:  # pixel space
        return pixels_to_uint8(x)
    return torch.cat([decode_to_uint8(vae, chunk) for chunk in x.split(16)])
