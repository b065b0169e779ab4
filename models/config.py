"""``ModelConfig``: the one description of a SiT + LSEP model and its method, stored in every checkpoint.

Every fact that fixes what a checkpoint's weights mean lives here, once: the size table
(``SIT_SIZES``), the parser of model names, the token grid, the probe's crop window and the
interpolant (``path_type``). ``train.py`` builds a config from its flags and the data, saves it
as ``checkpoint["config"]``; ``models.checkpoint.load_model`` rebuilds it from any checkpoint,
and every tool (generate, probe, resume, benchmarks) takes the model from there. A flag that
contradicts what a checkpoint knows is a one-line ``ConfigError`` naming both values.

Adding a field (e.g. a second probe depth): (1) add it to ``ModelConfig`` below with its
default; (2) add its flag to ``FLAGS`` (None if no flag sets it); (3) define that flag in
train.py's ``parse_args`` with ``default=None`` (and in generate.py / probe.py if sampling or
probing must be able to state it); ``given_flags`` then passes it on everywhere; (4) validate it
in ``__post_init__``; (5) use it in ``models/sit.py``. Checkpoints without the field read back
with its default; ``tests/test_structure.py`` fails while a field and the flags disagree.
"""
import dataclasses
import re
from dataclasses import dataclass

from errors import UserError
from flagcheck import AT_LEAST_1, UNIT

# name -> (depth, hidden_size, num_heads); the single place model sizes live.
SIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCH_SIZES = (2, 4, 8)
MODEL_NAMES = tuple(f"SiT-{size}/{patch}" for size in SIT_SIZES for patch in PATCH_SIZES)
PATH_TYPES = ("linear", "cosine")
DEFAULT_PROJECTOR_DIM = 2048  # REPA's --projector-dim
DEFAULT_ALIGN_DEPTH = 8       # REPA's --encoder-depth (the alignment depth; ours is the probe depth)
_MODEL_NAME = re.compile(r"^SiT-(S|B|L|XL)/(\d+)$")

# config field -> the command-line flag of train.py that sets it: the one field-to-flag map. Every
# message that names a flag, and every tool's ``given_flags`` (train.py, generate.py, probe.py take
# the flags they define), read it. None: no flag (fixed by the weights: 4 in every SiT).
FLAGS = {
    "model": "--model", "input_size": "--resolution", "in_channels": "--vae", "num_classes": "--num-classes",
    "depth": "--depth", "hidden_size": "--hidden-size", "num_heads": "--num-heads", "patch_size": "--patch-size",
    "mlp_ratio": None, "class_dropout_prob": "--cfg-prob", "encoder_depth": "--encoder-depth",
    "uncond_prob": "--uncond-prob", "crop_start": "--crop-start", "crop_end": "--crop-end",
    "qk_norm": "--qk-norm", "path_type": "--path-type", "probe": "--probe",
    "enc_type": "--enc-type", "z_dims": "--enc-type", "projector_dim": "--projector-dim",
    "align_depth": "--align-depth",
}
# Fields whose flag only informs them: the input comes from the data (--resolution is in pixels,
# --vae sets the channels), the encoder names and widths from --enc-type (models.encoders.alignment_fields).
DERIVED_FIELDS = ("input_size", "in_channels", "enc_type", "z_dims")
# --random-crop: not a field; a switch resolved, with --crop-start/--crop-end, into the crop window
CROP_SWITCH = ("random_crop", "--random-crop")
# REPA alignment fields: left out of ``to_dict`` while alignment is off, so a run without it stores
# the same config as before they existed (and older code still reads it).
ALIGNMENT_FIELDS = ("enc_type", "z_dims", "projector_dim", "align_depth")


INT_FIELDS = ("input_size", "in_channels", "num_classes", "depth", "hidden_size", "num_heads", "patch_size",
              "encoder_depth")
# The range rule of each numeric field: ModelConfig validates with it, and train.py checks the
# flags that set these fields against it at parse time (training.flags), so the rule is written once.
FIELD_RANGES = {**{key: AT_LEAST_1 for key in INT_FIELDS}, "class_dropout_prob": UNIT, "uncond_prob": UNIT}


def flag_dest(flag):
    """argparse's attribute name of a flag: '--cfg-prob' -> 'cfg_prob'."""
    return flag.lstrip("-").replace("-", "_")


def given_flags(args):
    """{field: value} of the FLAGS a tool's parsed ``args`` define and that set a field directly
    (None = not given), plus the crop switch; what ``resolve_config`` takes as ``given``."""
    out = {field: getattr(args, flag_dest(flag)) for field, flag in FLAGS.items()
           if flag is not None and field not in DERIVED_FIELDS and hasattr(args, flag_dest(flag))}
    if hasattr(args, CROP_SWITCH[0]):
        out[CROP_SWITCH[0]] = getattr(args, CROP_SWITCH[0])
    return out


class ConfigError(UserError, ValueError):
    """A model/method setting that cannot work or contradicts a checkpoint; the message names the flag."""


def parse_model_name(name):
    """'SiT-XL/2' -> ('XL', 2); anything else raises ConfigError listing the choices."""
    match = _MODEL_NAME.match(name or "")
    if match is None or name not in MODEL_NAMES:
        raise ConfigError(f"--model {name!r} is not a SiT config; choose one of {', '.join(MODEL_NAMES)}")
    return match.group(1), int(match.group(2))


def check_align_depth(align_depth, depth, model_name="--model"):
    """--align-depth counts blocks from 1 (REPA's --encoder-depth, default 8)."""
    if not 1 <= align_depth <= depth:
        raise ConfigError(f"--align-depth {align_depth} must be in [1, {depth}] for --model {model_name}")


def model_name_for(depth, hidden_size, num_heads, patch_size):
    """The table name of these sizes ('SiT-B/2'), or 'custom' when no entry has them."""
    for size, entry in SIT_SIZES.items():
        if entry == (depth, hidden_size, num_heads) and patch_size in PATCH_SIZES:
            return f"SiT-{size}/{patch_size}"
    return "custom"


def heads_for_width(hidden_size):
    """Heads of the table entry of this width (weights do not store the head count), or None."""
    heads = {width: h for _, width, h in SIT_SIZES.values()}
    return heads.get(hidden_size)


def resolve_crop(crop_start, crop_end, grid, random_crop=None):
    """The probe's crop window (start, exclusive end) in tokens, or (None, None) for mean pooling.

    The authors' rule: crop is on when ``crop_start`` is below the grid side; the end defaults to
    grid + 1 (17 at 256 px, patch 2). ``random_crop=False`` forces it off.
    """
    if random_crop is False or crop_start is None or crop_start >= grid:
        return None, None
    crop_end = grid + 1 if crop_end is None else int(crop_end)
    if crop_start < 1 or crop_end <= crop_start:
        raise ConfigError(f"--crop-start {crop_start} / --crop-end {crop_end}: the window sides "
                          f"[start, end) are empty; need 1 <= --crop-start < --crop-end")
    if crop_end > grid + 1:
        raise ConfigError(f"--crop-end {crop_end} (exclusive) allows windows larger than the {grid}x{grid} token "
                          f"grid; set --crop-end <= {grid + 1} or leave it out")
    return int(crop_start), crop_end


@dataclass(frozen=True)
class ModelConfig:
    """A SiT + LSEP model and the method facts its weights depend on (docs/method.md: "Model", "Probe branch", "Loss").

    Sizes default to the ``model`` entry of ``SIT_SIZES``; ``crop_start``/``crop_end`` hold the
    resolved window (None: pool all tokens). Validation happens on construction.
    """
    model: str = "SiT-XL/2"         # a SIT_SIZES entry, or 'custom' (sizes given, or overridden)
    input_size: int = 32            # side of the model input (latent side, or pixels for pixel-space models)
    in_channels: int = 4
    num_classes: int = 1000
    depth: int = None
    hidden_size: int = None
    num_heads: int = None
    patch_size: int = None
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # label dropout of the main branch (for CFG)
    encoder_depth: int = 8           # the probe reads the tokens after this block
    uncond_prob: float = 0.9         # null-label probability of the probe branch
    crop_start: int = None
    crop_end: int = None
    qk_norm: bool = False
    path_type: str = "linear"
    probe: bool = True               # False: the SiT baseline (no probe branch or loss)
    # REPA alignment (sihyun-yu/REPA): off while enc_type is empty
    enc_type: tuple = ()             # --enc-type encoder names (REPA's), one projector each
    z_dims: tuple = ()               # each encoder's token width (the projector's output)
    projector_dim: int = DEFAULT_PROJECTOR_DIM  # hidden width of the projector MLPs
    align_depth: int = DEFAULT_ALIGN_DEPTH      # tokens after this block (1-based) are aligned; REPA's --encoder-depth

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen)
        if self.model != "custom":
            size, patch = parse_model_name(self.model)
            depth, hidden, heads = SIT_SIZES[size]
            for key, value in (("depth", depth), ("hidden_size", hidden), ("num_heads", heads), ("patch_size", patch)):
                if getattr(self, key) is None:
                    set_(key, value)
        missing = [FLAGS[k] for k in ("depth", "hidden_size", "num_heads", "patch_size") if getattr(self, k) is None]
        if missing:
            raise ConfigError(f"--model custom needs {', '.join(missing)}")
        for key in INT_FIELDS:
            set_(key, int(getattr(self, key)))
        for key in ("mlp_ratio", "class_dropout_prob", "uncond_prob"):
            set_(key, float(getattr(self, key)))
        for key, rule in FIELD_RANGES.items():
            if not rule.holds(getattr(self, key)):
                raise ConfigError(f"{FLAGS[key] or key} must be {rule.describe()}, got {getattr(self, key)}")
        # the name follows the sizes (one source): overridden sizes make a 'custom' model
        set_("model", model_name_for(self.depth, self.hidden_size, self.num_heads, self.patch_size))
        set_("qk_norm", bool(self.qk_norm))
        set_("probe", bool(self.probe))
        if self.input_size % self.patch_size:
            raise ConfigError(f"input size {self.input_size} (from --resolution and the data) is not divisible by "
                              f"the patch size {self.patch_size} (--model / --patch-size)")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"--hidden-size {self.hidden_size} is not divisible by --num-heads {self.num_heads}")
        if not 1 <= self.encoder_depth <= self.depth:
            raise ConfigError(f"--encoder-depth {self.encoder_depth} must be in [1, depth={self.depth}]")
        if self.path_type not in PATH_TYPES:
            raise ConfigError(f"--path-type {self.path_type!r}: choose one of {', '.join(PATH_TYPES)}")
        if self.crop_start is not None or self.crop_end is not None:
            start, end = resolve_crop(self.crop_start, self.crop_end, self.grid_size)
            if start is None:  # a stored window as large as the grid is plain mean pooling
                raise ConfigError(f"--crop-start {self.crop_start} is not below the {self.grid_size}x{self.grid_size} "
                                  "token grid, so there is no crop; leave the crop fields unset")
            set_("crop_start", start)
            set_("crop_end", end)
        set_("enc_type", tuple(str(n) for n in self.enc_type or ()))
        set_("z_dims", tuple(int(z) for z in self.z_dims or ()))
        set_("projector_dim", int(self.projector_dim))
        set_("align_depth", int(self.align_depth))
        if len(self.z_dims) != len(self.enc_type) or min(self.z_dims, default=1) < 1:
            raise ConfigError(f"--enc-type {','.join(self.enc_type)} needs one positive token width per encoder, "
                              f"got z_dims {self.z_dims}")
        if self.aligned:
            check_align_depth(self.align_depth, self.depth, self.model)
            if self.projector_dim < 1:
                raise ConfigError(f"--projector-dim must be >= 1, got {self.projector_dim}")
        elif (self.projector_dim, self.align_depth) != (DEFAULT_PROJECTOR_DIM, DEFAULT_ALIGN_DEPTH):
            raise ConfigError(f"--align-depth {self.align_depth} / --projector-dim {self.projector_dim} only apply "
                              "with --enc-type (REPA alignment); drop them or pass --enc-type")

    # ---- derived facts, computed here only ----
    @property
    def grid_size(self):
        """Tokens per side of the patch grid."""
        return self.input_size // self.patch_size

    @property
    def null_label(self):
        """Index of the null ('unconditional') label row."""
        return self.num_classes

    @property
    def has_null_label(self):
        return self.class_dropout_prob > 0 or self.uncond_prob > 0

    @property
    def random_crop(self):
        return self.crop_start is not None

    @property
    def aligned(self):
        """REPA alignment on: projectors after block ``align_depth``, one per ``enc_type`` encoder."""
        return bool(self.enc_type)

    # ---- conversions ----
    def to_dict(self, all_fields=False):
        """The fields as a dict (what checkpoints store); the alignment fields only when alignment
        is on, unless ``all_fields``."""
        out = dataclasses.asdict(self)
        if not self.aligned and not all_fields:
            for key in ALIGNMENT_FIELDS:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, values, source="checkpoint"):
        """Rebuild from ``to_dict`` output; fields a newer version added may be absent (defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source} has model config fields this code does not know: {unknown}; "
                              "update this codebase")
        return cls(**values)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def sit_kwargs(self):
        """Keyword arguments of ``SiT(...)`` (the authors' constructor names)."""
        out = self.to_dict()
        out.pop("model")
        return out

    def describe(self):
        crop = f"crop {self.crop_start}..{self.crop_end - 1}" if self.random_crop else "no crop"
        probe = f"probe at block {self.encoder_depth} ({crop}, uncond {self.uncond_prob})" if self.probe else "no probe"
        align = (f", REPA alignment of block {self.align_depth} to {'+'.join(self.enc_type)} (projectors "
                 f"{self.projector_dim} wide)" if self.aligned else "")
        return (f"{self.model} (depth {self.depth}, width {self.hidden_size}, {self.num_heads} heads, patch "
                f"{self.patch_size}), input {self.in_channels}x{self.input_size}x{self.input_size}, "
                f"{self.num_classes} classes, {self.path_type} path, {probe}{align}")


def config_from_sit_kwargs(kwargs):
    """A ModelConfig for ``SiT(**kwargs)`` called with the authors' constructor arguments."""
    kwargs = dict(kwargs)
    if "random_crop_kwargs" in kwargs:  # the authors' form: [random_crop, crop_start, crop_end]
        random_crop, start, end = kwargs.pop("random_crop_kwargs")
        kwargs["crop_start"], kwargs["crop_end"] = (start, end) if random_crop else (None, None)
    for ignored in ("use_cfg", "decoder_hidden_size", "fused_attn"):
        kwargs.pop(ignored, None)
    unknown = set(kwargs) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise TypeError(f"SiT got unexpected keyword arguments: {sorted(unknown)}")
    depth, hidden, heads = SIT_SIZES["XL"]  # the authors' constructor defaults: SiT-XL/2 on 32x32x4 latents
    defaults = {"input_size": 32, "patch_size": 2, "in_channels": 4, "hidden_size": hidden, "depth": depth,
                "num_heads": heads}
    kwargs = {**defaults, **kwargs}
    if kwargs.get("crop_start") is not None:  # the constructor's rule: a window as large as the grid is no crop
        grid = kwargs["input_size"] // kwargs["patch_size"]
        kwargs["crop_start"], kwargs["crop_end"] = resolve_crop(kwargs["crop_start"], kwargs.get("crop_end"), grid)
    kwargs.setdefault("model", model_name_for(kwargs["depth"], kwargs["hidden_size"], kwargs["num_heads"],
                                              kwargs["patch_size"]))
    return ModelConfig(**kwargs)


def resolve_config(known, given, defaults, source, known_window=None):
    """A ModelConfig from what an artefact ``known``s (a checkpoint's record and weights, the data's
    geometry), the flags ``given`` explicitly (field -> value; None = not given) and ``defaults``.

    A given flag that contradicts a known value raises one line naming both. ``given`` may hold
    ``model`` (a table name, standing for its four sizes) and the raw crop flags ``random_crop``,
    ``crop_start``, ``crop_end``: they are resolved on the model's token grid and compared, as a
    window, with ``known_window`` (a checkpoint's (start, end), or None when it records none).
    """
    given = {k: v for k, v in given.items() if v is not None}
    known = {k: v for k, v in known.items() if v is not None}
    if "model" in given:
        size, patch = parse_model_name(given.pop("model"))
        depth, hidden, heads = SIT_SIZES[size]
        for key, value in (("depth", depth), ("hidden_size", hidden), ("num_heads", heads), ("patch_size", patch)):
            if key in given:  # --depth, --hidden-size, ... override the table entry
                continue
            if key in known and known[key] != value:
                raise ConfigError(f"--model SiT-{size}/{patch} contradicts {source}, which has {key}={known[key]} "
                                  f"(SiT-{size}/{patch} has {value}); drop --model")
            given[key] = value
    if "num_heads" not in known and "num_heads" not in given and "hidden_size" in known:
        known["num_heads"] = heads_for_width(known["hidden_size"])  # weights do not store the head count
    crop = {k: given.pop(k) for k in ("random_crop", "crop_start", "crop_end") if k in given}
    values = merge_known(known, given, {k: v for k, v in defaults.items() if k not in CROP_FLAGS}, source)
    missing = [FLAGS[k] for k in ("depth", "hidden_size", "num_heads", "patch_size") if k not in values]
    if missing:
        raise ConfigError(f"{source} does not say the model size: pass {' '.join(missing)} or --model")
    grid = values["input_size"] // values["patch_size"]
    asked = resolve_crop(crop.get("crop_start", defaults.get("crop_start")), crop.get("crop_end", defaults.get("crop_end")),
                         grid, crop.get("random_crop", defaults.get("random_crop")))
    if known_window is not None:
        if crop and asked != tuple(known_window):
            raise ConfigError(f"--crop-start/--crop-end/--random-crop give the probe window {_window(asked)} but "
                              f"{source} has {_window(known_window)}; drop the crop flags")
        asked = tuple(known_window)
    values["crop_start"], values["crop_end"] = asked
    values["model"] = "custom"  # the name follows the sizes
    return ModelConfig(**values)


CROP_FLAGS = ("random_crop", "crop_start", "crop_end")
# What a fresh run uses for every field no flag sets: the authors' defaults (their --crop-start 16
# leaves the crop off at 256 px, patch 2).
DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)
            if f.name not in ("model", "input_size", "in_channels", "crop_start", "crop_end")
            and f.default is not None}
DEFAULTS.update(crop_start=16, crop_end=None, random_crop=None)


def _window(window):
    return "none (mean of all tokens)" if window[0] is None else f"sides {window[0]}..{window[1] - 1}"


def merge_known(known, given, defaults, source):
    """Field values from what a checkpoint or the data ``known``s, the flags ``given`` explicitly and
    ``defaults``, in that order. A given flag that differs from a known value raises one line."""
    out = {}
    for key in set(known) | set(given) | set(defaults):
        have, flag = known.get(key), given.get(key)
        if have is not None and flag is not None and flag != have:
            raise ConfigError(f"{FLAGS.get(key, key)} {_show(flag)} contradicts {source}, which has "
                              f"{key}={_show(have)}; drop the flag (or pass {_show(have)})")
        value = have if have is not None else flag if flag is not None else defaults.get(key)
        if value is not None:
            out[key] = value
    return out


def _show(value):
    return value if not isinstance(value, bool) else ("on" if value else "off")
