"""--init-from: a fresh run (step 0, fresh optimizer) that starts from another checkpoint's EMA or
model weights, at another resolution or on another dataset.

The new run's config comes from its flags and data; the source must have the same sizes. The
fixed sin-cos ``pos_embed`` is the new model's (rebuilt for the new grid); heads that depend on
the classes (``classifier.*``, ``y_embedder.*``) and other codebases' heads (REPA's
``projectors.*``) are skipped when they do not fit, and reported in one list; every other weight
is copied exactly.
"""
import os

import torch

from models.checkpoint import CheckpointError, extract_state_dict, load_weights_file, weights_entry, weights_sha256
from training.errors import TrainingError

# Heads that another --num-classes (or another codebase) changes: skipped when they do not fit.
HEAD_PREFIXES = ("classifier.", "y_embedder.", "projectors.")
FIXED_KEYS = ("pos_embed",)  # not learned: the new model's (the sin-cos table of its own grid)


def init_weights_plan(own, state, source):
    """(weights to copy, [(key, reason)] skipped) for loading ``state`` into a model whose state
    dict is ``own``. A backbone key missing on either side or with another shape is a size
    mismatch: TrainingError naming the key and both shapes."""
    copy, skipped = {}, []
    for key in sorted(set(own) | set(state)):
        mine, theirs = own.get(key), state.get(key)
        if key in FIXED_KEYS:
            if theirs is not None and mine is not None and mine.shape != theirs.shape:
                skipped.append((key, f"rebuilt for the new grid {tuple(theirs.shape)} -> {tuple(mine.shape)}"))
            continue
        if mine is not None and theirs is not None and mine.shape == theirs.shape:
            copy[key] = theirs
            continue
        if key.startswith(HEAD_PREFIXES):
            if theirs is None:
                skipped.append((key, "not in the source (kept at init)"))
            elif mine is None:
                skipped.append((key, "not in the new model (dropped)"))
            else:
                skipped.append((key, f"shape {tuple(theirs.shape)} -> {tuple(mine.shape)} (kept at init)"))
            continue
        there = "absent" if theirs is None else tuple(theirs.shape)
        here = "absent" if mine is None else tuple(mine.shape)
        raise TrainingError(f"--init-from {source} does not fit the new model: {key} is {there} there and {here} "
                            f"here; the sizes (--model, --hidden-size, --depth, --patch-size, --qk-norm, --vae) must "
                            f"match the source, only the resolution, the classes and the probe may change")
    return copy, skipped


@torch.no_grad()
def init_from(path, which, model, ema):
    """Copy the ``which`` ("ema" or "model") weights of checkpoint ``path`` into ``model`` and
    ``ema`` (see ``init_weights_plan``). Returns the record for checkpoint["provenance"]["init_from"]."""
    try:
        checkpoint, _ = load_weights_file(path, which)  # verified: the weights used and the metadata
        state = extract_state_dict(checkpoint, which)
    except CheckpointError as exc:
        raise TrainingError(f"--init-from: {exc}") from None
    is_dict = isinstance(checkpoint, dict)
    used = weights_entry(checkpoint, which)
    copy, skipped = init_weights_plan(model.state_dict(), state, path)
    for target in (model, ema):
        own = target.state_dict()
        for key, value in copy.items():
            own[key].copy_(value)
    provenance = (checkpoint.get("provenance") or {}) if is_dict else {}
    return {"path": os.path.abspath(path), "which": used, "weights_sha256": weights_sha256(state),
            "steps": checkpoint.get("steps") if is_dict else None, "run_id": provenance.get("run_id"),
            "copied": len(copy), "skipped": [f"{key}: {reason}" for key, reason in skipped]}


def describe_init(record):
    """The one log line of an --init-from start."""
    skipped = "; ".join(record["skipped"]) or "none"
    return (f"Initialised from {record['path']} ({record['which']} weights, sha256 {record['weights_sha256'][:12]}, "
            f"step {record['steps']}): {record['copied']} tensors copied; skipped: {skipped}")
