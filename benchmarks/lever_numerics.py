"""Train the same SiT twice, without and with speed levers, and compare the loss curves.

Both runs start from the same weights and see the same batches, times and noise at every step
(the RNG is reseeded per step), so any difference comes from the levers' numerics. Equal-numerics
levers (``gelu-epilogue``, ``fused-norm``) should stay at bf16 rounding noise; ``fp8`` is a recipe
change and its curve is what decides whether it is usable. The data are a fixed pool of random
latents the model can fit, so the loss falls over a few hundred steps.

  python benchmarks/lever_numerics.py --model SiT-XL/2 --levers fp8 --steps 300 --compile
  python benchmarks/lever_numerics.py --device cpu --model SiT-S/4 --resolution 64 --levers gelu-epilogue --steps 5

Writes ``benchmarks/results/lever_numerics.json`` (``--out``): both loss curves and a summary.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.bench_train import StepRunner, Variant  # noqa: E402
from loss import LSEPLoss  # noqa: E402
from models import SiT_models  # noqa: E402

LEVER_FIELDS = {"gelu-epilogue": "gelu_epilogue", "fused-norm": "fused_norm", "fp8": "fp8"}


def train_curve(args, variant, device):
    """Per-step total loss (denoising + probe) of ``args.steps`` steps of ``variant`` from seed 0."""
    torch.manual_seed(0)
    latent = args.resolution // 8
    with torch.device(device):
        model = SiT_models[args.model](input_size=latent, num_classes=args.num_classes, encoder_depth=8,
                                       crop_start=args.crop_start, class_dropout_prob=0.1, uncond_prob=0.9).train()
    ema = [p.detach().clone() for p in model.parameters()]
    loss_fn = LSEPLoss(weights_type="steps", weight_start=0.0225, weight_end=0.03, n_weights=10)
    runner = StepRunner(variant, model, ema, loss_fn, device)
    g = torch.Generator().manual_seed(1)
    pool = torch.randn(args.pool * args.batch_size, 4, latent, latent, generator=g).to(device)
    labels = torch.randint(0, args.num_classes, (len(pool),), generator=g).to(device)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        torch.manual_seed(1000 + step)  # same times, noise, label dropout and crop for both runs
        batch = slice((step % args.pool) * args.batch_size, (step % args.pool + 1) * args.batch_size)
        losses.append(step_loss(runner, pool[batch], labels[batch]))
    seconds = time.perf_counter() - start
    final = [p.detach().float().cpu() for p in model.parameters()]
    return losses, final, seconds


def step_loss(runner, x, y):
    """bench_train's StepRunner.step, also returning the step's loss as a float."""
    captured = {}
    loss_fn = runner.loss_fn

    def loss_and_keep(*a, **k):
        terms = loss_fn(*a, **k)
        captured["loss"] = terms.denoising.detach().mean() + terms.probe.detach()
        return terms

    runner.loss_fn = loss_and_keep
    try:
        runner.step(x, y)
    finally:
        runner.loss_fn = loss_fn
    return captured["loss"].float().item()


def summarise(base, lever, base_params, lever_params, window):
    diffs = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(base, lever)]
    tail = min(window, len(base))
    num = sum((a - b).square().sum() for a, b in zip(base_params, lever_params))
    den = sum(a.square().sum() for a in base_params)
    return dict(
        first_loss=base[0], base_final_mean=statistics.fmean(base[-tail:]),
        lever_final_mean=statistics.fmean(lever[-tail:]),
        final_mean_rel_diff=abs(statistics.fmean(lever[-tail:]) / statistics.fmean(base[-tail:]) - 1),
        max_step_rel_diff=max(diffs), median_step_rel_diff=statistics.median(diffs),
        param_rel_l2_diff=float((num / den).sqrt()),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SiT-XL/2")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--levers", default="fp8", help=f"comma list of {','.join(LEVER_FIELDS)}")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pool", type=int, default=4, help="the data: this many fixed batches, cycled")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--crop-start", type=int, default=12)
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--window", type=int, default=50, help="steps averaged for the final loss")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "lever_numerics.json"))
    args = p.parse_args(argv)
    names = [s.strip() for s in args.levers.split(",") if s.strip()]
    unknown = set(names) - set(LEVER_FIELDS)
    if unknown:
        p.error(f"--levers: unknown {sorted(unknown)}; choose from {','.join(LEVER_FIELDS)}")
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    base = Variant("base", precision=args.precision, compile=args.compile,
                   optimizer="fused" if device.type == "cuda" else "foreach")
    lever = Variant("+".join(names), precision=args.precision, compile=args.compile, optimizer=base.optimizer,
                    **{LEVER_FIELDS[n]: True for n in names})
    base_losses, base_params, base_s = train_curve(args, base, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    lever_losses, lever_params, lever_s = train_curve(args, lever, device)
    summary = summarise(base_losses, lever_losses, base_params, lever_params, args.window)
    print(f"{args.model} {args.precision} batch {args.batch_size}, {args.steps} steps, levers {names}: "
          f"loss {summary['first_loss']:.4f} -> base {summary['base_final_mean']:.4f}, "
          f"levers {summary['lever_final_mean']:.4f} (mean of the last {min(args.window, args.steps)} steps, "
          f"rel. diff {summary['final_mean_rel_diff']:.2e}); per-step rel. diff median "
          f"{summary['median_step_rel_diff']:.2e}, max {summary['max_step_rel_diff']:.2e}; final weights rel. L2 "
          f"diff {summary['param_rel_l2_diff']:.2e}; {base_s:.0f} s and {lever_s:.0f} s")
    record = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  command=" ".join(["benchmarks/lever_numerics.py"] + (sys.argv[1:] if argv is None else argv)),
                  torch=torch.__version__, device=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else "cpu", model=args.model, levers=names, precision=args.precision, steps=args.steps,
                  batch_size=args.batch_size, compile=args.compile, summary=summary,
                  base_losses=base_losses, lever_losses=lever_losses, seconds=[base_s, lever_s])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
