"""Where a training step's GPU time goes: phases (forward+backward, clipping, AdamW, EMA) timed with
CUDA events, and kernels grouped by kind (matmul, attention, fused elementwise, optimizer) from
the torch profiler. Uses bench_train.py's step, so the numbers explain its MFU.

    python benchmarks/profile_train.py --model SiT-XL/2 --compile
    python benchmarks/profile_train.py --model SiT-XL/2 --compile --compile-mode reduce-overhead --gelu-epilogue
"""
import argparse
import collections
import json
import os
import sys
import time
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.bench_train import StepRunner, Variant  # noqa: E402
from loss import LSEPLoss  # noqa: E402
from models import SiT_models  # noqa: E402
from models.flops import SiTFlopsConfig, train_step_flops  # noqa: E402

KINDS = (  # first match wins; names of cuBLAS / cuDNN / flash / inductor kernels on Hopper
    ("attention", ("flash", "fmha", "attention")),
    ("fused norm/residual (models/fused.py)", ("norm_modulate", "gate_residual")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "lerp")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_", "ampere_", "cublas")),
    ("fused elementwise (triton)", ("triton",)),
)


def kind_of(name):
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


class PhaseTimer:
    """CUDA events between phases of the step, read after the last step (no syncs inside); on CPU
    (a dry run of this script) host clocks."""

    def __init__(self, cuda):
        self.cuda, self.marks = cuda, []

    def mark(self, name):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:
            event = time.perf_counter()
        self.marks.append((name, event))

    def durations(self):
        if self.cuda:
            torch.cuda.synchronize()
        out = collections.defaultdict(float)
        for (_, start), (name, end) in zip(self.marks, self.marks[1:]):
            if name != "start":
                out[name] += start.elapsed_time(end) if self.cuda else 1e3 * (end - start)
        return out


def timed_step(runner, x, y, timer):
    """bench_train's StepRunner.step with an event between phases."""
    v = runner.variant
    timer.mark("start")
    with torch.autocast(runner.device.type, dtype=torch.bfloat16):
        terms = runner.loss_fn(runner.forward, x, dict(y=y))
        denoising, probe_loss = terms.denoising, terms.probe
        loss = denoising.mean() + probe_loss
    loss.backward()
    timer.mark("forward+backward")
    torch.nn.utils.clip_grad_norm_(runner.trainable, runner.clip_grad)
    timer.mark("clip grad norm")
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)
    timer.mark("AdamW")
    runner.update_ema()
    timer.mark("EMA")
    assert v.precision == "bf16"


def attention_backends(model, batch, device, reps=20):
    """Forward+backward ms of one attention call at the model's shapes (batch 2B, as the probe
    blocks run), for each SDPA backend that accepts them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads = model.blocks[0].attn.num_heads
    dim = model.pos_embed.shape[-1] // heads
    tokens = model.x_embedder.num_patches
    q, k, v = (torch.randn(2 * batch, heads, tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                timer = PhaseTimer(device.type == "cuda")
                for i in range(reps + 3):
                    if i == 3:
                        timer.mark("start")
                    torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)
                timer.mark("calls")
                out[backend.name] = timer.durations()["calls"] / reps
        except RuntimeError as error:
            out[backend.name] = f"unavailable: {str(error).splitlines()[0][:80]}"
    return dict(shape=[2 * batch, heads, tokens, dim], ms=out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SiT-XL/2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--gelu-epilogue", action="store_true", help="models/fused.py levers, as in bench_train.py")
    p.add_argument("--fused-norm-modulate", action="store_true")
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "profile_train.json"))
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    latent = args.resolution // 8
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    with torch.device(device):
        model = SiT_models[args.model](input_size=latent, num_classes=1000, encoder_depth=8, crop_start=12,
                                       class_dropout_prob=0.1, uncond_prob=0.9).train()
    ema = [q.detach().clone() for q in model.parameters()]
    loss_fn = LSEPLoss(weights_type="steps", weight_start=0.0225, weight_end=0.03, n_weights=10)
    variant = Variant("ours", compile=args.compile, compile_mode=args.compile_mode, gelu_epilogue=args.gelu_epilogue,
                      fused_norm=args.fused_norm_modulate, fp8=args.fp8)
    runner = StepRunner(variant, model, ema, loss_fn, device)
    x = torch.randn(args.batch_size, 4, latent, latent, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    for _ in range(3):
        runner.step(x, y)

    timer = PhaseTimer(cuda)
    for _ in range(args.steps):
        timed_step(runner, x, y, timer)
    phases = {k: v / args.steps for k, v in timer.durations().items()}
    total = sum(phases.values())
    flops = train_step_flops(SiTFlopsConfig.from_model(model), args.batch_size, probe=True)

    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(2):
            runner.step(x, y)
        if cuda:
            torch.cuda.synchronize()
    kernels = collections.defaultdict(lambda: [0.0, 0])
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "self_device_time_total", 0) if cuda else evt.self_cpu_time_total
        if cuda_us > 0:
            kernels[evt.key][0] += cuda_us / 2 / 1e3
            kernels[evt.key][1] += evt.count // 2
    by_kind = collections.defaultdict(float)
    for name, (ms, _) in kernels.items():
        by_kind[kind_of(name)] += ms
    gpu_total = sum(by_kind.values())

    device_label = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{args.model} batch {args.batch_size} bf16 {variant} on {device_label}, "
          f"torch {torch.__version__}: {flops / 1e12:.2f} TFLOP per step")
    print("\nphase (CUDA events, mean of steps)   ms    share")
    for name, ms in phases.items():
        print(f"  {name:<32} {ms:7.2f} {ms / total:7.1%}")
    print(f"  {'step':<32} {total:7.2f}")
    print("\nkernel kind (profiler, per step)      ms    share")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<32} {ms:7.2f} {ms / gpu_total:7.1%}")
    matmul_ms = by_kind.get("matmul", 0.0)
    if matmul_ms:
        print(f"  matmul FLOP rate: {flops / (matmul_ms / 1e3) / 1e12:.0f} TFLOP/s if every model FLOP is in them")
    attention = attention_backends(model, args.batch_size, device)
    print(f"\nattention forward+backward of one call, q/k/v {attention['shape']} bf16 (blocks 1..encoder_depth "
          f"run at this batch, the rest at half)")
    for name, ms in attention["ms"].items():
        print(f"  {name:<22} " + (f"{ms:7.3f} ms" if isinstance(ms, float) else ms))
    print(f"\ntop {args.top} kernels by GPU time per step")
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]
    for name, (ms, count) in top:
        print(f"  {ms:7.2f} ms {count:5d}x  {kind_of(name)[:10]:<10} {name[:110]}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=args.model, batch_size=args.batch_size, compile=args.compile, variant=asdict(variant),
                       torch=torch.__version__, device=device_label, flops_per_step=flops, phases_ms=phases,
                       kinds_ms=dict(by_kind), attention=attention,
                       top=[dict(name=n, ms=m, count=c) for n, (m, c) in top]), f, indent=1)
    return phases, dict(by_kind), attention


if __name__ == "__main__":
    main()
