"""Checkpoint reading, writing and loading into a SiT.

Reads our checkpoints and the authors' (``{"model", "ema", "opt", "args", "steps"}``), official
SiT and REPA checkpoints (no ``classifier.*``; REPA adds ``projectors.*``), and bare state
dicts. Writes atomically: a crash mid-save leaves the previous file intact.
"""
import argparse
import os
import tempfile
from dataclasses import dataclass, field

import torch

# Heads of other codebases that a SiT does not have (reported as ignored, not unexpected).
IGNORED_PREFIXES = ("projectors.",)           # REPA's projection heads
OPTIONAL_PREFIXES = ("classifier.",)          # the LSEP probe, absent from SiT / REPA weights
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile
MODEL_KWARGS_KEY = "model_kwargs"             # train.py stores SiT(...) kwargs as args.model_kwargs
SIZE_KWARGS = ("depth", "hidden_size", "num_heads", "patch_size")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


def atomic_save(obj, path):
    """torch.save via fileio.atomic_write: temporary `.tmp-<host>-<pid>-<name>`, fsync, rename over
    ``path``. A crash leaves the previous file intact; a full disk raises fileio.DiskFull (one line)."""
    from fileio import atomic_write, payload_bytes

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f), expected_bytes=payload_bytes(obj))


def load_checkpoint_file(path):
    """torch.load on CPU with safe unpickling (argparse.Namespace allowed, as the authors store args)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # mmap: ranks that load the same file share its pages instead of each holding a copy
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
                              "it may be truncated or not a PyTorch checkpoint") from None


def checkpoint_args(checkpoint, name, default=None):
    """Flag ``name`` of the training run that wrote ``checkpoint`` (its ``args``, a Namespace
    in ours and the authors', a dict in some others), or ``default``."""
    train_args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(train_args, dict):
        return train_args.get(name, default)
    return getattr(train_args, name, default)


def checkpoint_model_kwargs(checkpoint):
    """The SiT(...) kwargs our train.py stores as ``args.model_kwargs``, or None (the authors'
    checkpoints do not have them; their size comes from --model)."""
    kwargs = checkpoint_args(checkpoint, MODEL_KWARGS_KEY)
    return dict(kwargs) if kwargs else None


def extract_state_dict(checkpoint, which="ema"):
    """The model weights in a checkpoint: entry ``which`` ("ema" or "model") when present,
    the other one otherwise, or the object itself when it is already a state dict."""
    if isinstance(checkpoint, dict):
        for key in (which, "ema" if which == "model" else "model", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise CheckpointError("checkpoint holds no state dict (expected 'ema'/'model' entries or tensors)")
    state = {}
    for key, value in checkpoint.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        state[key] = value
    return state


@dataclass
class LoadReport:
    """What did not match by name; shape mismatches are errors, not reported here."""
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    ignored: list = field(default_factory=list)

    def summary(self):
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)} keys (kept at init): {_short(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} keys: {_short(self.unexpected)}")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} keys of other heads: {_short(self.ignored)}")
        return "; ".join(parts) if parts else "all keys matched"


def _short(keys, limit=4):
    groups = sorted({k.split(".")[0] + ".*" if "." in k else k for k in keys})
    return ", ".join(groups[:limit]) + (" ..." if len(groups) > limit else "")


def load_state_into(model, state, source="checkpoint", strict=False):
    """Copy ``state`` into ``model``. A shape mismatch raises one line naming the key and the
    expected and found shapes. By default only ``classifier.*`` may be missing (SiT / REPA
    weights; kept at init) and only REPA's ``projectors.*`` may be extra (dropped), both
    reported; any other missing or extra key means the checkpoint is of another model and
    raises. ``strict`` demands the exact key set."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"{source} does not fit this model: {key} expected {tuple(own[key].shape)}, found "
                f"{tuple(value.shape)}; check --model, --resolution, --num-classes (and in_channels/--vae)"
            )
    report = LoadReport(
        missing=[k for k in own if k not in state],
        unexpected=[k for k in state if k not in own and not k.startswith(IGNORED_PREFIXES)],
        ignored=[k for k in state if k not in own and k.startswith(IGNORED_PREFIXES)],
    )
    if strict and (report.missing or report.unexpected or report.ignored):
        raise CheckpointError(f"{source} does not match the model by name: {report.summary()}")
    if [k for k in report.missing if not k.startswith(OPTIONAL_PREFIXES)] or report.unexpected:
        raise CheckpointError(f"{source} does not fit this model by name: {report.summary()}; "
                              "check --model (and custom size flags)")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return report


def load_model_weights(model, path, which="ema", strict=False):
    """Read ``path`` and load its ``which`` weights into ``model``; returns the LoadReport."""
    state = extract_state_dict(load_checkpoint_file(path), which)
    return load_state_into(model, state, source=f"checkpoint {path}", strict=strict)
