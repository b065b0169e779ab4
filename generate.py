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
import io
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

import fileio
from fileio import OutputError, atomic_write, check_writable, remove_stale_temps
from models.checkpoint import CheckpointError, load_model
from models.config import MODEL_NAMES, PATH_TYPES, ConfigError
from models.vae import VAEWeightsMissing, decode_to_uint8, load_vae, pixels_to_uint8, vae_identity
from samplers import euler_maruyama_sampler, euler_sampler
from seeding import derive_seed
from train_utils import code_version


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

# config field -> generate.py flag dest, for the flags that must agree with the checkpoint
CONFIG_FLAGS = {"model": "model", "num_classes": "num_classes", "qk_norm": "qk_norm", "path_type": "path_type",
                "encoder_depth": "encoder_depth"}


def load_sampling_model(args, hash_weights=True):
    """The checkpoint's EMA model and config (models.checkpoint.load_model): flags the checkpoint
    knows default to its values and must agree with them."""
    given = {field: getattr(args, dest) for field, dest in CONFIG_FLAGS.items()}
    try:
        return load_model(args.ckpt, given=given, which="ema", fused_attn=args.fused_attn, hash_weights=hash_weights)
    except ConfigError as exc:
        raise GenerateError(str(exc)) from None


def decoder_spec(args, config):
    """--vae, or its default: 'none' for a pixel-space model (3 input channels), else the authors' 'ema'."""
    if args.vae is not None:
        return args.vae
    return "none" if config.in_channels == 3 else "ema"


def open_decoder(spec, loaded, device):
    """(VAE or None, its record or None, latent channels, downsample factor). The VAE must match the
    model's input channels and, when the checkpoint records the VAE of its training latents, have
    the same encoder weights (the SD-VAE ft-EMA and ft-MSE share theirs)."""
    config = loaded.config
    if spec == "none":
        vae, record, channels, factor = None, None, 3, 1
    else:
        vae = load_vae(spec, device)
        record = vae_identity(vae, spec)
        channels, factor = record["latent_channels"], record["downsample_factor"]
    if channels != config.in_channels:
        raise GenerateError(f"the checkpoint's model has {config.in_channels} input channels but --vae {spec} gives "
                            f"{channels}; pick the VAE (or 'none') it was trained with")
    trained = ((loaded.provenance.get("data") or {}).get("vae") or {})
    if record and trained.get("encoder_sha256") and trained["encoder_sha256"] != record["encoder_sha256"]:
        raise GenerateError(f"--vae {spec} is not the VAE of the latents {os.path.basename(loaded.path)} was trained on (encoder "
                            f"{record['encoder_sha256'][:12]} vs {trained['encoder_sha256'][:12]} of "
                            f"{trained.get('name')}); pass --vae ema or mse for the SD-VAE, or that VAE's folder")
    return vae, record, channels, factor


def image_resolution(args, config, factor):
    """Pixels per side: the model's input side times the VAE factor; --resolution, when given, must agree."""
    resolution = config.input_size * factor
    if args.resolution is not None and args.resolution != resolution:
        step = factor * config.patch_size
        if args.resolution % step:
            raise GenerateError(f"--resolution {args.resolution} must be a multiple of {step} "
                                f"(VAE factor {factor} x patch {config.patch_size})")
        raise GenerateError(f"the checkpoint's model takes {config.input_size}x{config.input_size} inputs but "
                            f"--resolution {args.resolution} with VAE factor {factor} gives "
                            f"{args.resolution // factor}; drop --resolution (it is {resolution})")
    return resolution


def vae_name(spec):
    """The ``vae-<name>`` part of the folder name: ema/mse/none, else the path's basename."""
    return spec if spec in ("ema", "mse", "none") else os.path.basename(os.path.normpath(spec))


def sample_folder(args, config, resolution, vae_spec):
    """``<sample_dir>/<folder>``, named as the authors' generate.py names it. The name is not the
    identity: ``provenance.json`` inside is (see ``sample_set_identity``)."""
    model = config.model.replace("/", "-")
    ckpt = os.path.basename(args.ckpt).removesuffix(".pt")
    name = (f"{model}-enc{config.encoder_depth}-{ckpt}-size-{resolution}-vae-{vae_name(vae_spec)}-"
            f"cfg-{args.cfg_scale}-seed-{args.global_seed}-{args.mode}-{args.name_add}")
    return os.path.join(args.sample_dir, name)


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
#                         Sample set identity (provenance)                      #
#################################################################################

PROVENANCE_FILE = "provenance.json"
NPZ_PROVENANCE_KEY = "provenance"  # a uint8 array of UTF-8 JSON inside the npz, next to arr_0
# Settings that change the pixels; with the checkpoint's weights hash and the decoder they are
# the identity of a sample set. Process count and batch size are left out: on CPU they change
# nothing, on GPUs only rounding (other kernels for other shapes).
PIXEL_SETTINGS = ("num_fid_samples", "balanced_labels", "global_seed", "mode", "num_steps", "heun", "cfg_scale",
                  "guidance_low", "guidance_high", "precision", "fused_attn", "compile")


def sample_set_identity(args, loaded, decoder, resolution, device):
    """Everything that made a sample set's pixels: the checkpoint's weights (sha256 of the EMA
    tensors), the model config (path type included), the decoder's weights, the resolution,
    the sampler and label settings, the precision and the kind of device (noise is drawn on it)."""
    return {
        "checkpoint": loaded.identity(),
        "config": loaded.config.to_dict(),
        "decoder": None if decoder is None else {k: decoder[k] for k in ("spec", "name", "weights_sha256")},
        "resolution": resolution,
        "device_type": device.type,
        "settings": {key: getattr(args, key) for key in PIXEL_SETTINGS},
    }


def identity_key(identity):
    """The part of an identity that must match to reuse a folder (not the checkpoint's path or run)."""
    if not isinstance(identity, dict):
        return None
    key = {k: v for k, v in identity.items() if k not in ("checkpoint", "decoder", "created", "code")}
    key["weights"] = (identity.get("checkpoint") or {}).get("weights_sha256")
    key["decoder"] = (identity.get("decoder") or {}).get("weights_sha256")
    return key


def identity_differences(stored, current):
    """Human-readable differences between two identities ('what: there -> now')."""
    a, b = identity_key(stored) or {}, identity_key(current)
    out = []
    if a.get("weights") != b["weights"]:
        there = (stored or {}).get("checkpoint") or {}
        out.append(f"checkpoint weights {str(a.get('weights'))[:12]} ({there.get('path')}) there, "
                   f"{b['weights'][:12]} ({current['checkpoint']['path']}) now")
    for group in ("settings", "config"):
        for k, v in b[group].items():
            if (a.get(group) or {}).get(k) != v:
                out.append(f"{k} {(a.get(group) or {}).get(k)} there, {v} now")
    for k in ("decoder", "resolution", "device_type"):
        if a.get(k) != b[k]:
            out.append(f"{k} {str(a.get(k))[:12]} there, {str(b[k])[:12]} now")
    return out


def read_folder_identity(folder):
    """The identity recorded in ``folder`` (None if absent), and whether the folder holds samples."""
    path = os.path.join(folder, PROVENANCE_FILE)
    stored = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                stored = json.load(f)
        except (OSError, ValueError):
            stored = "unreadable"
    has_samples = os.path.exists(f"{folder}.npz") or (
        os.path.isdir(folder) and any(name.endswith(".png") and not name.startswith(fileio.TEMP_PREFIX)
                                      for name in os.listdir(folder)))
    return stored, has_samples


def check_sample_folder(folder, identity):
    """Refuse, in one line, a folder that holds samples made by anything else than ``identity``."""
    stored, has_samples = read_folder_identity(folder)
    if not has_samples or (isinstance(stored, dict) and identity_key(stored) == identity_key(identity)):
        return
    if not isinstance(stored, dict):
        raise GenerateError(f"{folder} holds samples without a readable {PROVENANCE_FILE} (made by an older "
                            "generate.py or another tool), so they cannot be checked; use another --sample_dir or "
                            "--name_add, or delete the folder")
    differ = identity_differences(stored, identity)
    raise GenerateError(f"{folder} holds samples made by something else ({'; '.join(differ[:3])}"
                        f"{' ...' if len(differ) > 3 else ''}); use another --sample_dir or --name_add")


def write_folder_identity(folder, identity):
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, PROVENANCE_FILE), lambda f: f.write(json.dumps(identity, indent=1).encode()))


def read_npz_identity(path):
    """The identity stored in an npz written by write_npz, or None."""
    try:
        with np.load(path) as f:
            if NPZ_PROVENANCE_KEY not in f.files:
                return None
            return json.loads(f[NPZ_PROVENANCE_KEY].tobytes().decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


#################################################################################
#                              PNGs and the npz file                            #
#################################################################################

def png_path(folder, index):
    return os.path.join(folder, f"{index:06d}.png")


def save_png_atomic(image, path):
    """Write a PNG under a temporary name in the same folder (fileio.temp_path: it names its host
    and process), then rename it into place; a full disk is fileio.DiskFull (one line)."""
    buffer = io.BytesIO()  # encoded first, so a full disk reports the PNG's size as the space needed
    Image.fromarray(image).save(buffer, format="PNG")
    # no fsync: 50k of them slow sampling down, and a killed process still leaves old-or-new
    atomic_write(path, lambda f: f.write(buffer.getbuffer()), expected_bytes=buffer.tell(), fsync=False)


def missing_indices(folder, num_samples):
    """Indices in [0, N) without a PNG, after removing temporary files a killed run left (those of
    live processes, e.g. another generate.py on this folder, are kept)."""
    remove_stale_temps(folder)
    names = set(os.listdir(folder))
    return [i for i in range(num_samples) if f"{i:06d}.png" not in names]


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


def write_npz(folder, num_samples, path, identity):
    """Stream PNGs 0..N-1 into ``path`` as ``arr_0`` (N, H, W, 3) uint8, the layout np.savez
    writes (a stored zip entry ``arr_0.npy``), without holding all N images in memory; the
    sample set's identity goes in as ``provenance`` (UTF-8 JSON bytes), which ADM's evaluator ignores."""
    first = np.asarray(Image.open(png_path(folder, 0)).convert("RGB"))
    shape = (num_samples, *first.shape)

    def write(out):  # into fileio's temporary (.tmp-<host>-<pid>-<name>.npz), renamed when complete
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
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
            with zf.open(f"{NPZ_PROVENANCE_KEY}.npy", "w") as f:
                np.lib.format.write_array(f, np.frombuffer(json.dumps(identity).encode(), dtype=np.uint8))

    atomic_write(path, write, expected_bytes=int(np.prod(shape)))
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


def sample_batch(model, indices, labels, args, path_type, shape, device):
    """Sampler output (B, C, h, w) float64 (latents, or pixels in [-1, 1]) for a list of indices."""
    num_sde_steps = args.num_steps - 1 if args.mode == "sde" else 0
    z, noise = sample_noise(indices, shape, num_sde_steps, args.global_seed, device)
    y = labels[indices].to(device)
    kwargs = dict(model=model, latents=z, y=y, num_steps=args.num_steps, heun=args.heun,
                  cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
                  guidance_high=args.guidance_high, path_type=path_type)
    if args.mode == "sde":
        return euler_maruyama_sampler(**kwargs, noise=noise)
    return euler_sampler(**kwargs)


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
        identity = sample_set_identity(args, loaded, decoder, resolution, device)
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
        sample_indices(args, loaded.model, loaded.config, vae, payload, folder, rank, world_size, device, channels)
    if distributed:
        dist.barrier()
    if rank == 0:
        left = missing_indices(folder, args.num_fid_samples)
        if left:
            print(f"{len(left)} samples still missing (stopped by --max-batches); rerun to finish.")
        else:
            shape = write_npz(folder, args.num_fid_samples, npz_path, read_folder_identity(folder)[0])
            print(f"Saved {npz_path} [shape={shape}].")
            if not args.keep_pngs:
                for i in range(args.num_fid_samples):
                    os.remove(png_path(folder, i))
    if distributed:
        dist.destroy_process_group()
    return folder


def sample_indices(args, model, config, vae, todo, folder, rank, world_size, device, channels):
    """Sample this rank's share of ``todo`` (batches dealt round-robin) with ``model`` (its ModelConfig
    ``config``) and write their PNGs. ``args``: the sampler and label settings of parse_args (train.py's
    evaluation passes its own, with the same names)."""
    model = model.to(device)
    if args.cfg_scale > 1 and not config.has_null_label:
        raise GenerateError("--cfg-scale > 1 needs the null-label row, but this model was trained without "
                            "label dropout; use --cfg-scale 1")
    labels = sample_labels(args.num_fid_samples, config.num_classes, args.global_seed, args.balanced_labels)
    if args.precision == "bf16":
        model = Autocast(model, device.type)
    if args.compile:
        # Static shapes: one graph for the guided batch (2B) and one for the unguided (B).
        model = torch.compile(model, dynamic=False, backend=args.compile_backend)
    batch = args.per_proc_batch_size
    chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    mine = chunks[rank::world_size][: args.max_batches]
    shape = (channels, config.input_size, config.input_size)
    with ThreadPoolExecutor(max_workers=2) as writer:  # PNG encoding overlaps the next batch
        pending = []
        for indices in tqdm(mine, desc=f"rank 0 of {world_size}", disable=rank != 0):
            x = sample_batch(model, indices, labels, args, config.path_type, shape, device)
            images = pixels_to_uint8(x) if vae is None else decode_to_uint8(vae, x.float())
            images = images.cpu().numpy()  # the one host sync per batch
            for w in pending:
                w.result()  # re-raises a failed write; bounds the queue to one batch
            pending = [writer.submit(save_png_atomic, img, png_path(folder, i)) for i, img in zip(indices, images)]
        for w in pending:
            w.result()


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
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--path-type", choices=PATH_TYPES, default=None,
                        help="default: the checkpoint's (it records the interpolant it was trained on), else linear")
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False, help="ODE only")
    parser.add_argument("--guidance-low", type=float, default=0.0)
    parser.add_argument("--guidance-high", type=float, default=1.0)
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
    except (CheckpointError, ConfigError, VAEWeightsMissing, GenerateError, OutputError) as exc:
        # exit 2 for every error the user must fix: flags, checkpoint, decoder, output folder, full disk
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"generate.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
