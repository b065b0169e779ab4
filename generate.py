"""Sample N images (50k for FID) from a SiT checkpoint into PNGs and one ADM-evaluator ``.npz``.

The method's sampling is described in docs/method.md ("Sampling"); flags in docs/sampling.md. Run with ``torchrun --nproc_per_node G generate.py --ckpt ...``
(NCCL on GPUs, gloo on CPU) or as a plain ``python generate.py`` (one process).

Guarantees, whatever the number of processes, the batch size or how often the run restarts:

* Sample ``i`` gets its label from one draw of all N labels by a generator seeded with
  ``--global-seed``, and its initial noise and SDE noise from a generator of its own seeded with
  ``sample_seed(global_seed, i)`` on the sampling device. CPU and CUDA generators give different
  streams, so a CPU run and a GPU run differ; two runs on the same kind of device share inputs.
* PNG ``{i:06d}.png`` is written atomically (temporary name, then ``os.replace``): a killed run
  leaves only complete PNGs, and a restart samples only the indices that have none.
* The ``.npz`` (``arr_0``: (N, H, W, 3) uint8) is built by rank 0 once all N PNGs exist, streamed
  PNG by PNG into a temporary file that is renamed at the end.

The parts live in ``sampling/``; this file is the flags and the wiring. On CPU the images are byte-identical across process counts and batch sizes (the tests check
this). On GPUs the inputs are identical but cuBLAS may pick other kernels for other batch
shapes, so pixels can differ by rounding.

Defects of the authors' script that we leave behind (docs/differences.md): CUDA + NCCL only,
non-fused attention by default, 4 latent channels and null class 1000 hard-coded, resolution
256/512 only, and no restart.
"""
import argparse
import datetime
import os

import torch
import torch.distributed as dist

from devices import check_cuda
from errors import run_cli
from fileio import OutputError, check_writable, remove_stale_temps
from flagcheck import AT_LEAST_1, POSITIVE, UNIT, check_ranges
from models.config import MODEL_NAMES, PATH_TYPES
from provenance import code_version
from samplers import DOPRI5_ATOL, DOPRI5_RTOL
from sampling.errors import GenerateError
from sampling.identity import (check_sample_folder, identity_key, read_folder_identity, read_npz_identity,
                               sample_set_identity, write_folder_identity)
from sampling.npz import missing_indices, nfe_summary, npz_is_complete, png_path, write_npz
from sampling.run import sample_indices
from sampling.setup import (decoder_spec, image_resolution, load_guide, load_sampling_model, open_decoder,
                            sample_folder)


def setup_distributed(device_flag):
    """(rank, world_size, device). torchrun's env vars -> a process group (NCCL on CUDA, gloo
    on CPU); without them, one process and no group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_flag is None:  # the GPU when torch can use one; a GPU it cannot use is one line
        check_cuda("generate.py")
        device_flag = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_flag)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            check_cuda("--device cuda")
            raise GenerateError("--device cuda but no GPU is visible; use --device cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if "RANK" in os.environ and world_size > 1:
        # Long timeout: ranks wait at the barrier while the others finish their last batches.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
    return rank, world_size, device


@torch.no_grad()
def main(args):
    """Sample the missing indices of the sample set and build its npz; returns the folder path."""
    rank, world_size, device = setup_distributed(args.device)
    distributed = dist.is_initialized()
    torch.backends.cuda.matmul.allow_tf32 = args.precision != "fp32"
    torch.backends.cudnn.allow_tf32 = args.precision != "fp32"
    if not args.print_npz_path:  # before any work: a read-only --sample_dir costs seconds, not a run
        check_writable(args.sample_dir, "--sample_dir")

    # ---- model, decoder, and the identity of the sample set they make ----
    loaded = load_sampling_model(args, hash_weights=rank == 0)
    guide = load_guide(args, loaded, hash_weights=rank == 0)  # None without --guide-ckpt
    config, spec = loaded.config, decoder_spec(args, loaded.config)
    vae, decoder, channels, factor = open_decoder(spec, loaded, device)
    resolution = image_resolution(args, config, factor)
    folder = sample_folder(args, config, resolution, spec)
    npz_path = f"{folder}.npz"
    if args.print_npz_path:
        if rank == 0:
            print(npz_path)
        return folder

    # ---- rank 0 checks the folder and lists what is missing; every rank gets the same list ----
    plan = [None]
    if rank == 0:
        identity = sample_set_identity(args, loaded, decoder, resolution, device, guide)
        try:
            remove_stale_temps(args.sample_dir)  # npz temporaries of killed runs (the folder's: missing_indices)
            check_sample_folder(folder, identity)
            shape = (args.num_fid_samples, resolution, resolution, 3)
            if npz_is_complete(npz_path, shape) and identity_key(read_npz_identity(npz_path)) == identity_key(identity):
                plan = [("done", f"{npz_path} already holds all {args.num_fid_samples} samples of this checkpoint "
                                 "and these settings; nothing to do.")]
            else:
                write_folder_identity(folder, {**identity, "code": code_version()})
                todo = missing_indices(folder, args.num_fid_samples)
                plan = [("todo", todo)]
                print(f"Saving .png samples at {folder}: {len(todo)} of {args.num_fid_samples} to sample on "
                      f"{world_size} process(es), device {device.type}, precision {args.precision}")
                print(f"Model {config.describe()}; EMA weights sha256 {loaded.weights_sha256[:12]} "
                      f"({loaded.report.summary()})")
                if guide is not None:
                    print(f"Autoguidance by {guide.config.describe()}; its {guide.which} weights sha256 "
                          f"{guide.weights_sha256[:12]} ({guide.report.summary()})")
                print(f"Sampler: {sampler_cost(args, guide is not None)}")
        except (GenerateError, OutputError) as exc:
            plan = [("error", str(exc))]
    if distributed:
        dist.broadcast_object_list(plan, src=0)
    kind, payload = plan[0]
    if kind == "error":
        raise GenerateError(payload)
    if kind == "done":
        if rank == 0:
            print(payload)
        return folder

    if payload:
        counts = sample_indices(args, loaded.model, loaded.config, vae, payload, folder, rank, world_size, device,
                                channels, guide=None if guide is None else guide.model)
        if counts and rank == 0:
            nfe = [n for n, _ in counts.values()]
            print(f"dopri5: {sum(nfe) / len(nfe):.1f} velocity evaluations per sample on this process "
                  f"(min {min(nfe)}, max {max(nfe)}, {len(nfe)} samples)")
    if distributed:
        dist.barrier()
    if rank == 0:
        left = missing_indices(folder, args.num_fid_samples)
        if left:
            print(f"{len(left)} samples still missing (stopped by --max-batches); rerun to finish.")
        else:
            identity = read_folder_identity(folder)[0]
            nfe = nfe_summary(folder, args.num_fid_samples) if args.solver == "dopri5" else None
            if nfe is not None:  # measured, so recorded with the sample set (not part of its identity key)
                identity = {**identity, "nfe": nfe}
                write_folder_identity(folder, identity)
                print(f"NFE per sample: mean {nfe['mean']:.1f} (min {nfe['min']}, max {nfe['max']}) velocity "
                      f"evaluations, {nfe['forward_passes_mean']:.1f} forward passes with the guided ones "
                      f"counted twice, over all {nfe['samples']} samples; stored in provenance.json and the npz")
            shape = write_npz(folder, args.num_fid_samples, npz_path, identity)
            print(f"Saved {npz_path} [shape={shape}].")
            if not args.keep_pngs:
                for i in range(args.num_fid_samples):
                    os.remove(png_path(folder, i))
    if distributed:
        dist.destroy_process_group()
    return folder


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Sample images from a SiT checkpoint for FID (docs/sampling.md).")
    # seed and precision
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on Ampere+ GPUs (same as --precision tf32; --no-tf32 = fp32)")
    parser.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None,
                        help="model precision (default: tf32, or fp32 with --no-tf32); bf16 = autocast, "
                             "the sampler state stays float64")
    parser.add_argument("--bf16", action="store_true", help="same as --precision bf16")
    parser.add_argument("--device", default=None,
                        help="cuda or cpu; default: the GPU when torch can use one, else the CPU")
    # checkpoint and output
    parser.add_argument("--ckpt", type=str, default=None, help="checkpoint .pt (ours or the authors'); EMA weights")
    parser.add_argument("--sample_dir", "--sample-dir", dest="sample_dir", type=str, default="samples")
    parser.add_argument("--name_add", "--name-add", dest="name_add", type=str, default="")
    parser.add_argument("--keep-pngs", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the PNG folder after the npz is built (it is what makes restart possible)")
    # model
    # model: the checkpoint knows these; given, they must agree with it (bare state dicts need --model)
    parser.add_argument("--model", type=str, choices=MODEL_NAMES, metavar="MODEL", default=None,
                        help="default: the checkpoint's; needed only for bare state dicts of table sizes "
                             "(SiT-XL/2 is assumed from the weights' width otherwise)")
    parser.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, else 1000")
    parser.add_argument("--encoder-depth", type=int, default=None,
                        help="probe depth (names the folder; the probe does not run when sampling); "
                             "default: the checkpoint's, else 8")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side; default: the model's input side x the VAE factor")
    parser.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the checkpoint's (its weights show it)")
    parser.add_argument("--vae", type=str, default=None,
                        help="ema | mse | hub name | local save_pretrained folder | none; default: none for a "
                             "pixel-space model, else ema (the authors' choice)")
    # number of samples
    parser.add_argument("--per-proc-batch-size", type=int, default=32)
    parser.add_argument("--num-fid-samples", type=int, default=50_000)
    parser.add_argument("--balanced-labels", action="store_true",
                        help="exactly N / num_classes samples per class (default: uniform at random)")
    # sampler
    parser.add_argument("--mode", choices=["ode", "sde"], default="ode")
    parser.add_argument("--cfg-scale", type=float, default=1.5,
                        help="guidance weight (1 = none): CFG with the null label, or autoguidance with --guide-ckpt")
    parser.add_argument("--path-type", choices=PATH_TYPES, default=None,
                        help="default: the checkpoint's (it records the interpolant it was trained on), else linear")
    parser.add_argument("--num-steps", type=int, default=50, help="Euler/Heun/SDE steps (dopri5 picks its own)")
    parser.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False, help="ODE only")
    parser.add_argument("--solver", choices=["euler", "heun", "dopri5"], default=None,
                        help="ODE solver; default: heun with --heun, else euler; dopri5 = torchdiffeq's adaptive "
                             "Dormand-Prince with --atol/--rtol")
    parser.add_argument("--atol", type=float, default=None, help=f"dopri5 only (default {DOPRI5_ATOL:g})")
    parser.add_argument("--rtol", type=float, default=None, help=f"dopri5 only (default {DOPRI5_RTOL:g})")
    parser.add_argument("--guidance-low", type=float, default=0.0)
    parser.add_argument("--guidance-high", type=float, default=1.0)
    parser.add_argument("--guide-ckpt", type=str, default=None,
                        help="autoguidance: guide with this (smaller or less trained) checkpoint instead of the "
                             "null label, v = v_guide + cfg_scale (v_main - v_guide)")
    parser.add_argument("--guide-weights", choices=["ema", "model"], default=None,
                        help="which weights of --guide-ckpt (default ema)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (compiles once per batch shape, then each step is faster)")
    parser.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # tests: eager
    parser.add_argument("--print-npz-path", action="store_true",
                        help="print the npz path these flags write to, and exit (main_LSEP.sh uses it)")
    # debugging: stop each process after this many batches (simulates a killed run)
    parser.add_argument("--max-batches", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.ckpt is None:
        parser.error("--ckpt is required (a checkpoint .pt from train.py or the authors' release)")
    if not os.path.exists(args.ckpt):  # a folder is named as one by the loader
        parser.error(f"--ckpt {args.ckpt} does not exist")
    if args.cfg_scale < 1.0:
        parser.error(f"--cfg-scale {args.cfg_scale} < 1 is not guidance; use 1 for unguided sampling")
    if args.bf16:
        if args.precision not in (None, "bf16"):
            parser.error(f"--bf16 contradicts --precision {args.precision}")
        args.precision = "bf16"
    if args.precision is None:
        args.precision = "tf32" if args.tf32 else "fp32"
    check_ranges(parser, args, {"num_fid_samples": AT_LEAST_1, "per_proc_batch_size": AT_LEAST_1,
                                "num_steps": AT_LEAST_1, "guidance_low": UNIT, "guidance_high": UNIT,
                                "atol": POSITIVE, "rtol": POSITIVE})
    if args.mode == "sde" and args.num_steps < 2:
        parser.error("--mode sde needs --num-steps >= 2")
    if args.cfg_scale > 1.0 and not args.guidance_low < args.guidance_high:
        parser.error(f"--guidance-low {args.guidance_low} must be below --guidance-high {args.guidance_high} "
                     f"with --cfg-scale {args.cfg_scale} > 1 (an empty interval turns guidance off; use --cfg-scale 1)")
    if args.global_seed < 0:
        parser.error("--global-seed must be >= 0")
    check_solver(parser, args)
    if args.guide_ckpt is None:
        if args.guide_weights is not None:
            parser.error("--guide-weights applies to --guide-ckpt; pass --guide-ckpt or drop it")
    else:
        if not os.path.exists(args.guide_ckpt):
            parser.error(f"--guide-ckpt {args.guide_ckpt} does not exist")
        args.guide_weights = args.guide_weights or "ema"
    return args


def check_solver(parser, args):
    """--solver, --heun, --atol, --rtol: one ODE solver. Sets ``args.solver`` (euler/heun/dopri5),
    ``args.heun`` (True for heun) and, for dopri5, the tolerances' defaults."""
    if args.solver is not None and args.mode != "ode":
        parser.error(f"--solver {args.solver} is an ODE solver; drop it with --mode {args.mode}")
    if args.solver in ("euler", "dopri5") and args.heun:
        parser.error(f"--heun contradicts --solver {args.solver}; pass one of them")
    if args.solver == "heun":
        args.heun = True
    args.solver = args.solver or ("heun" if args.heun else "euler")
    if args.solver != "dopri5":
        for flag in ("atol", "rtol"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag} applies to --solver dopri5 only; drop it or pass --mode ode --solver dopri5")
        return
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        parser.error("--solver dopri5 needs the torchdiffeq package; pip install torchdiffeq (requirements.txt)")
    args.atol = DOPRI5_ATOL if args.atol is None else args.atol
    args.rtol = DOPRI5_RTOL if args.rtol is None else args.rtol


def sampler_cost(args, guided):
    """One line: the solver and what a sample costs in model evaluations."""
    pair = "main + guide" if guided else "conditional + null label"
    if args.mode == "sde":
        return (f"sde Euler-Maruyama, {args.num_steps} velocity evaluations per sample; guided ones run two "
                f"forward passes ({pair})")
    if args.solver == "dopri5":
        return (f"ode dopri5 (--atol {args.atol:g}, --rtol {args.rtol:g}): adaptive, its evaluations per sample are "
                f"counted and reported at the end; guided ones run two forward passes ({pair})")
    nfe = 2 * args.num_steps - 1 if args.heun else args.num_steps
    return (f"ode {args.solver}, {args.num_steps} steps = {nfe} velocity evaluations per sample; guided ones run "
            f"two forward passes ({pair})")


def cli(argv=None):
    """Exit 2 for every error the user must fix: flags, checkpoint, decoder, output folder, full disk."""
    run_cli(lambda a: main(parse_args(a)), argv, prefix="generate.py: error: ", exit_code=2)


if __name__ == "__main__":
    cli()
