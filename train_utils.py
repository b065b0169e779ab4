"""The reusable parts of train.py: model config, data order, seeding, EMA, checkpoints, logging.

Design (``LSEP_SPEC.md`` sections 5 and 8.5; EDM2's training habits): every random draw of
optimizer step ``s`` is a function of ``(seed, s, shard)``. The global batch of step ``s`` is a
slice of an infinite stream of epoch-seeded permutations of the dataset, cut into
``num_processes x grad_accum`` shards; shard ``j = rank * accum + micro_step`` goes to that
process and micro step, and the global torch RNG is reseeded from ``(seed, s, j)`` before its
posterior sample and forward pass. Hence no RNG state is checkpointed, a run resumed at step N
continues exactly like an unbroken one, and 2 processes x 1 accumulation step see the same
samples and noise as 1 process x 2 accumulation steps.
"""
import argparse
import errno
import json
import math
import os
import re
import resource
import time

import torch

from fileio import DiskFull, atomic_write, payload_bytes
from models.checkpoint import (CheckpointError, config_from_checkpoint, extract_state_dict, load_checkpoint_file,
                               load_state_into)
from models.config import DEFAULTS, MODEL_NAMES, ConfigError, resolve_config
from models.encoders import alignment_fields
from seeding import derive_seed

CHECKPOINT_NAME = re.compile(r"^(\d{7,})\.pt$")


class TrainingError(RuntimeError):
    """A user-fixable problem found at start-up (data, flags, checkpoints); printed as one message."""


class TrainingDataError(TrainingError):
    """A data file found damaged mid-run; printed by the process that read it (perhaps not rank 0)."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left intact."""


#################################################################################
#                         Model config and run provenance                       #
#################################################################################

# config field -> train.py flag dest, for the flags that set a ModelConfig field
CONFIG_FLAGS = {"num_classes": "num_classes", "encoder_depth": "encoder_depth", "qk_norm": "qk_norm",
                "uncond_prob": "uncond_prob", "probe": "probe", "path_type": "path_type",
                "class_dropout_prob": "cfg_prob", "hidden_size": "hidden_size", "depth": "depth",
                "num_heads": "num_heads", "patch_size": "patch_size", "model": "model",
                "random_crop": "random_crop", "crop_start": "crop_start", "crop_end": "crop_end",
                "projector_dim": "projector_dim", "align_depth": "align_depth"}  # REPA: enc_type/z_dims below


def training_config(args, in_channels, input_size, checkpoint=None, source=None):
    """The ModelConfig of this run: the data fixes the input (channels, side); a resumed
    checkpoint fixes everything it records (a flag contradicting it is a TrainingError naming
    both); flags set the rest, else the authors' defaults (``models.config.DEFAULTS``)."""
    given = {field: getattr(args, dest) for field, dest in CONFIG_FLAGS.items()}
    given.update(alignment_fields(args.enc_type, args.enc_arch))  # REPA: --enc-type names and token widths
    data = {"in_channels": in_channels, "input_size": input_size}
    try:
        if checkpoint is None:
            if args.model is None:
                raise ConfigError(f"--model is required for a fresh run: one of {', '.join(MODEL_NAMES)}")
            return resolve_config(data, given, DEFAULTS, "the data")
        config, _ = config_from_checkpoint(checkpoint, extract_state_dict(checkpoint, "model"), given,
                                           DEFAULTS, source)
    except (ConfigError, CheckpointError) as exc:
        raise TrainingError(str(exc)) from None
    for key, value in data.items():
        if getattr(config, key) != value:
            raise TrainingError(f"{source} was trained on inputs with {key}={getattr(config, key)} but --data-dir "
                                f"{args.data_dir} gives {value}; resume with the data (and --vae) it was trained on")
    return config


def global_batch_size(args):
    """Samples per optimizer step: --batch-size (per micro-step, over all processes; the authors'
    meaning) times --gradient-accumulation-steps."""
    return args.batch_size * args.gradient_accumulation_steps


def classifier_learning_rate(args, config):
    """--learning-rate-class when given; else the authors' rule: 3e-2 for SiT-B, 1e-4 otherwise."""
    if args.learning_rate_class is not None:
        return args.learning_rate_class
    name = args.model or config.model
    return 3e-2 if name.startswith("SiT-B/") else 1e-4


def code_version(root=None):
    """The git commit of this codebase (with '+dirty' for uncommitted changes), or None."""
    import subprocess

    root = root or os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def run_provenance(previous, args, dataset, accelerator):
    """What made this run's checkpoints: a run id (kept across resumes), start time, code version,
    the data (folder, size, mode, the VAE record of its latents) and the launch."""
    import datetime
    import uuid

    previous = previous or {}
    return {
        "run_id": previous.get("run_id") or uuid.uuid4().hex[:16],
        "started": previous.get("started") or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code": code_version(),
        "data": {"data_dir": os.path.abspath(args.data_dir), "items": len(dataset), "mode": dataset.mode,
                 "vae": getattr(dataset, "vae_record", None)},
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
    }


#################################################################################
#                            Seeds and data order                               #
#################################################################################

def seed_step(seed, step, shard, device=None):
    """Seed the global torch RNG (CPU, and ``device`` when it is a GPU) for shard ``shard`` of step ``step``."""
    value = derive_seed(seed, step, shard)
    torch.random.default_generator.manual_seed(value)
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(value)


class StepBatchSampler:
    """Infinite batch sampler: this process's micro-batches of every optimizer step from ``start_step``.

    The sample stream is the concatenation of permutations of ``range(dataset_size)``, epoch ``e``
    permuted by a generator seeded from (seed, e). Step ``s`` takes the ``global_batch`` samples
    at stream position ``start_sample + (s - start_step) * global_batch``, split into
    ``num_shards`` equal shards; this process yields its ``shards`` in order, one list per micro
    step. Works with DataLoader(batch_sampler=...) and any number of workers.
    """

    PERMUTATION_DOMAIN = -1  # keeps permutation seeds apart from step seeds

    def __init__(self, dataset_size, global_batch, num_shards, shards, seed, start_step=0, start_sample=None):
        if dataset_size < 1:
            raise TrainingError("the dataset is empty")
        if global_batch % num_shards:
            raise TrainingError(f"global batch {global_batch} is not divisible into {num_shards} shards")
        self.dataset_size = int(dataset_size)
        self.global_batch = int(global_batch)
        self.local_batch = self.global_batch // num_shards
        self.shards = list(shards)
        self.seed = int(seed)
        self.start_step = int(start_step)
        self.start_sample = self.start_step * self.global_batch if start_sample is None else int(start_sample)
        self._cache = {}

    def permutation(self, epoch):
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.PERMUTATION_DOMAIN, epoch))
            self._cache[epoch] = torch.randperm(self.dataset_size, generator=generator)
        return self._cache[epoch]

    def indices(self, position, count):
        """Dataset indices of stream positions [position, position + count)."""
        out = []
        while count > 0:
            epoch, offset = divmod(position, self.dataset_size)
            take = min(count, self.dataset_size - offset)
            out.extend(self.permutation(epoch)[offset:offset + take].tolist())
            position, count = position + take, count - take
        return out

    def step_indices(self, step):
        """{shard: indices} of this process's shards of optimizer step ``step``."""
        base = self.start_sample + (step - self.start_step) * self.global_batch
        return {j: self.indices(base + j * self.local_batch, self.local_batch) for j in self.shards}

    def __iter__(self):
        step = self.start_step
        while True:
            batches = self.step_indices(step)
            for shard in self.shards:
                yield batches[shard]
            step += 1


#################################################################################
#                                      EMA                                      #
#################################################################################

@torch.no_grad()
def update_ema(ema_params, model_params, decay):
    """ema <- decay * ema + (1 - decay) * model, over two equally ordered lists of tensors."""
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)  # one read-modify-write pass


#################################################################################
#                                  Checkpoints                                  #
#################################################################################

def checkpoint_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"{step:07d}.pt")


def list_checkpoints(checkpoint_dir):
    """Sorted [(step, path)] of the ``<step:07d>.pt`` files in ``checkpoint_dir`` (temp files excluded)."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        match = CHECKPOINT_NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(checkpoint_dir, name)))
    return sorted(found)


def build_checkpoint(model, ema, optimizer, args, config, provenance, step, samples_seen, dataset_size, scaler=None,
                     nonfinite=None):
    """The authors' layout (model, ema, opt, args, steps, epoch) plus the model config, the run's
    provenance and what exact resume needs. ``args`` are the flags as parsed, never rewritten.

    Everything is a tensor, dict, list, number, str, None or argparse.Namespace, so the file
    loads with ``torch.load(weights_only=True)`` (``models.checkpoint.load_checkpoint_file``).
    """
    return {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": optimizer.state_dict(),
        "args": argparse.Namespace(**vars(args)),
        "steps": int(step),
        "config": config.to_dict(),
        "provenance": provenance,
        "epoch": int(samples_seen // dataset_size),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "data": {"samples_seen": int(samples_seen), "dataset_size": int(dataset_size),
                 "global_batch": int(global_batch_size(args)), "seed": int(args.seed)},
        "nonfinite": dict(nonfinite or {"consecutive": 0, "total": 0}),
    }


def restore_checkpoint(checkpoint, model, ema, optimizer, scaler=None, source="the checkpoint"):
    """Load a build_checkpoint dict (or an authors' one) into the training objects.

    Returns (step, samples_seen or None, nonfinite counters). Authors' checkpoints lack the data
    position; the caller then assumes ``step x global batch``. Weights of another size are a
    TrainingError naming the key and both shapes (``source`` names the file).
    """
    try:  # one line naming the key and both shapes, not PyTorch's size-mismatch dump
        load_state_into(model, extract_state_dict(checkpoint, "model"), f"{source} (model)", strict=True)
        load_state_into(ema, extract_state_dict(checkpoint, "ema"), f"{source} (ema)", strict=True)
    except CheckpointError as exc:
        raise TrainingError(f"cannot resume: {first_line(exc)}") from None
    try:
        optimizer.load_state_dict(checkpoint["opt"])
    except (ValueError, KeyError) as exc:
        raise TrainingError(f"cannot resume: the optimizer state in {source} does not fit this model "
                            f"({first_line(exc)}); it was written by another training script or model") from None
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    data = checkpoint.get("data") or {}
    nonfinite = checkpoint.get("nonfinite") or {"consecutive": 0, "total": 0}
    return int(checkpoint["steps"]), data.get("samples_seen"), dict(nonfinite)


#################################################################################
#              Reliability: overwrite, unreadable checkpoints, faults            #
#################################################################################

# --debug-slow-save-step: how long the save sleeps with its temporary file written (tests kill it then)
DEBUG_SAVE_PAUSE_S = 600


def first_line(exc):
    """The first non-empty line of an exception's message (torch's can run to pages)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def refuse_overwrite(checkpoint_dir, resume_step, overwrite):
    """A fresh run (--resume-step 0) in an experiment folder that holds checkpoints is an error
    unless --overwrite says to start over."""
    available = list_checkpoints(checkpoint_dir)
    if resume_step == 0 and available and not overwrite:
        steps = ", ".join(str(s) for s, _ in available[-3:])
        raise TrainingError(f"{checkpoint_dir} already holds {len(available)} checkpoints (up to steps {steps}); "
                            "pass --resume-step -1 to continue from the latest, or --overwrite to delete them and "
                            "start over")


def remove_checkpoints(checkpoint_dir, log=print):
    """--overwrite: delete the <step>.pt files of the previous run (a later --resume-step -1 would
    otherwise pick up the old run's later steps)."""
    available = list_checkpoints(checkpoint_dir)
    for _, path in available:
        os.remove(path)
    if available:
        log(f"--overwrite: deleted the {len(available)} checkpoints of the previous run in {checkpoint_dir}")


def open_resume_checkpoint(checkpoint_dir, resume_step, warn=print):
    """(path, checkpoint loaded with mmap) to resume from, or (None, None) for a fresh run.

    -1: the newest readable checkpoint; each unreadable newer one (truncated, not a torch file) is
    reported through ``warn`` and skipped (torch.load with mmap reads the zip directory at the
    end of the file, so a truncated file fails at once without reading 10 GB). N: exactly that
    step; missing or unreadable is a TrainingError saying what else there is.
    """
    if resume_step == 0:
        return None, None
    available = list_checkpoints(checkpoint_dir)
    listing = ", ".join(str(s) for s, _ in available) or "none"
    if resume_step > 0:
        path = dict(available).get(resume_step)
        if path is None:
            raise TrainingError(f"--resume-step {resume_step}: {checkpoint_path(checkpoint_dir, resume_step)} does "
                                f"not exist; available steps in {checkpoint_dir}: {listing} (--resume-step -1 takes "
                                "the latest)")
        try:
            return path, load_checkpoint_file(path)
        except CheckpointError as exc:
            raise TrainingError(f"--resume-step {resume_step}: {first_line(exc)}; pass another step ({listing}) or "
                                "--resume-step -1 for the newest readable one") from None
    bad = []
    for _, path in reversed(available):
        try:
            checkpoint = load_checkpoint_file(path)
        except CheckpointError as exc:
            bad.append(path)
            if warn is not None:
                warn(f"skipping {first_line(exc)}")
            continue
        if bad and warn is not None:
            warn(f"resuming from {path}, the newest readable checkpoint ({len(bad)} newer unreadable: "
                 f"{', '.join(bad)}; delete or move them)")
        return path, checkpoint
    if bad:
        raise TrainingError(f"none of the {len(bad)} checkpoints in {checkpoint_dir} can be read (e.g. {bad[0]}); "
                            "restore one from a backup, or pass --resume-step 0 --overwrite to start over")
    return None, None


def save_checkpoint(checkpoint, path, previous=None, pause=False):
    """models.checkpoint.atomic_save, with a full disk reported as one line that also names the
    previous checkpoint (intact: only a temporary was written). ``pause``: the hidden
    --debug-slow-save-step, which sleeps with the temporary written, before the rename."""
    def write(f):
        torch.save(checkpoint, f)
        if pause:
            f.flush()
            time.sleep(DEBUG_SAVE_PAUSE_S)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        atomic_write(path, write, expected_bytes=payload_bytes(checkpoint))
    except DiskFull as exc:
        keep = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise DiskFull(f"{exc}; {keep}: free space, then resume with --resume-step -1") from None


def data_error(exc, step, last_checkpoint):
    """A DatasetError met mid-run (directly, or re-raised by a DataLoader worker) as one line:
    the file and its fix, the step it stopped, and where to resume once it is fixed."""
    from dataset import dataset_error_line

    where = f"{last_checkpoint} is the latest checkpoint" if last_checkpoint else "no checkpoint was written yet"
    return TrainingDataError(f"stopped at step {step + 1}, nothing saved for it ({where}; --resume-step -1 continues "
                             f"once the data is fixed): {dataset_error_line(exc)}")


#################################################################################
#                          Non-finite guard and stats                           #
#################################################################################

# A logged window's mean loss above this multiple of the lowest window mean so far is out of its
# normal range (a loss on its way to overflowing; the weights may already be damaged).
NORMAL_LOSS_FACTOR = 2.0


class NonFiniteGuard:
    """Counts skipped steps; raises TrainingDiverged after ``max_consecutive`` in a row (0 = never).

    It also names the checkpoint to go back to: the last one saved while the loss was in its
    normal range, meaning that the last logged window before the save (a stats.jsonl record) had
    no skipped step and a finite mean loss at most NORMAL_LOSS_FACTOR x the lowest window mean so
    far, and no step was skipped between that log and the save. Before the first log nothing is
    known against the weights, so they count as in range. ``state()`` goes into each checkpoint,
    so a resumed run keeps the record.
    """

    def __init__(self, max_consecutive, consecutive=0, total=0, lowest_loss=None, in_range=True,
                 good_checkpoint=None):
        self.max_consecutive = max_consecutive
        self.consecutive = consecutive
        self.total = total
        self.lowest_loss = lowest_loss
        self.in_range = in_range
        self.good_checkpoint = good_checkpoint

    def record(self, bad, step, last_checkpoint=None):
        if not bad:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        self.in_range = False
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"training stopped at step {step}: {self.consecutive} consecutive steps with a non-finite loss or "
                f"gradient norm (--max-nonfinite {self.max_consecutive}); {self.where(last_checkpoint)}. Lower "
                f"--learning-rate or try --mixed-precision bf16/no")

    def where(self, last_checkpoint):
        """Which checkpoint to resume from, in words."""
        good = self.good_checkpoint
        if good is None:
            if last_checkpoint is None:
                return "no checkpoint was written"
            return (f"no checkpoint was saved while the loss was in its normal range, so {last_checkpoint} may "
                    "hold damaged weights")
        match = CHECKPOINT_NAME.match(os.path.basename(good))
        resume = f" (--resume-step {int(match.group(1))})" if match else ""
        later = f"; later ones, up to {last_checkpoint}, may hold damaged weights" if last_checkpoint != good else ""
        return f"the last checkpoint saved while the loss was in its normal range is {good}{resume}{later}"

    def note_log(self, mean_loss, skipped):
        """A logged window closed with this mean loss (None or NaN when every step was skipped)."""
        finite = mean_loss is not None and math.isfinite(mean_loss)
        if finite:
            self.lowest_loss = mean_loss if self.lowest_loss is None else min(self.lowest_loss, mean_loss)
        self.in_range = finite and not skipped and mean_loss <= NORMAL_LOSS_FACTOR * self.lowest_loss

    def note_checkpoint(self, path):
        """A checkpoint is about to be saved at ``path`` (call before state() goes into it)."""
        if self.in_range:
            self.good_checkpoint = path

    def state(self):
        return {"consecutive": self.consecutive, "total": self.total, "lowest_loss": self.lowest_loss,
                "in_range": self.in_range, "good_checkpoint": self.good_checkpoint}


class StepStats:
    """Training statistics summed on the device between log steps, so the loop never waits on them."""

    KEYS = ("loss", "denoising_loss", "probe_loss", "probe_accuracy", "grad_norm", "proj_loss")

    def __init__(self, device):
        self.sums = torch.zeros(len(self.KEYS), device=device, dtype=torch.float64)
        self.good_steps = 0
        self.skipped = 0
        self.overflows = 0
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, denoising_loss, probe_loss, probe_accuracy, grad_norm, proj_loss=None):
        """Add one finished optimizer step's (device scalar) values; ``proj_loss`` is REPA's
        alignment loss, unweighted as REPA logs it (0 without alignment)."""
        proj_loss = torch.zeros_like(denoising_loss) if proj_loss is None else proj_loss
        values = torch.stack([(denoising_loss + probe_loss).double(), denoising_loss.double(), probe_loss.double(),
                              probe_accuracy.double(), grad_norm.double(), proj_loss.double()])
        self.sums += values
        self.good_steps += 1

    def summary(self, accelerator):
        """Means over the window and all processes, plus counts and throughput; resets the window."""
        sums = self.sums
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.clone(), reduction="mean")
        means = (sums / max(self.good_steps, 1)).tolist()
        elapsed = time.perf_counter() - self.start
        out = {k: (v if self.good_steps else float("nan")) for k, v in zip(self.KEYS, means)}
        out.update(skipped_steps=self.skipped, fp16_overflows=self.overflows,
                   samples_per_sec=self.samples / max(elapsed, 1e-9))
        self.sums.zero_()
        self.good_steps = self.skipped = self.overflows = self.samples = 0
        self.start = time.perf_counter()
        return out


def memory_stats(device):
    """Peak CUDA memory since the last call (GiB) and this process's resident memory (GiB)."""
    stats = {}
    if device.type == "cuda":
        stats["cuda_max_alloc_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/statm") as f:
            stats["cpu_rss_gb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):  # not Linux: peak RSS instead
        stats["cpu_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return stats


def trim_stats(path, step, log=print):
    """Drop the stats.jsonl records after ``step`` (a resumed run writes them again: one record per
    step), rewriting the file atomically. A fresh run (step 0) starts an empty file."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill: dropped
    dropped = len(lines) - len(keep)
    if dropped:
        atomic_write(path, lambda f: f.write("".join(line + "\n" for line in keep).encode()))
        log(f"{path}: dropped {dropped} records after step {step} (this run writes them again)")
    return dropped


def append_stats(path, record):
    """Append one JSON line (EDM2's stats.jsonl); non-finite floats are written as null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    try:
        with open(path, "a") as f:
            f.write(json.dumps(clean) + "\n")
    except OSError as exc:  # a line cut short is dropped by trim_stats when the run resumes
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"{exc.strerror.lower()} while appending to {path}; free some space, then resume with "
                           "--resume-step -1") from None
        raise


#################################################################################
#                                    Trackers                                   #
#################################################################################

def wandb_has_credentials(environ=None, netrc_path=None):
    """True when wandb could log in without asking: an API key in the environment or ~/.netrc."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    netrc_path = netrc_path or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(netrc_path) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


def ensure_wandb_cannot_hang(environ=None, netrc_path=None):
    """Without WANDB_MODE and without credentials, switch wandb to offline mode (it would prompt
    for a login otherwise). Returns the message to print, or None when nothing was changed."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE") or wandb_has_credentials(environ, netrc_path):
        return None
    environ["WANDB_MODE"] = "offline"
    return ("wandb: no API key (WANDB_API_KEY or `wandb login`) and WANDB_MODE unset: logging offline; "
            "upload later with `wandb sync`")


def log_image(accelerator, name, grid, step):
    """Send an (H, W, 3) uint8 numpy grid to whichever trackers are active."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb
            tracker.log({name: wandb.Image(grid)}, step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_image(name, grid, step, dataformats="HWC")


def image_grid(images):
    """(B, H, W, 3) uint8 tensor -> (rows*H, cols*W, 3) uint8 numpy grid, near-square."""
    import torchvision
    nrow = max(1, round(math.sqrt(images.shape[0])))
    grid = torchvision.utils.make_grid(images.permute(0, 3, 1, 2).cpu(), nrow=nrow, padding=2, pad_value=0)
    return grid.permute(1, 2, 0).contiguous().numpy()


def save_png(array, path):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"), fsync=False)
