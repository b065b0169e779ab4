"""Checkpoint reading, writing and loading into a SiT.

Reads our checkpoints and the authors' (``{"model", "ema", "opt", "args", "steps"}``), official
SiT and REPA checkpoints (no ``classifier.*``; REPA adds ``projectors.*``), and bare state
dicts. Writes atomically: a crash mid-save leaves the previous file intact.

Integrity: every checkpoint this code writes carries ``checkpoint["integrity"]``, the sha256 of
each of its entries' content, computed when it is written (``seal``); every load verifies the
entries it uses against it (``verify``), so bytes damaged inside a tensor (which ``torch.load``
does not notice) are one line naming the file, not NaN weights. Files without the record (the
authors', older ones) load as before, unverified.
"""
import argparse
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from errors import UserError
from fileio import atomic_write, payload_bytes
from models.config import (DEFAULTS, MODEL_NAMES, SIT_SIZES, ConfigError, ModelConfig, config_from_sit_kwargs,
                           parse_model_name, resolve_config, resolve_crop)

# Heads of other codebases that a SiT may not have (reported as ignored, not unexpected).
IGNORED_PREFIXES = ("projectors.",)           # REPA's projection heads (real keys when the config aligns)
OPTIONAL_PREFIXES = ("classifier.",)          # the LSEP probe, absent from SiT / REPA weights
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile
MODEL_KWARGS_KEY = "model_kwargs"             # train.py stores SiT(...) kwargs as args.model_kwargs


# The authors store their flags as an argparse.Namespace; allowed once for the whole process (the
# safe_globals context manager is process-wide state, so threads loading at once would race on it).
torch.serialization.add_safe_globals([argparse.Namespace])


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


#################################################################################
#                   Integrity: content hashes written with the file             #
#################################################################################

INTEGRITY_KEY = "integrity"  # {entry: sha256 of its content}, written with the checkpoint
HASH_THREADS = min(8, os.cpu_count() or 1)  # hashlib releases the GIL: entries and tensors hash in parallel


def _tensor_bytes(tensor):
    tensor = tensor.detach().cpu().contiguous()
    return tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b""


def _leaves(obj, path=""):
    """(path, leaf) of a nested checkpoint entry, in a fixed order (dict keys sorted by repr)."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        for key in sorted(obj, key=repr):
            yield from _leaves(obj[key], f"{path}/{key!r}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, obj


def tree_sha256(obj):
    """Content hash of any checkpoint entry (nested dicts, lists, tensors, numbers, strings): the
    sha256 of one line per leaf (its path, its type, and the sha256 of a tensor's dtype, shape
    and bytes or the repr of any other value); tensors are hashed in parallel."""
    leaves = list(_leaves(obj))

    def leaf(item):
        path, value = item
        if torch.is_tensor(value):
            digest = hashlib.sha256(f"{value.dtype}|{tuple(value.shape)}|".encode())
            digest.update(_tensor_bytes(value))
            return f"{path}|tensor|{digest.hexdigest()}"
        return f"{path}|{type(value).__name__}|{value!r}"

    with ThreadPoolExecutor(HASH_THREADS) as pool:
        lines = list(pool.map(leaf, leaves))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _is_state_dict(value):
    return isinstance(value, dict) and bool(value) and all(isinstance(k, str) and torch.is_tensor(v)
                                                           for k, v in value.items())


def entry_sha256(value):
    """The recorded hash of one entry: ``weights_sha256`` for a state dict (so ``model`` / ``ema``
    record the very hash that sample sets and provenance use), ``tree_sha256`` for anything else."""
    return weights_sha256(value) if _is_state_dict(value) else tree_sha256(value)


def seal(checkpoint):
    """``checkpoint`` with its integrity record: the sha256 of every entry, computed in parallel."""
    if not isinstance(checkpoint, dict):
        return checkpoint
    entries = [key for key in checkpoint if key != INTEGRITY_KEY]
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        digests = dict(zip(entries, pool.map(lambda key: entry_sha256(checkpoint[key]), entries)))
    return {**checkpoint, INTEGRITY_KEY: digests}


def verify(checkpoint, path, entries=None):
    """Check ``entries`` of a loaded checkpoint (all recorded ones when None) against its integrity
    record. Returns the {entry: sha256} verified, or None when the file records no hashes (the
    authors', older ones). A mismatch or an entry missing from the file is a CheckpointError."""
    record = checkpoint.get(INTEGRITY_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(record, dict):
        return None
    entries = [e for e in (record if entries is None else entries) if e in record]
    missing = [e for e in entries if e not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} is damaged: it lacks the entries {missing} it was written with; "
                              "restore it from a backup or use another checkpoint")
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        found = dict(zip(entries, pool.map(lambda key: entry_sha256(checkpoint[key]), entries)))
    for entry, digest in found.items():
        if digest != record[entry]:
            raise CheckpointError(f"checkpoint {path} is damaged: its {entry!r} entry does not match the sha256 "
                                  f"recorded when it was written ({digest[:12]} now, {record[entry][:12]} then); "
                                  "restore it from a backup or use another checkpoint")
    return found


def atomic_save(obj, path):
    """torch.save of ``seal(obj)`` via fileio.atomic_write: temporary `.tmp-<host>-<pid>-<name>`,
    fsync, rename over ``path``. A crash leaves the previous file intact; a full disk raises
    fileio.DiskFull (one line)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sealed = seal(obj)
    atomic_write(path, lambda f: torch.save(sealed, f), expected_bytes=payload_bytes(sealed))


def load_checkpoint_file(path, verify_entries="all"):
    """torch.load on CPU with safe unpickling (argparse.Namespace allowed, as the authors store args),
    then ``verify`` of ``verify_entries`` ("all" recorded entries, a list of entries, or None)."""
    if os.path.isdir(path):
        found = sorted(name for name in os.listdir(path) if name.endswith(".pt"))
        raise CheckpointError(f"checkpoint {path} is a folder, not a .pt file"
                              + (f"; pass a file inside it, e.g. {os.path.join(path, found[-1])}" if found else
                                 "; pass a checkpoint file, e.g. EXP/checkpoints/0400000.pt"))
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # mmap: ranks that load the same file share its pages instead of each holding a copy
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
                              "it may be truncated or not a PyTorch checkpoint") from None
    if verify_entries is not None:
        verify(checkpoint, path, None if verify_entries == "all" else verify_entries)
    return checkpoint


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


def weights_entry(checkpoint, which="ema"):
    """The entry holding the model weights: ``which`` ("ema" or "model") when present, the other
    one otherwise, else "state_dict"; "state dict" when the object itself is the weights."""
    if isinstance(checkpoint, dict):
        for key in (which, "ema" if which == "model" else "model", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                return key
    return "state dict"


def extract_state_dict(checkpoint, which="ema"):
    """The model weights in a checkpoint (``weights_entry``), wrapper prefixes stripped."""
    entry = weights_entry(checkpoint, which)
    if entry != "state dict":
        checkpoint = checkpoint[entry]
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


#################################################################################
#                  One loader: a model and its config from any checkpoint        #
#################################################################################

def weights_sha256(state, prefixes=None):
    """Content hash of a state dict (names, dtypes, shapes and bytes, in sorted name order);
    ``prefixes`` restricts it to keys starting with one of them. The identity of a set of weights."""
    digest = hashlib.sha256()
    for key in sorted(state):
        if prefixes is not None and not key.startswith(tuple(prefixes)):
            continue
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def shape_facts(state):
    """Config fields that the weights themselves fix: sizes, channels, input size, qk-norm, classes."""
    facts = {"qk_norm": any(".attn.q_norm." in k for k in state)}
    proj, pos = state.get("x_embedder.proj.weight"), state.get("pos_embed")
    if proj is not None and proj.ndim == 4:
        facts.update(hidden_size=proj.shape[0], in_channels=proj.shape[1], patch_size=proj.shape[2])
        if pos is not None:
            facts["input_size"] = math.isqrt(pos.shape[1]) * proj.shape[2]
        fc1 = state.get("blocks.0.mlp.fc1.weight")
        if fc1 is not None:
            facts["mlp_ratio"] = fc1.shape[0] / proj.shape[0]
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    if blocks:
        facts["depth"] = max(blocks) + 1
    head = state.get("classifier.1.weight")
    if head is not None:
        facts["num_classes"] = head.shape[0]
    # REPA's projector MLPs (projectors.N.{0,2,4}): their hidden width and each encoder's token width
    heads = sorted({int(k.split(".")[1]) for k in state if k.startswith("projectors.") and k.split(".")[1].isdigit()})
    if heads and heads == list(range(len(heads))) and all(f"projectors.{i}.{j}.weight" in state
                                                          for i in heads for j in (0, 2, 4)):
        facts["z_dims"] = tuple(state[f"projectors.{i}.4.weight"].shape[0] for i in heads)
        facts["projector_dim"] = state["projectors.0.0.weight"].shape[0]
    return facts


def stored_facts(checkpoint, state):
    """(config fields a checkpoint records, its kind): ours ("config"), ours before the config
    object ("model_kwargs"), the authors' or REPA's training args, or none ("state dict")."""
    if not isinstance(checkpoint, dict):
        return {}, "state dict"
    if isinstance(checkpoint.get("config"), dict):
        return ModelConfig.from_dict(checkpoint["config"]).to_dict(all_fields=True), "config"
    kwargs = checkpoint_model_kwargs(checkpoint)
    if kwargs:
        stored = config_from_sit_kwargs(kwargs).to_dict(all_fields=True)
        stored["path_type"] = checkpoint_args(checkpoint, "path_type", "linear")
        return stored, "model_kwargs"
    if checkpoint.get("args") is None:
        return {}, "state dict"
    is_repa = any(k.startswith(IGNORED_PREFIXES) for k in state)  # REPA's --encoder-depth is its alignment depth
    get = lambda name: checkpoint_args(checkpoint, name)  # noqa: E731
    stored = {"num_classes": get("num_classes"), "qk_norm": get("qk_norm"), "path_type": get("path_type"),
              "class_dropout_prob": get("cfg_prob")}
    if is_repa:  # REPA trains no probe; its --enc-type names the encoders its projectors were aligned to
        names = tuple(n.strip() for n in (get("enc_type") or "").split(",") if n.strip())
        stored.update(probe=False, enc_type=names or None, align_depth=get("encoder_depth"),
                      projector_dim=get("projector_dim"))
    if get("model") in MODEL_NAMES:  # their --model: its sizes (checked against the weights below)
        size, patch = parse_model_name(get("model"))
        stored.update(zip(("depth", "hidden_size", "num_heads"), SIT_SIZES[size]), patch_size=patch)
    if not is_repa:
        stored.update(encoder_depth=get("encoder_depth"), uncond_prob=get("uncond_prob"), probe=True)
        pos = state.get("pos_embed")
        if get("crop_start") is not None and pos is not None:
            stored["crop_start"], stored["crop_end"] = resolve_crop(
                get("crop_start"), get("crop_end"), math.isqrt(pos.shape[1]), get("random_crop"))
    return {k: v for k, v in stored.items() if v is not None or k.startswith("crop_")}, \
        "REPA args" if is_repa else "authors' args"


def config_from_checkpoint(checkpoint, state, given=None, defaults=None, source="the checkpoint"):
    """The ModelConfig of ``state`` (the weights read from ``checkpoint``), via
    ``models.config.resolve_config``: each field comes from what the weights fix, else what the
    checkpoint records, else the flags ``given`` explicitly, else ``defaults`` (the authors'
    defaults when None). Returns (config, kind of checkpoint); contradictions raise ConfigError."""
    facts = shape_facts(state)
    stored, kind = stored_facts(checkpoint, state)
    if kind not in ("config", "model_kwargs") and (not stored.get("enc_type") or "z_dims" not in facts):
        # other codebases' files: alignment needs both the encoder names (REPA's args) and the
        # projectors (the weights); with either missing the projectors are ignored, as any other head
        for key in ("enc_type", "z_dims", "projector_dim", "align_depth"):
            stored.pop(key, None)
            facts.pop(key, None)
    for key, value in facts.items():  # a record that disagrees with its own weights is a broken checkpoint
        if stored.get(key) is not None and stored[key] != value:
            raise CheckpointError(f"{source} records {key}={stored[key]} but its weights have {key}={value}")
    window = (stored.pop("crop_start"), stored.pop("crop_end")) if "crop_start" in stored else None
    defaults = dict(DEFAULTS if defaults is None else defaults)
    table = state.get("y_embedder.embedding_table.weight")
    if table is not None:
        defaults["num_classes"] = table.shape[0] - 1  # SiT / REPA weights carry a null row
    config = resolve_config({**stored, **facts}, dict(given or {}), defaults, source, window)
    if table is not None and table.shape[0] not in (config.num_classes, config.num_classes + 1):
        raise ConfigError(f"--num-classes {config.num_classes} contradicts {source}, whose label table has "
                          f"{table.shape[0]} rows")
    if table is not None and table.shape[0] == config.num_classes and config.has_null_label:
        config = config.replace(class_dropout_prob=0.0, uncond_prob=0.0)  # no null row: trained without dropout
    return config, kind


@dataclass
class LoadedModel:
    """What ``load_model`` returns: the model (eval mode, CPU, gradients off), its config, the load
    report, and what identifies the weights (their sha256, the training run that made them)."""
    model: object
    config: object
    report: LoadReport
    path: str
    which: str
    weights_sha256: str
    kind: str
    steps: int = None
    provenance: dict = field(default_factory=dict)
    verified: bool = False  # the weights matched the content hash recorded when the file was written

    def identity(self):
        """The checkpoint's part of a sample set's identity."""
        return {"path": os.path.abspath(self.path), "which": self.which, "weights_sha256": self.weights_sha256,
                "steps": self.steps, "run_id": self.provenance.get("run_id")}


def _holds_tensors(value):
    return any(torch.is_tensor(leaf) for _, leaf in _leaves(value))


def load_weights_file(path, which="ema"):
    """(checkpoint, verified hashes or None) for a tool that reads one set of weights: the file
    loaded, its ``which`` weights entry and every entry without tensors (config, provenance, args,
    steps) verified against its integrity record; the other weights and the optimizer state are
    not read."""
    checkpoint = load_checkpoint_file(path, verify_entries=None)
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get(INTEGRITY_KEY), dict)):
        return checkpoint, None
    used = weights_entry(checkpoint, which)
    return checkpoint, verify(checkpoint, path, [e for e in checkpoint[INTEGRITY_KEY] if e == used or
                                                 (e in checkpoint and not _holds_tensors(checkpoint[e]))])


def load_model(path, given=None, defaults=None, which="ema", fused_attn=True, checkpoint=None, hash_weights=True):
    """Rebuild the model of any checkpoint (ours, the authors', SiT, REPA, bare state dicts) with
    its ``which`` weights; see ``config_from_checkpoint`` for ``given`` and ``defaults``.
    ``checkpoint``: the already loaded (and verified) file, to avoid reading it twice.

    A file read here is verified against its integrity record: the weights used and every entry
    without tensors (config, provenance, args, steps); the other weights and the optimizer state
    are not read. ``hash_weights=False`` skips the sha256 of unrecorded weights (seconds for
    SiT-XL/2) where nobody reads it; recorded ones are always hashed, to verify them."""
    from models.sit import SiT

    verified = None
    if checkpoint is None:
        checkpoint, verified = load_weights_file(path, which)
    state = extract_state_dict(checkpoint, which)
    source = f"checkpoint {path}"
    config, kind = config_from_checkpoint(checkpoint, state, given, defaults, source)
    model = SiT(config, fused_attn=fused_attn)
    report = load_state_into(model, state, source=source)
    is_dict = isinstance(checkpoint, dict)
    used = weights_entry(checkpoint, which)
    digest = (verified or {}).get(used)
    if digest is None or set(state) != set(checkpoint[used]):  # unrecorded, or wrapper prefixes were stripped
        digest = weights_sha256(state) if hash_weights else None
    steps = checkpoint.get("steps") if is_dict else None
    return LoadedModel(model=model.eval().requires_grad_(False), config=config, report=report, path=path, which=used,
                       weights_sha256=digest, kind=kind, steps=int(steps) if steps is not None else None,
                       provenance=dict(checkpoint.get("provenance") or {}) if is_dict else {},
                       verified=verified is not None)
