"""Sampling a list of indices with a model: batches dealt round-robin over the processes, the
sampler (ODE Euler/Heun/dopri5 or SDE, with CFG or autoguidance), decoding, and PNG writing that
overlaps the next batch."""
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

from models.vae import decode_to_uint8, pixels_to_uint8
from samplers import dopri5_sampler, euler_maruyama_sampler, euler_sampler
from sampling.errors import GenerateError
from sampling.npz import NFE_KEYS, png_path, save_png_atomic
from sampling.seeds import sample_labels, sample_noise


class Autocast(torch.nn.Module):
    """Runs the wrapped model under bf16 autocast; the sampler's state stays float64."""

    def __init__(self, module, device_type):
        super().__init__()
        self.module = module  # samplers.unwrap_model finds num_classes through .module
        self.device_type = device_type

    def forward(self, x, t, y):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.module(x, t, y)


def ode_solver(args):
    """The ODE solver of ``args``: "dopri5", or "heun"/"euler" by --heun (settings without a
    ``solver``, such as train.py's evaluation, are Euler/Heun)."""
    solver = getattr(args, "solver", None)
    return solver if solver == "dopri5" else ("heun" if args.heun else "euler")


def sample_batch(model, indices, labels, args, path_type, shape, device, guide=None, counts=None):
    """Sampler output (B, C, h, w) float64 (latents, or pixels in [-1, 1]) for a list of indices.
    ``guide``: the autoguidance model (None: CFG with the null label, as before). ``counts``: a
    list that dopri5 extends with (velocity evaluations, guided ones) per sample."""
    num_sde_steps = args.num_steps - 1 if args.mode == "sde" else 0
    z, noise = sample_noise(indices, shape, num_sde_steps, args.global_seed, device)
    y = labels[indices].to(device)
    if args.mode == "ode" and ode_solver(args) == "dopri5":
        x, nfe, guided = dopri5_sampler(model, z, y, cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
                                        guidance_high=args.guidance_high, path_type=path_type, guide_model=guide,
                                        atol=args.atol, rtol=args.rtol)
        if counts is not None:
            counts.extend(zip(nfe.tolist(), guided.tolist()))
        return x
    kwargs = dict(model=model, latents=z, y=y, num_steps=args.num_steps, heun=args.heun,
                  cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
                  guidance_high=args.guidance_high, path_type=path_type, guide_model=guide)
    if args.mode == "sde":
        return euler_maruyama_sampler(**kwargs, noise=noise)
    return euler_sampler(**kwargs)


def sample_indices(args, model, config, vae, todo, folder, rank, world_size, device, channels, guide=None):
    """Sample this rank's share of ``todo`` (batches dealt round-robin) with ``model`` (its ModelConfig
    ``config``) and write their PNGs. ``args``: the sampler and label settings of parse_args (train.py's
    evaluation passes its own, with the same names). ``vae``: the decoder, carrying the latents'
    normalisation (models.vae.set_latent_norm; decode_to_uint8 inverts it), or None for pixels.
    ``guide``: the autoguidance model, or None.
    Returns {index: (velocity evaluations, guided ones)} of the samples written with dopri5 (whose
    PNGs carry them as text chunks), else an empty dict."""
    model = model.to(device)
    if args.cfg_scale > 1 and guide is None and not config.has_null_label:
        raise GenerateError("--cfg-scale > 1 needs the null-label row, but this model was trained without "
                            "label dropout; use --cfg-scale 1 (or autoguidance: --guide-ckpt)")
    labels = sample_labels(args.num_fid_samples, config.num_classes, args.global_seed, args.balanced_labels)
    adaptive = args.mode == "ode" and ode_solver(args) == "dopri5"
    if guide is not None:
        guide = guide.to(device)
    if args.precision == "bf16":
        model = Autocast(model, device.type)
        guide = None if guide is None else Autocast(guide, device.type)
    if args.compile:
        # Static shapes: one graph for the guided batch (2B) and one for the unguided (B). dopri5's
        # batches shrink as samples finish and mix guided and unguided rows: a dynamic batch size.
        model = torch.compile(model, dynamic=adaptive or False, backend=args.compile_backend)
        if guide is not None:
            guide = torch.compile(guide, dynamic=adaptive or False, backend=args.compile_backend)
    batch = args.per_proc_batch_size
    chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    mine = chunks[rank::world_size][: args.max_batches]
    shape = (channels, config.input_size, config.input_size)
    written = {}
    with ThreadPoolExecutor(max_workers=2) as writer:  # PNG encoding overlaps the next batch
        pending = []
        for indices in tqdm(mine, desc=f"rank 0 of {world_size}", disable=rank != 0):
            counts = [] if adaptive else None
            x = sample_batch(model, indices, labels, args, config.path_type, shape, device, guide=guide, counts=counts)
            images = pixels_to_uint8(x) if vae is None else decode_to_uint8(vae, x.float())
            images = images.cpu().numpy()  # the one host sync per batch
            texts = [dict(zip(NFE_KEYS, c)) for c in counts] if adaptive else [None] * len(indices)
            if adaptive:
                written.update(zip(indices, counts))
            for w in pending:
                w.result()  # re-raises a failed write; bounds the queue to one batch
            pending = [writer.submit(save_png_atomic, img, png_path(folder, i), text)
                       for i, img, text in zip(indices, images, texts)]
        for w in pending:
            w.result()
    return written
