"""The identity of a sample set: everything that made its pixels. It is stored in
``<folder>/provenance.json`` and inside the npz; a folder holding samples of another identity is
refused, and a partial folder is finished only when everything matches."""
import json
import os
import zipfile

import numpy as np

import fileio
from fileio import atomic_write
from sampling.errors import GenerateError
from sampling.npz import NPZ_PROVENANCE_KEY

PROVENANCE_FILE = "provenance.json"
# Settings that change the pixels; with the checkpoint's weights hash and the decoder they are
# the identity of a sample set. Process count and batch size are left out: on CPU they change
# nothing, on GPUs only rounding (other kernels for other shapes).
PIXEL_SETTINGS = ("num_fid_samples", "balanced_labels", "global_seed", "mode", "num_steps", "heun", "cfg_scale",
                  "guidance_low", "guidance_high", "precision", "fused_attn", "compile")
# Joined to the settings only when the adaptive solver runs, so Euler/Heun sample sets keep the
# identity they had before it existed.
DOPRI5_SETTINGS = ("solver", "atol", "rtol")
# Recorded with a sample set but not part of what must match: what the sampler measured (NFE).
MEASURED = ("nfe",)


def sample_set_identity(args, loaded, decoder, resolution, device, guide=None):
    """Everything that made a sample set's pixels: the checkpoint's weights (sha256 of the EMA
    tensors), the model config (path type included), the decoder's weights, the resolution,
    the sampler and label settings, the precision and the kind of device (noise is drawn on it).
    With autoguidance (``guide``: the guide's LoadedModel), the guide's weights, path, entry and
    config too; with dopri5, the solver and its tolerances."""
    settings = {key: getattr(args, key) for key in PIXEL_SETTINGS}
    if getattr(args, "solver", None) == "dopri5":
        settings.update({key: getattr(args, key) for key in DOPRI5_SETTINGS})
    identity = {
        "checkpoint": loaded.identity(),
        "config": loaded.config.to_dict(),
        "decoder": None if decoder is None else {k: decoder[k] for k in ("spec", "name", "weights_sha256")},
        "resolution": resolution,
        "device_type": device.type,
        "settings": settings,
    }
    if guide is not None:
        identity["guide"] = {**guide.identity(), "config": guide.config.to_dict()}
    return identity


def identity_key(identity):
    """The part of an identity that must match to reuse a folder (not the checkpoint's path or
    run, nor the guide's; not the NFE measured)."""
    if not isinstance(identity, dict):
        return None
    left_out = ("checkpoint", "decoder", "created", "code", "guide", *MEASURED)
    key = {k: v for k, v in identity.items() if k not in left_out}
    key["weights"] = (identity.get("checkpoint") or {}).get("weights_sha256")
    key["decoder"] = (identity.get("decoder") or {}).get("weights_sha256")
    if identity.get("guide") is not None:  # only when guided: unguided identities keep their old key
        key["guide"] = {"weights": identity["guide"].get("weights_sha256"), "config": identity["guide"].get("config")}
    return key


def _guide_text(identity):
    guide = (identity or {}).get("guide")
    if guide is None:
        return "none"
    return f"{str(guide.get('weights_sha256'))[:12]} ({guide.get('path')}, {guide.get('which')} weights)"


def identity_differences(stored, current):
    """Human-readable differences between two identities ('what: there -> now')."""
    a, b = identity_key(stored) or {}, identity_key(current)
    out = []
    if a.get("weights") != b["weights"]:
        there = (stored or {}).get("checkpoint") or {}
        out.append(f"checkpoint weights {str(a.get('weights'))[:12]} ({there.get('path')}) there, "
                   f"{b['weights'][:12]} ({current['checkpoint']['path']}) now")
    if a.get("guide") != b.get("guide"):
        out.append(f"guide {_guide_text(stored)} there, {_guide_text(current)} now")
    for group in ("settings", "config"):
        there, now = a.get(group) or {}, b[group]
        for k in [*now, *(k for k in there if k not in now)]:  # keys of either side (solver: dopri5 only)
            if there.get(k) != now.get(k):
                out.append(f"{k} {there.get(k)} there, {now.get(k)} now")
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
