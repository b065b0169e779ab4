"""Sample N images (50k for FID) from a SiT checkpoint into PNGs and one ADM-evaluator ``.npz``.

Spec: ``LSEP_SPEC.md`` section 6. Run with ``torchrun --nproc_per_node G generate.py --ckpt ...``
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

On CPU the images are byte-identical across process counts and batch sizes (the tests check
this). On GPUs the inputs are identical but cuBLAS may pick other kernels for other batch
shapes, so pixels can differ by rounding.

Defects of the authors' script that we leave behind (spec section 8): CUDA + NCCL only,
non-fused attention by default, 4 latent channels and null class 1000 hard-coded, resolution
256/512 only, and no restart.
"""
import argparse
import datetime
import json
import os
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from models import SiT, SiT_models
from models.checkpoint import (SIZE_KWARGS, CheckpointError, checkpoint_model_kwargs, extract_state_dict,
                               load_checkpoint_file, load_state_into)
from models.vae import (VAEWeightsMissing, decode_to_uint8, downsample_factor, latent_channels, load_vae,
                        pixels_to_uint8)
from samplers import euler_maruyama_sampler, euler_sampler
from seeding import derive_seed


class GenerateError(RuntimeError):
    """A user-fixable problem found after parsing (checkpoint vs flags); printed as one line."""


#################################################################################
#                         Seeds, labels and noise per index                     #
#################################################################################

def sample_seed(global_seed, index):
    """63-bit seed of sample ``index``: a hash of (global_seed, index), so no two indices or
    seeds share a stream and none collides with the label generator's seed."""
    return derive_seed("lsep-sample", global_seed, index)


def sample_labels(num_samples, num_classes, global_seed, balanced=False):
    """(N,) int64 labels on CPU for all indices at once, from a generator seeded by global_seed.

    Uniform at random (the authors' choice) or balanced: each class exactly N / num_classes
    times, in a fixed random order.
    """
    gen = torch.Generator().manual_seed(global_seed)
    if not balanced:
        return torch.randint(0, num_classes, (num_samples,), generator=gen)
    if num_samples % num_classes:
        raise GenerateError(f"--balanced-labels needs --num-fid-samples ({num_samples}) divisible by "
                            f"the number of classes ({num_classes})")
    classes = torch.arange(num_classes).repeat_interleave(num_samples // num_classes)
    return classes[torch.randperm(num_samples, generator=gen)]


def sample_noise(indices, shape, num_sde_steps, global_seed, device):
    """Initial noise (B, *shape) and SDE noise (num_sde_steps, B, *shape) or None, float32.

    Each sample draws its start, then its SDE noise, from its own generator on ``device``. The
    SDE noise is held for the whole batch: (num_steps - 1) x C x h x w x 4 bytes per sample,
    249 x 4 x 32 x 32 x 4 B ~ 4 MB at 256 px with 250 steps (130 MB for a batch of 32).
    """
    starts, steps = [], []
    for index in indices:
        gen = torch.Generator(device=device).manual_seed(sample_seed(global_seed, index))
        starts.append(torch.randn(shape, generator=gen, device=device))
        if num_sde_steps:
            steps.append(torch.randn((num_sde_steps, *shape), generator=gen, device=device))
    return torch.stack(starts), (torch.stack(steps, dim=1) if steps else None)


#################################################################################
#                          Model, VAE and output folder                         #
#################################################################################

def vae_name(spec):
    """The ``vae-<name>`` part of the folder name: ema/mse/none, else the path's basename."""
    return spec if spec in ("ema", "mse", "none") else os.path.basename(os.path.normpath(spec))


def sample_folder(args):
    """``<sample_dir>/<folder>``, named exactly as the authors' generate.py names it."""
    model = args.model.replace("/", "-")
    ckpt = os.path.basename(args.ckpt).removesuffix(".pt")
    name = (f"{model}-enc{args.encoder_depth}-{ckpt}-size-{args.resolution}-vae-{vae_name(args.vae)}-"
            f"cfg-{args.cfg_scale}-seed-{args.global_seed}-{args.mode}-{args.name_add}")
    return os.path.join(args.sample_dir, name)


def resolve_model_flags(args, ckpt_kwargs):
    """Fill --num-classes and --qk-norm from the checkpoint's model kwargs (else the authors'
    defaults 1000 and off); a flag given explicitly must agree with the checkpoint."""
    for flag, default in (("num_classes", 1000), ("qk_norm", False)):
        given = getattr(args, flag)
        stored = (ckpt_kwargs or {}).get(flag)
        if given is not None and stored is not None and given != stored:
            raise GenerateError(f"--{flag.replace('_', '-')} {given} contradicts the checkpoint, "
                                f"which was trained with {flag}={stored}; drop the flag")
        setattr(args, flag, given if given is not None else stored if stored is not None else default)


def build_model(args, ckpt_kwargs, in_channels, latent_size):
    """The SiT to sample from: the checkpoint's own kwargs when it has them, else ``--model``."""
    if ckpt_kwargs is None:
        model = SiT_models[args.model](
            input_size=latent_size, in_channels=in_channels, num_classes=args.num_classes,
            encoder_depth=args.encoder_depth, qk_norm=args.qk_norm, fused_attn=args.fused_attn,
        )
    else:
        kwargs = {**ckpt_kwargs, "fused_attn": args.fused_attn}
        build = SiT if all(k in kwargs for k in SIZE_KWARGS) else SiT_models[args.model]
        model = build(**kwargs)
    if model.in_channels != in_channels:
        raise GenerateError(f"the checkpoint's model has {model.in_channels} input channels but --vae "
                            f"{args.vae} gives {in_channels}; pick the VAE (or 'none') it was trained with")
    if model.input_size != latent_size:
        raise GenerateError(f"the checkpoint's model takes {model.input_size}x{model.input_size} inputs but "
                            f"--resolution {args.resolution} with --vae {args.vae} gives {latent_size}; "
                            f"fix --resolution")
    return model


def check_resolution(args, factor, patch_size):
    step = factor * patch_size
    if args.resolution % step:
        raise GenerateError(f"--resolution {args.resolution} must be a multiple of {step} "
                            f"(VAE factor {factor} x patch {patch_size})")


class Autocast(torch.nn.Module):
    """Runs the wrapped model under bf16 autocast; the sampler's state stays float64."""

    def __init__(self, module, device_type):
        super().__init__()
        self.module = module  # samplers.unwrap_model finds num_classes through .module
        self.device_type = device_type

    def forward(self, x, t, y):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.module(x, t, y)


#################################################################################
#                              PNGs and the npz file                            #
#################################################################################

def png_path(folder, index):
    return os.path.join(folder, f"{index:06d}.png")


def save_png_atomic(image, path):
    """Write a PNG under a temporary name in the same folder, then rename it into place."""
    tmp = f"{os.path.dirname(path)}/.tmp-{os.getpid()}-{os.path.basename(path)}"
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def missing_indices(folder, num_samples):
    """Indices in [0, N) without a PNG, after removing temporary files a killed run left."""
    names = set()
    for name in os.listdir(folder):
        if name.startswith(".tmp-"):
            os.remove(os.path.join(folder, name))
        else:
            names.add(name)
    return [i for i in range(num_samples) if f"{i:06d}.png" not in names]


# Settings that change the images but not the authors' folder name; kept in the folder so a
# restart with other values cannot mix two kinds of samples.
UNNAMED_SETTINGS = ("num_fid_samples", "balanced_labels", "num_steps", "heun", "guidance_low", "guidance_high",
                    "path_type")


def check_folder_settings(folder, args, record=False):
    """Check UNNAMED_SETTINGS against ``<folder>/settings.json`` when the folder holds samples;
    ``record`` (rank 0) writes the current ones otherwise."""
    path = os.path.join(folder, "settings.json")
    settings = {key: getattr(args, key) for key in UNNAMED_SETTINGS}
    stored = None
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
    if stored == settings:
        return
    has_samples = os.path.exists(f"{folder}.npz") or (
        os.path.isdir(folder) and any(name.endswith(".png") for name in os.listdir(folder)))
    if stored is not None and has_samples:
        differ = [f"--{k.replace('_', '-')} {stored.get(k)} there, {v} now" for k, v in settings.items()
                  if stored.get(k) != v]
        raise GenerateError(f"{folder} holds samples made with other settings ({'; '.join(differ)}); "
                            f"use another --name_add or --sample_dir")
    if record:
        os.makedirs(folder, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(settings, f, indent=1)
        os.replace(path + ".tmp", path)


def npz_is_complete(path, shape):
    """True when ``path`` is an npz whose ``arr_0`` is a full uint8 array of ``shape``."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            found_shape, fortran, dtype = read_header(f)
            size = zf.getinfo("arr_0.npy").file_size
            return (tuple(found_shape) == tuple(shape) and dtype == np.uint8 and not fortran
                    and size - f.tell() == int(np.prod(shape)))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def write_npz(folder, num_samples, path):
    """Stream PNGs 0..N-1 into ``path`` as ``arr_0`` (N, H, W, 3) uint8, the layout np.savez
    writes (a stored zip entry ``arr_0.npy``), without holding all N images in memory."""
    first = np.asarray(Image.open(png_path(folder, 0)).convert("RGB"))
    shape = (num_samples, *first.shape)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                          "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(f, header)
                for i in tqdm(range(num_samples), desc="Building .npz", mininterval=5):
                    image = np.asarray(Image.open(png_path(folder, i)))
                    if image.shape != first.shape or image.dtype != np.uint8:
                        raise GenerateError(f"{png_path(folder, i)} is {image.dtype} {image.shape}, expected "
                                            f"uint8 {first.shape}; delete it and rerun to resample it")
                    f.write(np.ascontiguousarray(image).tobytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return shape


#################################################################################
#                                    Sampling                                   #
#################################################################################

def setup_distributed(device_flag):
    """(rank, world_size, device). torchrun's env vars -> a process group (NCCL on CUDA, gloo
    on CPU); without them, one process and no group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(device_flag)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GenerateError("--device cuda but no GPU is visible; use --device cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if "RANK" in os.environ and world_size > 1:
        # Long timeout: ranks wait at the barrier while the others finish their last batches.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
    return rank, world_size, device


def sample_batch(model, indices, labels, args, shape, device):
    """Sampler output (B, C, h, w) float64 (latents, or pixels in [-1, 1]) for a list of indices."""
    num_sde_steps = args.num_steps - 1 if args.mode == "sde" else 0
    z, noise = sample_noise(indices, shape, num_sde_steps, args.global_seed, device)
    y = labels[indices].to(device)
    kwargs = dict(model=model, latents=z, y=y, num_steps=args.num_steps, heun=args.heun,
                  cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
                  guidance_high=args.guidance_high, path_type=args.path_type)
    if args.mode == "sde":
        return euler_maruyama_sampler(**kwargs, noise=noise)
    return euler_sampler(**kwargs)


@torch.no_grad()
def main(args):
    folder = sample_folder(args)
    npz_path = f"{folder}.npz"
    check_folder_settings(folder, args)
    if npz_is_complete(npz_path, (args.num_fid_samples, args.resolution, args.resolution, 3)):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{npz_path} already holds all {args.num_fid_samples} samples; nothing to do.")
        return
    rank, world_size, device = setup_distributed(args.device)
    distributed = dist.is_initialized()
    torch.backends.cuda.matmul.allow_tf32 = args.precision != "fp32"
    torch.backends.cudnn.allow_tf32 = args.precision != "fp32"

    # Rank 0 lists what is missing before anyone writes, so all ranks split the same list.
    if rank == 0:
        check_folder_settings(folder, args, record=True)
        todo = [missing_indices(folder, args.num_fid_samples)]
        print(f"Saving .png samples at {folder}: {len(todo[0])} of {args.num_fid_samples} to sample "
              f"on {world_size} process(es), device {device.type}, precision {args.precision}")
    else:
        todo = [None]
    if distributed:
        dist.broadcast_object_list(todo, src=0)
    todo = todo[0]

    if todo:
        checkpoint = load_checkpoint_file(args.ckpt)
        ckpt_kwargs = checkpoint_model_kwargs(checkpoint)
        resolve_model_flags(args, ckpt_kwargs)
        if args.vae == "none":
            vae, channels, factor = None, 3, 1
        else:
            vae = load_vae(args.vae, device)
            channels, factor = latent_channels(vae), downsample_factor(vae)
        patch = (ckpt_kwargs or {}).get("patch_size") or int(args.model.rsplit("/", 1)[-1])
        check_resolution(args, factor, patch)
        latent_size = args.resolution // factor
        model = build_model(args, ckpt_kwargs, channels, latent_size)
        report = load_state_into(model, extract_state_dict(checkpoint, "ema"), source=f"checkpoint {args.ckpt}")
        del checkpoint
        model = model.to(device).eval().requires_grad_(False)
        if args.cfg_scale > 1 and model.y_embedder.embedding_table.num_embeddings <= model.num_classes:
            raise GenerateError("--cfg-scale > 1 needs the null-label row, but this model was built without "
                                "label dropout; use --cfg-scale 1")
        labels = sample_labels(args.num_fid_samples, model.num_classes, args.global_seed, args.balanced_labels)
        if rank == 0:
            print(f"Loaded {args.ckpt} (ema): {report.summary()}")
            if ckpt_kwargs and ckpt_kwargs.get("encoder_depth", args.encoder_depth) != args.encoder_depth:
                print(f"note: the folder name says enc{args.encoder_depth} (--encoder-depth); the checkpoint's "
                      f"model has encoder_depth={ckpt_kwargs['encoder_depth']}")
            print(f"SiT parameters: {sum(p.numel() for p in model.parameters()):,}; latent "
                  f"{channels}x{latent_size}x{latent_size}; {args.mode} {args.num_steps} steps, cfg {args.cfg_scale}")
        if args.precision == "bf16":
            model = Autocast(model, device.type)
        if args.compile:
            # Static shapes: one graph for the guided batch (2B) and one for the unguided (B).
            model = torch.compile(model, dynamic=False, backend=args.compile_backend)

        batch = args.per_proc_batch_size
        chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
        mine = chunks[rank::world_size][: args.max_batches]
        shape = (channels, latent_size, latent_size)
        with ThreadPoolExecutor(max_workers=2) as writer:  # PNG encoding overlaps the next batch
            pending = []
            for indices in tqdm(mine, desc=f"rank 0 of {world_size}", disable=rank != 0):
                x = sample_batch(model, indices, labels, args, shape, device)
                images = pixels_to_uint8(x) if vae is None else decode_to_uint8(vae, x.float())
                images = images.cpu().numpy()  # the one host sync per batch
                for w in pending:
                    w.result()  # re-raises a failed write; bounds the queue to one batch
                pending = [writer.submit(save_png_atomic, img, png_path(folder, i))
                           for i, img in zip(indices, images)]
            for w in pending:
                w.result()

    if distributed:
        dist.barrier()
    if rank == 0:
        left = missing_indices(folder, args.num_fid_samples)
        if left:
            print(f"{len(left)} samples still missing (stopped by --max-batches); rerun to finish.")
        else:
            shape = write_npz(folder, args.num_fid_samples, npz_path)
            print(f"Saved {npz_path} [shape={shape}].")
            if not args.keep_pngs:
                for i in range(args.num_fid_samples):
                    os.remove(png_path(folder, i))
    if distributed:
        dist.destroy_process_group()


#################################################################################
#                                       CLI                                     #
#################################################################################

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Sample images from a SiT checkpoint for FID (spec section 6).")
    # seed and precision
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on Ampere+ GPUs (same as --precision tf32; --no-tf32 = fp32)")
    parser.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None,
                        help="model precision (default: tf32, or fp32 with --no-tf32); bf16 = autocast, "
                             "the sampler state stays float64")
    parser.add_argument("--bf16", action="store_true", help="same as --precision bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # checkpoint and output
    parser.add_argument("--ckpt", type=str, default=None, help="checkpoint .pt (ours or the authors'); EMA weights")
    parser.add_argument("--sample_dir", "--sample-dir", dest="sample_dir", type=str, default="samples")
    parser.add_argument("--name_add", "--name-add", dest="name_add", type=str, default="")
    parser.add_argument("--keep-pngs", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the PNG folder after the npz is built (it is what makes restart possible)")
    # model
    parser.add_argument("--model", type=str, choices=list(SiT_models), default="SiT-XL/2")
    parser.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, else 1000")
    parser.add_argument("--encoder-depth", type=int, default=8,
                        help="probe depth; only names the folder (the probe does not run when sampling)")
    parser.add_argument("--resolution", type=int, default=256, help="image side; a multiple of VAE factor x patch")
    parser.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the checkpoint's, else off")
    parser.add_argument("--vae", type=str, default="ema",
                        help="ema | mse | hub name | local save_pretrained folder | none (pixel-space model)")
    # number of samples
    parser.add_argument("--per-proc-batch-size", type=int, default=32)
    parser.add_argument("--num-fid-samples", type=int, default=50_000)
    parser.add_argument("--balanced-labels", action="store_true",
                        help="exactly N / num_classes samples per class (default: uniform at random)")
    # sampler
    parser.add_argument("--mode", choices=["ode", "sde"], default="ode")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--path-type", choices=["linear", "cosine"], default="linear")
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False, help="ODE only")
    parser.add_argument("--guidance-low", type=float, default=0.0)
    parser.add_argument("--guidance-high", type=float, default=1.0)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (compiles once per batch shape, then each step is faster)")
    parser.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # tests: eager
    # debugging: stop each process after this many batches (simulates a killed run)
    parser.add_argument("--max-batches", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.ckpt is None:
        parser.error("--ckpt is required (a checkpoint .pt from train.py or the authors' release)")
    if not os.path.isfile(args.ckpt):
        parser.error(f"--ckpt {args.ckpt} does not exist")
    if args.cfg_scale < 1.0:
        parser.error(f"--cfg-scale {args.cfg_scale} < 1 is not guidance; use 1 for unguided sampling")
    if args.bf16:
        if args.precision not in (None, "bf16"):
            parser.error(f"--bf16 contradicts --precision {args.precision}")
        args.precision = "bf16"
    if args.precision is None:
        args.precision = "tf32" if args.tf32 else "fp32"
    if args.num_fid_samples < 1 or args.per_proc_batch_size < 1:
        parser.error("--num-fid-samples and --per-proc-batch-size must be positive")
    if args.mode == "sde" and args.num_steps < 2:
        parser.error("--mode sde needs --num-steps >= 2")
    if args.global_seed < 0:
        parser.error("--global-seed must be >= 0")
    return args


if __name__ == "__main__":
    try:
        main(parse_args())
    except (CheckpointError, VAEWeightsMissing, GenerateError) as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"generate.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
