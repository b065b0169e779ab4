"""Time one LSEP training step and report it as a fraction of the hardware's peak (MFU).

A step is what train.py does per optimizer step on one device: forward with the probe branch
(label dropout, crop), LSEPLoss (released recipe: ``steps`` weights 0.0225 -> 0.03, 10 bins),
backward, gradient clipping at 1.0, AdamW step (classifier in its own param group), EMA update.
Inputs are fixed random latents (no data loading, no VAE posterior sampling). Model FLOPs come
from ``models.flops`` (3x forward, probe included), identical for every path, so MFU ratios are
speed ratios.

Paths:
  ours       one batch of 2B through blocks 1..encoder_depth, vectorised crop, SDPA attention,
             fused AdamW, one ``torch._foreach_lerp_`` for the EMA (``--compile`` compiles it;
             ``--gelu-epilogue``, ``--fused-norm-modulate``, ``--fp8`` apply models/fused.py).
  reference  the authors' train.py defaults (benchmarks/reference_paths.AUTHORS_TRAINING): probe
             as a second pass, crop by a Python loop over the batch, SDPA attention, fp16 autocast
             with a GradScaler, torch's default AdamW, an EMA loop over parameters; always eager.
             ``--reference-attention manual --reference-precision bf16`` gives the reference used
             for the figures measured before 2026-11-23 (benchmarks/measured/).

Paths are timed interleaved (ABBA order over repetitions, medians) because other processes share
the machine; CUDA is synchronised only around each timed group of steps.

  python benchmarks/bench_train.py --model SiT-B/2 --compare                 # CUDA, batch 64, bf16
  python benchmarks/bench_train.py --model SiT-XL/2 --levers                 # one lever at a time
  python benchmarks/bench_train.py --model SiT-XL/2 --compile --levers gelu-epilogue,fused-norm,cudagraphs
  python benchmarks/bench_train.py --device cpu --precision fp32 --batch-size 2 --compare

Results are appended to ``benchmarks/results/train_<device>.json`` (``--results-dir``).
"""
import argparse
import copy
import ctypes
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.reference_paths import AUTHORS_TRAINING, ReferenceForward, attention_kind, \
    loop_ema_update  # noqa: E402
from loss import LSEPLoss  # noqa: E402
from models import SiT_models  # noqa: E402
from models.fused import add_speed_option_flags, apply_speed_options, clip_grad_norm_into_fused_adamw_, \
    persistent_compile_cache  # noqa: E402
from models.flops import SiTFlopsConfig, mfu, peak_flops, repa_train_step_flops, train_step_flops  # noqa: E402

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
LEVERS = ("probe", "crop", "attention", "precision", "compile", "compile-mode", "optimizer", "ema",
          "gelu-epilogue", "fused-norm", "fp8", "cudagraphs", "clip-in-adamw", "all", "all-fp8")
CUDA_ONLY_LEVERS = ("fused-norm", "fp8", "cudagraphs", "all", "all-fp8")  # Triton, FP8 tensor cores, graphs


@dataclass(frozen=True)
class Variant:
    """One way to run the training step."""
    name: str
    probe: str = "one-batch"      # one-batch | two-pass
    crop: str = "vectorised"      # vectorised | loop (two-pass only; one-batch is always vectorised)
    attention: str = "sdpa"       # sdpa | manual
    precision: str = "bf16"       # bf16 | fp16 | fp32
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode when compile is on
    optimizer: str = "fused"      # fused | fused-clip (clipping inside it) | foreach | for-loop | default
    ema: str = "foreach-lerp"     # foreach-lerp | foreach-mul-add | loop
    gelu_epilogue: bool = False   # models/fused.py levers, applied to a copy sharing the Parameters
    fused_norm: bool = False
    fp8: bool = False

    @property
    def model_levers(self):
        return dict(gelu_epilogue=self.gelu_epilogue, fused_norm_modulate=self.fused_norm, fp8=self.fp8)


def ours_and_reference(args):
    ours = Variant("ours", precision=args.precision, compile=args.compile, compile_mode=args.compile_mode,
                   gelu_epilogue=args.gelu_epilogue, fused_norm=args.fused_norm_modulate, fp8=args.fp8)
    reference = Variant("reference", **{**AUTHORS_TRAINING, "attention": args.reference_attention,
                                        "precision": args.reference_precision})
    return ours, reference


def lever_variants(base, names):
    """(lever, variant) pairs, each flipping one setting of ``base``."""
    out = []
    if "probe" in names:
        out.append(("probe", replace(base, name="two-pass probe", probe="two-pass")))
    if "crop" in names:
        out.append(("crop", replace(base, name="two-pass probe + loop crop", probe="two-pass", crop="loop")))
    if "attention" in names:
        flip = "manual" if base.attention == "sdpa" else "sdpa"
        out.append(("attention", replace(base, name=f"{flip} attention", attention=flip)))
    if "precision" in names:
        flip = "fp32" if base.precision != "fp32" else "bf16"
        out.append(("precision", replace(base, name=f"{flip}", precision=flip)))
    if "compile" in names:
        out.append(("compile", replace(base, name="eager" if base.compile else "compile", compile=not base.compile)))
    if "compile-mode" in names:  # inductor's autotuned (Triton template) matmuls with fused epilogues
        mode = "max-autotune-no-cudagraphs" if base.compile_mode == "default" else "default"
        out.append(("compile-mode", replace(base, name=f"compile {mode}", compile=True, compile_mode=mode)))
    if "optimizer" in names:
        for kind in ("fused", "foreach", "for-loop"):
            if kind != base.optimizer:
                out.append(("optimizer", replace(base, name=f"{kind} AdamW", optimizer=kind)))
    if "ema" in names:
        for kind in ("foreach-lerp", "foreach-mul-add", "loop"):
            if kind != base.ema:
                out.append(("ema", replace(base, name=f"{kind} EMA", ema=kind)))
    if "gelu-epilogue" in names:  # fc1 + GELU as one cuBLASLt GEMM, pre-activation recomputed in backward
        flip = not base.gelu_epilogue
        out.append(("gelu-epilogue", replace(base, name=f"gelu epilogue {'on' if flip else 'off'}",
                                             gelu_epilogue=flip, fp8=base.fp8 and not flip)))
    if "fused-norm" in names:  # Triton LayerNorm+modulate and gate+residual
        flip = not base.fused_norm
        out.append(("fused-norm", replace(base, name=f"fused norm {'on' if flip else 'off'}", fused_norm=flip)))
    if "fp8" in names:  # torchao float8 for the block matmuls (not equal numerics)
        flip = not base.fp8
        out.append(("fp8", replace(base, name=f"fp8 {'on' if flip else 'off'}", fp8=flip,
                                   gelu_epilogue=base.gelu_epilogue and not flip)))
    cudagraphs = dict(compile=True, compile_mode="max-autotune" if "max-autotune" in base.compile_mode
                      else "reduce-overhead")
    if "cudagraphs" in names:  # the compiled forward and backward replayed as CUDA graphs
        out.append(("cudagraphs", replace(base, name=f"compile {cudagraphs['compile_mode']}", **cudagraphs)))
    if "clip-in-adamw" in names:  # clip_grad_norm_'s scaling pass folded into the fused AdamW kernel
        kind = "fused" if base.optimizer == "fused-clip" else "fused-clip"
        out.append(("clip-in-adamw", replace(base, name=f"{kind} AdamW", optimizer=kind)))
    if "all" in names:  # every equal-numerics lever together
        out.append(("all", replace(base, name="gelu+norm+clip+cudagraphs", gelu_epilogue=True, fused_norm=True,
                                   fp8=False, optimizer="fused-clip", **cudagraphs)))
    if "all-fp8" in names:
        out.append(("all-fp8", replace(base, name="fp8+norm+clip+cudagraphs", gelu_epilogue=False,
                                       fused_norm=True, fp8=True, optimizer="fused-clip", **cudagraphs)))
    return out


class AlignedLoss:
    """REPA + LSEP for the timed step (--enc-type): the frozen encoders (random weights: the same
    FLOPs as the released ones) read the images inside the step, as in train.py; the alignment
    loss times ``proj_coeff`` joins the probe term, so StepRunner stays unchanged."""

    def __init__(self, loss_fn, encoders, images, proj_coeff):
        self.loss_fn, self.encoders, self.images, self.proj_coeff = loss_fn, encoders, images, proj_coeff

    def __call__(self, model, x, model_kwargs):
        zs = [encoder(self.images) for encoder in self.encoders]
        terms = self.loss_fn(model, x, model_kwargs, zs=zs)
        return terms._replace(probe=terms.probe + self.proj_coeff * terms.alignment)


def shared_copy(model):
    """A copy of ``model``'s modules holding the very same Parameters and buffers (no extra memory),
    so levers that swap submodules can be timed against the unchanged model on the same weights."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


#################################################################################
#                                 The training step                             #
#################################################################################

def make_optimizer(model, kind, lr=1e-4, lr_class=1e-4):
    """AdamW as in the recipe (classifier in its own group, no weight decay), implementation ``kind``."""
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier.")]
    groups = [dict(params=backbone, lr=lr), dict(params=list(model.classifier.parameters()), lr=lr_class)]
    impl = {"fused": dict(fused=True), "fused-clip": dict(fused=True), "foreach": dict(foreach=True),
            "for-loop": dict(foreach=False), "default": {}}
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **impl[kind])


class StepRunner:
    """Holds one variant's forward, optimizer and scaler; ``step`` runs one training step."""

    def __init__(self, variant, model, ema_params, loss_fn, device, clip_grad=1.0, decay=0.9999):
        if any(variant.model_levers.values()):
            model = apply_speed_options(shared_copy(model), **variant.model_levers)
        self.variant, self.model, self.loss_fn, self.device = variant, model, loss_fn, device
        self.clip_grad, self.decay = clip_grad, decay
        if variant.probe == "one-batch":
            forward = model
        else:
            forward = ReferenceForward(model, attention=variant.attention, crop=variant.crop)
        self.forward = torch.compile(forward, mode=variant.compile_mode) if variant.compile else forward
        self.optimizer = make_optimizer(model, variant.optimizer)
        self.scaler = torch.amp.GradScaler(device.type, enabled=variant.precision == "fp16")
        self.params = [p for p in model.parameters()]
        self.trainable = [p for p in self.params if p.requires_grad]
        self.param_values = [p.detach() for p in self.params]
        self.ema_params = ema_params

    def update_ema(self):
        kind, decay = self.variant.ema, self.decay
        with torch.no_grad():
            if kind == "foreach-lerp":  # ema += (1 - decay) (p - ema): one kernel family, one pass
                torch._foreach_lerp_(self.ema_params, self.param_values, 1.0 - decay)
            elif kind == "foreach-mul-add":
                torch._foreach_mul_(self.ema_params, decay)
                torch._foreach_add_(self.ema_params, self.param_values, alpha=1.0 - decay)
            else:
                loop_ema_update(self.ema_params, self.param_values, decay)

    def step(self, x, y):
        v = self.variant
        dtype = AMP_DTYPES[v.precision]
        with attention_kind(self.model, fused=v.attention == "sdpa"), \
                torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            terms = self.loss_fn(self.forward, x, dict(y=y))
            denoising, probe_loss = terms.denoising, terms.probe
            loss = denoising.mean() + probe_loss
        self.scaler.scale(loss).backward()
        if self.clip_grad and v.optimizer == "fused-clip" and not self.scaler.is_enabled():
            clip_grad_norm_into_fused_adamw_(self.optimizer, self.trainable, self.clip_grad)
        elif self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.update_ema()


#################################################################################
#                             Timing and memory                                 #
#################################################################################

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim():
    """Hand freed heap pages back to the OS so RSS counts live memory, not glibc's cache."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory(device):
    """CUDA: reset the allocator's peak. CPU: trim the heap, reset the peak RSS (VmHWM) if allowed."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return (_proc_status_kib("VmRSS") or 0) * 1024


def peak_memory(device, baseline):
    """CUDA: peak allocated bytes. CPU: peak RSS minus the RSS before the timed steps."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _proc_status_kib("VmHWM")
    return None if hwm is None else max(0, hwm * 1024 - baseline)


def is_oom(error):
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def time_interleaved(runners, x, y, device, warmup, reps, steps_per_rep):
    """Median seconds per step and peak memory of each runner, timed in ABBA order.

    A runner that runs out of memory is reported as "OOM" and dropped; the others go on.
    """
    stats = {r.variant.name: dict(times=[], memory=0, error=None) for r in runners}
    live = list(runners)

    def run(runner, steps):
        try:
            for _ in range(steps):
                runner.step(x, y)
            synchronize(device)
            return True
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_oom(error):
                raise
        # Out of memory: free this runner's state outside the except block (its traceback held tensors).
        stats[runner.variant.name]["error"] = "OOM"
        live.remove(runner)
        runner.optimizer.zero_grad(set_to_none=True)
        runner.optimizer.state.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return False

    for runner in list(live):
        t0 = time.perf_counter()
        if run(runner, warmup):
            stats[runner.variant.name]["warmup_s"] = time.perf_counter() - t0
    for rep in range(reps):
        for runner in (list(live) if rep % 2 == 0 else live[::-1]):
            synchronize(device)
            baseline = reset_peak_memory(device)
            t0 = time.perf_counter()
            if not run(runner, steps_per_rep):
                continue
            stats[runner.variant.name]["times"].append((time.perf_counter() - t0) / steps_per_rep)
            mem = peak_memory(device, baseline)
            if mem is not None:
                stats[runner.variant.name]["memory"] = max(stats[runner.variant.name]["memory"], mem)
    return stats


def summarise(variant, stat, batch, flops_per_step, peak):
    times = stat["times"]
    row = dict(name=variant.name, variant=asdict(variant), error=stat["error"], warmup_s=stat.get("warmup_s"))
    if not times:
        return row
    median = statistics.median(times)
    row.update(
        step_ms=1e3 * median, step_ms_min=1e3 * min(times), step_ms_max=1e3 * max(times), reps=len(times),
        samples_per_s=batch / median, tflops_per_s=flops_per_step / median / 1e12,
        mfu=mfu(flops_per_step, median, peak), peak_memory_bytes=stat["memory"],
        times_ms=[round(1e3 * t, 3) for t in times],
    )
    return row


#################################################################################
#                                   Reporting                                   #
#################################################################################

def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def format_row(row, memory_label):
    if "step_ms" not in row:
        return f"{row['name']:<30} {row['error'] or 'no result'}"
    mfu_text = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    mem = row["peak_memory_bytes"]
    mem_text = "n/a" if not mem else f"{mem / 2**30:.2f} GiB"
    return (f"{row['name']:<30} {row['step_ms']:>9.1f} ({row['step_ms_min']:.1f}-{row['step_ms_max']:.1f})"
            f" {row['samples_per_s']:>9.2f} {row['tflops_per_s']:>8.3f} {mfu_text:>6} {mem_text:>10} {memory_label}")


def print_table(title, rows, memory_label):
    print(f"\n{title}")
    print(f"{'path':<30} {'step ms (min-max)':>24} {'samples/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'memory':>10}")
    for row in rows:
        print(format_row(row, memory_label))


def speed_ratio(fast, slow):
    """Median over repetitions of slow / fast step time, each pair timed back to back (>1: ``fast``
    is faster); pairing cancels most of the load drift of a shared machine. None if one failed."""
    if "times_ms" in fast and "times_ms" in slow:
        return statistics.median(s / f for f, s in zip(fast["times_ms"], slow["times_ms"]))
    return None


def append_json(path, record):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    runs = []
    if os.path.exists(path):
        with open(path) as f:
            try:
                runs = json.load(f)
            except json.JSONDecodeError:
                runs = []
    runs.append(record)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(runs, f, indent=1)
    os.replace(tmp, path)


#################################################################################
#                                     Main                                      #
#################################################################################

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=None, choices=sorted(SiT_models), metavar="MODEL",
                   help="one or more SiT configs (default: SiT-B/2 SiT-XL/2 on CUDA, SiT-B/2 on CPU)")
    p.add_argument("--resolution", type=int, default=256, help="image pixels; the latent side is resolution / 8")
    p.add_argument("--batch-size", type=int, default=None, help="per device (default: 64 on CUDA, 4 on CPU)")
    p.add_argument("--precision", default=None, choices=sorted(AMP_DTYPES),
                   help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--allow-tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls for fp32 (the recipe's --allow-tf32); sets the fp32 peak used for MFU")
    p.add_argument("--compile", action="store_true", help="torch.compile our path (the reference stays eager)")
    add_speed_option_flags(p)  # --compile-mode --compile-cache --gelu-epilogue --fused-norm-modulate --fp8 (ours only)
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="ours: recompute block activations in the backward pass (train.py --grad-checkpoint)")
    p.add_argument("--reference-attention", default="sdpa", choices=["sdpa", "manual"],
                   help="reference attention (sdpa: the authors' train.py default)")
    p.add_argument("--reference-precision", default=None, choices=sorted(AMP_DTYPES),
                   help="reference autocast dtype (default: fp16 + GradScaler on CUDA, the authors' default; "
                        "--precision on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compare", action="store_true", help="also time the reference path, interleaved")
    p.add_argument("--levers", nargs="?", const="all", default=None,
                   help=f"time one change at a time against ours: 'all' or a comma list of {','.join(LEVERS)} "
                        "(on CPU, 'all' leaves out compile)")
    p.add_argument("--encoder-depth", type=int, default=8)
    p.add_argument("--crop-start", type=int, default=12, help="probe crop window sides in [crop-start, grid]")
    p.add_argument("--num-classes", type=int, default=1000)
    # REPA alignment (train.py's flags): encoders (random weights) + projectors run in the timed step
    p.add_argument("--enc-type", default="", help="e.g. dinov2-vit-b: time REPA + LSEP (ours only; no --compare)")
    p.add_argument("--align-depth", type=int, default=8)
    p.add_argument("--projector-dim", type=int, default=2048)
    p.add_argument("--proj-coeff", type=float, default=0.5)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per path (default 3 CUDA, 1 CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per path (default 5 CUDA, 3 CPU)")
    p.add_argument("--steps-per-rep", type=int, default=None, help="steps per repetition (default 5 CUDA, 1 CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense peak, TFLOP/s")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); use 1 on a shared machine, where OpenMP threads "
                        "that wait on descheduled peers make 2-thread steps many times slower")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.model = args.model or (["SiT-B/2", "SiT-XL/2"] if cuda else ["SiT-B/2"])
    args.batch_size = args.batch_size or (64 if cuda else 4)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.reference_precision = args.reference_precision or ("fp16" if cuda else args.precision)
    if args.gelu_epilogue and args.fp8:
        p.error("--gelu-epilogue and --fp8 both replace mlp.fc1; choose one")
    if not cuda and (args.fp8 or args.fused_norm_modulate):
        p.error("--fp8 and --fused-norm-modulate need a CUDA GPU (FP8 tensor cores, Triton); leave them off on CPU")
    args.warmup = 3 if args.warmup is None and cuda else (1 if args.warmup is None else args.warmup)
    args.reps = args.reps or (5 if cuda else 3)
    args.steps_per_rep = args.steps_per_rep or (5 if cuda else 1)
    if args.levers is not None:
        names = LEVERS if args.levers == "all" else tuple(s.strip() for s in args.levers.split(","))
        unknown = set(names) - set(LEVERS)
        if unknown:
            p.error(f"--levers: unknown {sorted(unknown)}; choose from {','.join(LEVERS)}")
        if args.levers == "all" and not cuda:  # inductor on 2 CPU cores: minutes; the rest needs a GPU
            names = tuple(n for n in names if not n.startswith("compile") and n not in CUDA_ONLY_LEVERS)
        elif not cuda and set(names) & set(CUDA_ONLY_LEVERS):
            p.error(f"--levers {','.join(sorted(set(names) & set(CUDA_ONLY_LEVERS)))} need a CUDA GPU")
        args.lever_names = names
    if args.resolution % 8:
        p.error(f"--resolution {args.resolution} must be a multiple of 8 (the VAE's downsampling)")
    if args.enc_type and (args.compare or set(getattr(args, "lever_names", ())) & {"probe", "crop"}):
        p.error("--enc-type times ours only: the authors' reference and the two-pass probe have no REPA projectors")
    return args


def main(argv=None):
    """Benchmark every --model; returns the list of JSON records written."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile_cache:
        persistent_compile_cache(args.compile_cache)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
        torch.backends.cudnn.allow_tf32 = args.allow_tf32
    command = " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]) if argv is None \
        else " ".join(["benchmarks/bench_train.py"] + list(argv))
    records = []
    for model_name in args.model:
        records.append(bench_model(args, model_name, device, command))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def bench_model(args, model_name, device, command):
    """Time ours (and the reference / the levers) for one config; append the record to the JSON."""
    torch.manual_seed(args.seed)

    latent = args.resolution // 8
    from models.encoders import ENCODERS, Encoder, create_vit, parse_enc_type

    names = [n for n, _ in parse_enc_type(args.enc_type)]  # REPA (--enc-type): [] when off
    repa = dict(enc_type=tuple(names), z_dims=tuple(ENCODERS[n].z_dim for n in names), align_depth=args.align_depth,
                projector_dim=args.projector_dim) if names else {}
    with torch.device(device):
        model = SiT_models[model_name](
            input_size=latent, num_classes=args.num_classes, encoder_depth=args.encoder_depth,
            crop_start=args.crop_start, class_dropout_prob=0.1, uncond_prob=0.9, **repa,
        ).train()
    model.grad_checkpoint = args.grad_checkpoint  # train.py --grad-checkpoint
    ema_params = [p.detach().clone() for p in model.parameters()]
    loss_fn = LSEPLoss(weights_type="steps", weight_start=0.0225, weight_end=0.03, n_weights=10)
    x = torch.randn(args.batch_size, model.in_channels, latent, latent, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    if names:
        amp = torch.bfloat16 if args.precision != "fp32" else None  # train.py: bf16 under mixed precision
        encoders = [Encoder(n, create_vit(n, args.resolution), args.resolution, amp).to(device) for n in names]
        images = torch.randint(0, 256, (args.batch_size, 3, args.resolution, args.resolution), dtype=torch.uint8,
                               device=device)
        loss_fn = AlignedLoss(loss_fn, encoders, images, args.proj_coeff)

    name = device_name(device)
    cfg = SiTFlopsConfig.from_model(model)
    flops_per_step = train_step_flops(cfg, args.batch_size, probe=True)
    if names:  # encoders forward (frozen) + projectors forward and backward
        flops_per_step += repa_train_step_flops(cfg, names, args.resolution, args.batch_size, args.projector_dim)

    def peak_of(variant):  # fp8 variants too are measured against the bf16 peak: same model FLOPs
        if args.peak_tflops:
            return args.peak_tflops * 1e12
        return peak_flops(name, variant.precision, tf32=args.allow_tf32) if device.type == "cuda" else None

    ours, reference = ours_and_reference(args)
    peak = peak_of(ours)
    memory_label = "peak alloc" if device.type == "cuda" else "RSS delta"
    timing = dict(warmup=args.warmup, reps=args.reps, steps_per_rep=args.steps_per_rep)
    print(f"\n{model_name} {args.resolution}px batch {args.batch_size} {args.precision} compile={args.compile} "
          f"on {name}; torch {torch.__version__}; {flops_per_step / 1e12:.3f} TFLOP per step "
          f"({flops_per_step / args.batch_size / 1e9:.1f} GFLOP per sample); peak "
          f"{'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}; {timing}")

    def runner(variant):
        return StepRunner(variant, model, ema_params, loss_fn, device)

    if args.compare:
        ref = ", ".join(f"{k}={getattr(reference, k)}" for k in ("probe", "crop", "attention", "precision",
                                                                  "optimizer", "ema"))
        print(f"reference: the authors' training structure and settings, eager: {ref}")
    runners = [runner(ours)] + ([runner(reference)] if args.compare else [])
    stats = time_interleaved(runners, x, y, device, **timing)
    rows = [summarise(r.variant, stats[r.variant.name], args.batch_size, flops_per_step, peak_of(r.variant))
            for r in runners]
    print_table("Training step", rows, memory_label)
    ratio = speed_ratio(rows[0], rows[1]) if args.compare else None
    if ratio is not None:
        print(f"ours vs reference: {ratio:.3f}x the reference's speed (median of paired reference/ours step "
              f"times; ratio of medians {rows[1]['step_ms'] / rows[0]['step_ms']:.3f})")

    levers = []
    if args.levers is not None:
        base = runners[0]
        for lever, variant in lever_variants(ours, args.lever_names):
            other = runner(variant)
            lever_stats = time_interleaved([base, other], x, y, device, **timing)
            base_row, row = (summarise(r.variant, lever_stats[r.variant.name], args.batch_size, flops_per_step,
                                       peak_of(r.variant)) for r in (base, other))
            paired = speed_ratio(base_row, row)
            delta = None if paired is None else paired - 1
            levers.append(dict(lever=lever, baseline=base_row, variant=row, step_time_delta=delta))
            del other
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print("\nLevers (one change against ours; delta = median paired change in step time, + is slower)")
        print(f"{'lever':<14} {'variant':<30} {'ours ms':>9} {'variant ms':>10} {'delta':>8} {'MFU':>6}")
        for item in levers:
            b, v = item["baseline"], item["variant"]
            delta = "OOM" if v.get("error") else f"{100 * item['step_time_delta']:+.1f}%"
            mfu_text = "n/a" if v.get("mfu") is None else f"{100 * v['mfu']:.1f}%"
            print(f"{item['lever']:<14} {v['name']:<30} {b.get('step_ms', float('nan')):>9.1f} "
                  f"{v.get('step_ms', float('nan')):>10.1f} {delta:>8} {mfu_text:>6}")

    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    path = os.path.join(args.results_dir, f"train_{slug}.json")
    record = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=command,
        torch=torch.__version__, cuda=torch.version.cuda, device=name, device_type=device.type,
        threads=torch.get_num_threads(), model=model_name, resolution=args.resolution,
        batch_size=args.batch_size, precision=args.precision, compile=args.compile, allow_tf32=args.allow_tf32,
        enc_type=args.enc_type or None, grad_checkpoint=args.grad_checkpoint,
        timing=timing, flops_per_step=flops_per_step, flops_per_sample=flops_per_step / args.batch_size,
        peak_flops=peak, memory=memory_label, paths=rows, ours_speedup_vs_reference=ratio, levers=levers,
        compile_cache=args.compile_cache,
        cudagraph_skips=torch._dynamo.utils.counters["inductor"]["cudagraph_skips"],  # >0: a graph ran eagerly
    )
    append_json(path, record)
    print(f"\nappended to {path}")
    return record


if __name__ == "__main__":
    main()
