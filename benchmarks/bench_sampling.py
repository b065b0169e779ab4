"""Sampling speed: samples/s of the SDE (250 steps) and ODE (50 steps), with and without CFG.

Random weights, no VAE decode unless ``--vae`` is given (decoding is timed separately then).
On CPU the defaults shrink to a run of about a minute (SiT-S/2, 64 px = 8x8 latent, few
steps). ``--compare`` runs the authors' settings (non-fused attention, fp32 with their default
TF32) and ours (fused attention, bf16 autocast on CUDA) on the same weights and noise, and
reports the speed ratio and the largest difference of the outputs.

    python benchmarks/bench_sampling.py --device cuda --model SiT-XL/2 --batch-size 64
    python benchmarks/bench_sampling.py --compare
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sampling.run import Autocast  # noqa: E402
from models import SiT_models  # noqa: E402
from models.checkpoint import load_model  # noqa: E402
from models.flops import peak_flops, sit_forward_flops  # noqa: E402
from samplers import euler_maruyama_sampler, euler_sampler, unwrap_model  # noqa: E402

def model_evals(mode, num_steps, cfg_scale, heun=False):
    """Per-sample forwards of a sampler run (a guided step costs two)."""
    evals = num_steps * (2 if heun and mode == "ode" else 1) - (1 if heun and mode == "ode" else 0)
    return evals * (2 if cfg_scale > 1 else 1)


def random_model(args, fused_attn, latent_size, seed=0):
    """The timed SiT: --ckpt's EMA weights through the one loader (models.checkpoint.load_model),
    else every trainable weight drawn N(0, 0.02), so no layer outputs zeros."""
    if args.ckpt:
        return load_model(args.ckpt, fused_attn=fused_attn, hash_weights=False).model.to(args.device)
    torch.manual_seed(seed)
    model = SiT_models[args.model](input_size=latent_size, in_channels=4, num_classes=args.num_classes,
                                   fused_attn=fused_attn)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    return model.to(args.device).eval().requires_grad_(False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_sampler(model, mode, num_steps, cfg_scale, z, y, noise):
    kwargs = dict(model=model, latents=z, y=y, num_steps=num_steps, cfg_scale=cfg_scale)
    if mode == "sde":
        return euler_maruyama_sampler(**kwargs, noise=noise)
    return euler_sampler(**kwargs)


def time_sampler(model, mode, num_steps, cfg_scale, z, y, repeats):
    """Seconds per sampler call, after one warm-up call; the SDE noise is fixed, so two models
    timed on the same (z, y) see the same noise and their outputs can be compared."""
    gen = torch.Generator(device=z.device).manual_seed(2)
    noise = torch.randn((num_steps - 1, *z.shape), device=z.device, generator=gen) if mode == "sde" else None
    out = run_sampler(model, mode, num_steps, cfg_scale, z, y, noise)
    sync(z.device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = run_sampler(model, mode, num_steps, cfg_scale, z, y, noise)
    sync(z.device)
    return (time.perf_counter() - start) / repeats, out


def set_precision(precision):
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


@torch.no_grad()  # a context, not set_grad_enabled(False): a caller (the tests) keeps its grad mode
def main(args):
    args.device = torch.device(args.device)
    cpu = args.device.type == "cpu"
    channels = 4
    if args.ckpt:  # the checkpoint says what it is; --model / --resolution / --num-classes must not
        config = load_model(args.ckpt, hash_weights=False).config
        channels, factor = config.in_channels, 1 if config.in_channels == 3 else 8
        args.model, args.resolution, args.num_classes = config.model, config.input_size * factor, config.num_classes
    args.model = args.model or ("SiT-S/2" if cpu else "SiT-B/2")
    args.resolution = args.resolution or (64 if cpu else 256)
    args.batch_size = args.batch_size or (4 if cpu else 32)
    args.sde_steps = args.sde_steps or (10 if cpu else 250)
    args.ode_steps = args.ode_steps or (5 if cpu else 50)
    args.precision = args.precision or ("fp32" if cpu else "bf16")
    latent_size = args.resolution // (1 if channels == 3 else 8)
    gpu = torch.cuda.get_device_name(args.device) if not cpu else "cpu"

    torch.manual_seed(1)
    z = torch.randn(args.batch_size, channels, latent_size, latent_size, device=args.device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=args.device)
    rows = []

    def report(name, model, precision, mode, steps, cfg, seconds):
        flops = sit_forward_flops(unwrap_model(model), probe=False)
        tflops = flops * model_evals(mode, steps, cfg) * args.batch_size / seconds / 1e12
        peak = None if cpu else peak_flops(gpu, precision, tf32=False)  # "tf32": fp32 matmuls on TF32 cores
        rows.append(dict(setting=name, mode=mode, steps=steps, cfg=cfg, samples_per_s=args.batch_size / seconds,
                         s_per_batch=seconds, tflops=tflops, frac_peak=tflops * 1e12 / peak if peak else None))
        r = rows[-1]
        print(f"{name:8s} {mode:4s} {steps:4d} {cfg:4.1f} {r['samples_per_s']:12.3f} {seconds:10.3f} {tflops:9.3f} "
              + (f"{r['frac_peak']:8.1%}" if peak else "       -"), flush=True)

    print(f"{args.model} {args.resolution}px (latent {latent_size}x{latent_size}), batch {args.batch_size}, "
          f"{gpu}, torch {torch.__version__}")
    print(f"{'setting':8s} {'mode':4s} {'steps':>4s} {'cfg':>4s} {'samples/s':>12s} {'s/batch':>10s} "
          f"{'TFLOP/s':>9s} {'of peak':>8s}")
    compare = {}
    if args.compare:
        # Authors: non-fused attention, fp32 weights with their default TF32, no autocast.
        authors = random_model(args, fused_attn=False, latent_size=latent_size)
        ours = random_model(args, fused_attn=True, latent_size=latent_size)
        ours_run = Autocast(ours, args.device.type) if args.precision == "bf16" else ours
        settings = [("ours", ours_run)]
        if args.compile:  # generate.py --compile: the same module under torch.compile
            settings.append(("ours+compile", torch.compile(ours_run, dynamic=False)))
        for mode, steps in (("sde", args.sde_steps), ("ode", args.ode_steps)):
            set_precision("tf32")
            t_authors, out_authors = time_sampler(authors, mode, steps, args.cfg_scale, z, y, args.repeats)
            report("authors", authors, "tf32" if not cpu else "fp32", mode, steps, args.cfg_scale, t_authors)
            set_precision(args.precision)
            for name, run_model in settings:
                t_ours, out_ours = time_sampler(run_model, mode, steps, args.cfg_scale, z, y, args.repeats)
                report(name, run_model, args.precision, mode, steps, args.cfg_scale, t_ours)
                diff = (out_ours - out_authors).abs().max().item()
                rel = ((out_ours - out_authors).norm() / out_authors.norm()).item()
                scale = out_authors.abs().max().item()
                compare[f"{mode}/{name}"] = dict(speedup=t_authors / t_ours, max_abs_diff=diff, rel_l2_diff=rel,
                                                 output_abs_max=scale)
                print(f"  {mode}: {name}/authors speed-up x{t_authors / t_ours:.2f}, max |{name} - authors| = "
                      f"{diff:.3g}, relative L2 {rel:.3g} (outputs up to {scale:.3g})", flush=True)
    else:
        set_precision(args.precision)
        model = random_model(args, fused_attn=args.fused_attn, latent_size=latent_size)
        run_model = Autocast(model, args.device.type) if args.precision == "bf16" else model
        if args.compile:
            run_model = torch.compile(run_model, dynamic=False)
        for mode, steps in (("sde", args.sde_steps), ("ode", args.ode_steps)):
            for cfg in (1.0, args.cfg_scale):
                seconds, out = time_sampler(run_model, mode, steps, cfg, z, y, args.repeats)
                report(args.precision, run_model, args.precision, mode, steps, cfg, seconds)
        if args.vae:
            from models.vae import decode_to_uint8, load_vae
            vae = load_vae(args.vae, args.device)
            decode_to_uint8(vae, out.float())
            sync(args.device)
            start = time.perf_counter()
            decode_to_uint8(vae, out.float())
            sync(args.device)
            seconds = time.perf_counter() - start
            rows.append(dict(setting="vae-decode", samples_per_s=args.batch_size / seconds, s_per_batch=seconds))
            print(f"VAE decode: {args.batch_size / seconds:.2f} samples/s")

    result = dict(model=args.model, resolution=args.resolution, batch_size=args.batch_size, device=gpu,
                  precision=args.precision, compile=args.compile, torch=torch.__version__,
                  threads=torch.get_num_threads(), rows=rows, compare=compare or None)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ckpt", default=None, help="time this checkpoint's EMA model (its size, input and classes)")
    parser.add_argument("--model", default=None, help="default SiT-B/2 on GPU, SiT-S/2 on CPU")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (latent = /8); default 256 GPU, 64 CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 GPU, 4 CPU")
    parser.add_argument("--sde-steps", type=int, default=None, help="default 250 GPU, 10 CPU")
    parser.add_argument("--ode-steps", type=int, default=None, help="default 50 GPU, 5 CPU")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None,
                        help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after one warm-up")
    parser.add_argument("--vae", default=None, help="also time decoding with this VAE (ema/mse/folder)")
    parser.add_argument("--compare", action="store_true", help="authors' settings vs ours, same weights and noise")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile ours (with --compare: an extra 'ours+compile' row)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results", "sampling.json"))
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
