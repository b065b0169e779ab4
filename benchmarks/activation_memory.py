"""Training memory of a SiT, without a GPU: bytes saved for the backward pass, with and without
--grad-checkpoint, plus the exact bytes of weights, gradients, AdamW state and EMA.

Runs training forwards (LSEP loss, probe branch and crop on, bf16 autocast as on GPUs) on the CPU
at batch B and 2B and counts every tensor autograd saves for the backward pass (each storage once).
The difference is the per-sample activation memory; the rest is independent of the batch (under
autocast: the bf16 copies of the weights). Both extrapolate to any batch. What this does
not see: the allocator's fragmentation, cuBLAS/attention workspaces, the CUDA context, and the
transient tensors of the backward pass (with --grad-checkpoint: one block's recomputed activations
and their gradients at a time); add a few GiB for them.

    python benchmarks/activation_memory.py --model SiT-XL/2 --batch-size 1 --plan-batch 32
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from loss import LSEPLoss  # noqa: E402
from models import SiT_models  # noqa: E402


def saved_bytes(model, loss_fn, x, y, dtype):
    """Bytes of the distinct storages autograd saves during one training forward."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            terms = loss_fn(model, x, dict(y=y))
            denoising, probe = terms.denoising, terms.probe
            (denoising.mean() + probe).backward()
    model.zero_grad(set_to_none=True)
    parameter_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in parameter_ptrs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="SiT-XL/2")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1, help="measured at this batch and twice it")
    p.add_argument("--plan-batch", type=int, default=32, help="per-GPU batch to extrapolate to")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--crop-start", type=int, default=12)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "activation_memory.json"))
    args = p.parse_args(argv)

    torch.manual_seed(0)
    latent = args.resolution // 8
    model = SiT_models[args.model](input_size=latent, num_classes=1000, crop_start=args.crop_start).train()
    loss_fn = LSEPLoss(weights_type="steps", weight_start=0.0225, weight_end=0.03, n_weights=10)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    all_params = sum(p.numel() for p in model.parameters())
    # fp32 weights, fp32 gradients, AdamW exp_avg + exp_avg_sq, fp32 EMA copy
    states = {"weights": 4 * all_params, "gradients": 4 * num_params, "adamw": 8 * num_params, "ema": 4 * all_params}
    rows = {}
    for checkpointed in (False, True):
        model.grad_checkpoint = checkpointed
        start = time.perf_counter()
        saved = []
        for batch in (args.batch_size, 2 * args.batch_size):
            torch.manual_seed(1)
            x, y = torch.randn(batch, 4, latent, latent), torch.randint(0, 1000, (batch,))
            saved.append(saved_bytes(model, loss_fn, x, y, dtype))
        per_sample = (saved[1] - saved[0]) / args.batch_size
        fixed = saved[0] - per_sample * args.batch_size
        rows["grad_checkpoint" if checkpointed else "plain"] = {
            "saved_bytes_per_sample": per_sample, "saved_bytes_fixed": fixed, "seconds": time.perf_counter() - start,
            "estimate_gib_at_plan_batch": (sum(states.values()) + fixed + per_sample * args.plan_batch) / 2**30}
    gib = 2**30
    print(f"{args.model} {args.resolution} px, {args.precision} autocast, crop from {args.crop_start}; "
          f"measured at batch {args.batch_size}, extrapolated to {args.plan_batch} per GPU")
    print("model state (fp32 weights, gradients, AdamW, EMA): "
          + ", ".join(f"{k} {v / gib:.2f}" for k, v in states.items()) + f" = {sum(states.values()) / gib:.2f} GiB")
    print(f"{'':16} {'saved per sample':>18} {'saved, fixed':>14} {'state + saved at batch ' + str(args.plan_batch):>30}")
    for name, row in rows.items():
        print(f"{name:16} {row['saved_bytes_per_sample'] / 2**20:>14.1f} MiB {row['saved_bytes_fixed'] / 2**30:>10.2f} GiB "
              f"{row['estimate_gib_at_plan_batch']:>26.2f} GiB")
    record = {"model": args.model, "resolution": args.resolution, "precision": args.precision,
              "crop_start": args.crop_start, "measured_batch": args.batch_size, "plan_batch": args.plan_batch,
              "state_bytes": states, "rows": rows, "torch": torch.__version__,
              "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
