"""Training checkpoints: the authors' layout plus what exact resume needs; listing, saving
atomically, and choosing the one to resume from.

A checkpoint is ``<output-dir>/<exp-name>/checkpoints/<step:07d>.pt`` holding the authors' keys
(``model``, ``ema``, ``opt``, ``args``, ``steps``) and ours (``config``, ``provenance``, ``epoch``,
``scaler``, ``data``, ``nonfinite``). It is written under a temporary name and renamed, so a
crash mid-save leaves the previous checkpoint intact.
"""
import argparse
import json
import os
import re
import time
from typing import NamedTuple

import torch

from fileio import DiskFull, atomic_write, payload_bytes
from models.checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file, load_state_into, seal
from models.vae import LatentNorm, LatentNormError
from training.data_order import global_batch_size
from training.errors import TrainingError, first_line
from training.optimizer import set_learning_rates

CHECKPOINT_NAME = re.compile(r"^(\d{7,})\.pt$")
# --debug-slow-save-step: how long the save sleeps with its temporary file written (tests kill it then)
DEBUG_SAVE_PAUSE_S = 600
FRESH_NONFINITE = {"consecutive": 0, "total": 0}


class ResumePoint(NamedTuple):
    """Where a run continues: the optimizer step, samples seen (None: not recorded) and the
    non-finite guard's counters."""
    step: int
    samples_seen: object
    nonfinite: dict


FRESH_START = ResumePoint(0, 0, FRESH_NONFINITE)


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
        "nonfinite": dict(nonfinite or FRESH_NONFINITE),
    }


def restore_checkpoint(checkpoint, model, ema, optimizer, scaler=None, source="the checkpoint"):
    """Load a build_checkpoint dict (or an authors' one) into the training objects.

    Returns a ResumePoint (samples_seen None for the authors' checkpoints, which lack the data
    position; the caller then assumes ``step x global batch``). Weights of another size are a
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
    nonfinite = checkpoint.get("nonfinite") or FRESH_NONFINITE
    return ResumePoint(int(checkpoint["steps"]), data.get("samples_seen"), dict(nonfinite))


def restore_training_state(checkpoint, path, args, config, model, ema, optimizer, scaler, dataset, log):
    """Load a checkpoint into the training objects (``model`` unwrapped); the flags' learning
    rates and weight decays win over the saved ones. The data's latent normalisation must be the
    one the checkpoint's provenance records (older records: the SD-VAE's). Returns a ResumePoint."""
    check_latent_norm(checkpoint, path, args, dataset)
    step, samples_seen, nonfinite = restore_checkpoint(checkpoint, model, ema, optimizer, scaler, source=path)
    set_learning_rates(optimizer, args, config)
    if (checkpoint.get("data") or {}).get("dataset_size", len(dataset)) != len(dataset):
        log.warning(f"the dataset has changed size since {path}: the data order differs from an unbroken run")
    samples_seen = step * global_batch_size(args) if samples_seen is None else samples_seen
    log.info(f"Resumed from {path} at step {step} ({samples_seen:,} samples seen)")
    return ResumePoint(step, samples_seen, nonfinite)


def check_latent_norm(checkpoint, path, args, dataset):
    """One line when the latents' record of --data-dir normalises otherwise than the data ``path`` was trained on."""
    trained = ((checkpoint.get("provenance") or {}) if isinstance(checkpoint, dict) else {}).get("data")
    now = getattr(dataset, "latent_norm", None)
    if not trained or trained.get("mode") != "latent" or now is None:
        return  # no record (an older or foreign checkpoint), or pixel space
    try:
        then = LatentNorm.from_record(trained.get("vae"))
    except LatentNormError as exc:
        raise TrainingError(f"{path}: the provenance's latent record is unreadable ({exc}); start a new "
                            "--exp-name") from None
    if then != now:
        raise TrainingError(f"--data-dir {args.data_dir}: its latents are normalised with {now.describe()} but {path} "
                            f"was trained with {then.describe()}; resume with the data it was trained on (or re-run "
                            "encode with the --latent-norm it used)")


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


def folder_run_id(exp_dir):
    """The run id this experiment folder belongs to (``<exp>/args.json``, written at each start), or None."""
    try:
        with open(os.path.join(exp_dir, "args.json")) as f:
            return ((json.load(f).get("provenance") or {}).get("run_id")) or None
    except (OSError, ValueError, AttributeError):
        return None


def check_belongs(checkpoint, path, step, run_id):
    """A checkpoint in this run's folder must hold the step its file name says, and come from this
    run (when both record a run id): another run's file copied in would otherwise be adopted."""
    if not isinstance(checkpoint, dict):
        return
    inside = checkpoint.get("steps")
    if inside is not None and int(inside) != step:
        raise TrainingError(f"{path} holds step {int(inside)}, not the step {step} its name says (a file renamed or "
                            f"copied in); move it out of {os.path.dirname(path)}, or rename it to "
                            f"{int(inside):07d}.pt if it is this run's")
    theirs = (checkpoint.get("provenance") or {}).get("run_id")
    if run_id and theirs and theirs != run_id:
        raise TrainingError(f"{path} belongs to run {theirs}, not to this folder's run {run_id} (args.json); move it "
                            f"out of {os.path.dirname(path)}, or pass it as --init-from to a new --exp-name")


def open_resume_checkpoint(checkpoint_dir, resume_step, warn=print, run_id=None):
    """(path, checkpoint loaded with mmap and verified) to resume from, or (None, None) for a fresh run.

    -1: the newest readable checkpoint; each unreadable or damaged newer one (truncated, not a
    torch file, content unlike its recorded hashes) is reported through ``warn`` and skipped
    (torch.load with mmap reads the zip directory at the end of the file, so a truncated file
    fails at once without reading 10 GB). N: exactly that step; missing or unreadable is a
    TrainingError naming the other steps. Either way, a file of another run or another step
    (``check_belongs``, ``run_id`` = the folder's) is refused, before anything is changed.
    """
    if resume_step == 0:
        return None, None
    available = list_checkpoints(checkpoint_dir)
    if resume_step > 0:
        path = dict(available).get(resume_step)
        others = ", ".join(str(s) for s, _ in available if s != resume_step) or "none"
        if path is None:
            raise TrainingError(f"--resume-step {resume_step}: {checkpoint_path(checkpoint_dir, resume_step)} does "
                                f"not exist; available steps in {checkpoint_dir}: {others} (--resume-step -1 takes "
                                "the latest)")
        try:
            checkpoint = load_checkpoint_file(path)
        except CheckpointError as exc:
            raise TrainingError(f"--resume-step {resume_step}: {first_line(exc)}; "
                                + (f"pass another step ({others}) or " if others != "none" else "")
                                + "--resume-step -1 for the newest readable one") from None
        check_belongs(checkpoint, path, resume_step, run_id)
        return path, checkpoint
    bad = []
    for step, path in reversed(available):
        try:
            checkpoint = load_checkpoint_file(path)
        except CheckpointError as exc:
            bad.append(path)
            if warn is not None:
                warn(f"skipping {first_line(exc)}")
            continue
        check_belongs(checkpoint, path, step, run_id)
        if bad and warn is not None:
            warn(f"resuming from {path}, the newest readable checkpoint ({len(bad)} newer unreadable: "
                 f"{', '.join(bad)}; delete or move them)")
        return path, checkpoint
    if bad:
        raise TrainingError(f"none of the {len(bad)} checkpoints in {checkpoint_dir} can be read (e.g. {bad[0]}); "
                            "restore one from a backup, or pass --resume-step 0 --overwrite to start over")
    return None, None


def save_checkpoint(checkpoint, path, previous=None, pause=False):
    """models.checkpoint.atomic_save (the checkpoint sealed with its content hashes), with a full
    disk reported as one line that also names the previous checkpoint (intact: only a temporary
    was written). ``pause``: the hidden --debug-slow-save-step, which sleeps with the temporary
    written, before the rename."""
    checkpoint = seal(checkpoint)

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
