"""Frozen external image encoders for REPA alignment, named as REPA's ``--enc-type``.

Every encoder is a timm ``VisionTransformer`` (timm is the field's library for these weights,
and its ``checkpoint_filter_fn`` already converts the original releases: DINOv2's torch.hub
files, OpenAI CLIP, I-JEPA, MAE). REPA itself builds DINOv2 through ``torch.hub`` and the
others from copies of each project's model file; the modules compute the same function, and
the official weight files load unchanged (MoCo v3's key prefix is fixed here, as REPA does).

Preprocessing, as REPA's ``preprocess_raw_image`` does it (uint8 images of side R):
  * every encoder: divide by 255 (uint8 -> float32 in [0, 1]);
  * DINOv2, I-JEPA (patch 14): normalise with the ImageNet mean/std, THEN resize (bicubic,
    half-pixel centres, no antialias) to 224 * R / 256, so the patch grid is R / 16 a side;
  * CLIP (patch 14): resize first, then normalise with CLIP's own mean/std;
  * MoCo v3, MAE, DINOv1 (patch 16): normalise only; the image keeps its size R, and the
    model's position embedding is resampled to the R / 16 grid when the weights load.
REPA writes the size as ``224 * (R // 256)``; ours is ``R * 7 // 8``, the same at 256 and 512
(REPA's two resolutions) and defined for any R divisible by 16 (tests use tiny images). The
order of resize and normalise differs per encoder in REPA and is kept: bicubic weights sum to
one, so the two orders agree up to float rounding, but ours gives REPA's bits.

Tokens (``Encoder.forward``), as REPA reads them: the patch tokens only (class and register
tokens dropped), (B, N, z_dim) with N = (R / 16) ** 2:
  * DINOv2: ``x_norm_patchtokens``, i.e. after the final LayerNorm;
  * MoCo v3, DINOv1, I-JEPA: after the final LayerNorm (I-JEPA has no class token);
  * MAE and CLIP: the last block's output WITHOUT the final norm (REPA's MAE ``forward_features``
    skips ``norm``; its CLIP wrapper stops before ``ln_post`` and the projection).

The encoder is frozen: eval mode for good, ``requires_grad=False``, forward under ``no_grad``,
and under autocast in ``amp_dtype`` (bf16 when training runs in mixed precision) if given.
"""
import math
import os
import warnings
import zipfile
from dataclasses import dataclass, replace

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from timm.data import OPENAI_CLIP_MEAN as CLIP_MEAN
from timm.data import OPENAI_CLIP_STD as CLIP_STD

from errors import UserError

_FB = "https://dl.fbaipublicfiles.com"


class EncoderWeightsMissing(UserError, FileNotFoundError):
    """No local weights for an encoder (and downloading is off or failed): one line, with the fix."""


class EncoderWeightsError(UserError, ValueError):
    """A weights file that does not fit the encoder named in --enc-type."""


@dataclass(frozen=True)
class EncoderSpec:
    """One ``--enc-type`` entry: the timm architecture and REPA's way of feeding and reading it.

    ``embed_dim`` .. ``prefix_tokens`` restate the timm architecture (``models/flops.py`` counts
    from them; ``tests/test_repa.py`` checks them against the built timm models).
    """
    timm_name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_in: int  # fc1 output width (SwiGLU: both halves)
    mlp_out: int  # fc2 input width
    prefix_tokens: int  # class + register tokens in the sequence
    resize: bool  # True: resized to 224 * R / 256 (patch 14); False: kept at R (patch 16)
    normalize_first: bool  # REPA normalises before resizing for DINOv2 / I-JEPA, after for CLIP
    final_norm: bool  # tokens taken after the final LayerNorm
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    url: str = ""  # the official weights (what REPA's loader reads)
    source: str = ""  # where to get them, for the error message
    overrides: tuple = ()  # extra timm kwargs as (key, value) pairs

    @property
    def z_dim(self):
        return self.embed_dim


def _dinov2(size, embed, depth, heads, reg=False):
    tag = f"vit{size}14" + ("_reg4" if reg else "")
    timm_name = f"vit_{dict(s='small', b='base', l='large', g='giant')[size]}_patch14_{'reg4_' if reg else ''}dinov2"
    mlp = (8192, 4096) if size == "g" else (4 * embed, 4 * embed)  # giant: SwiGLU, hidden 4096
    return EncoderSpec(
        timm_name, embed, depth, heads, 14, *mlp, 5 if reg else 1, resize=True, normalize_first=True,
        final_norm=True, url=f"{_FB}/dinov2/dinov2_vit{size}14/dinov2_{tag}_pretrain.pth",
        source=f"torch.hub facebookresearch/dinov2 dinov2_{tag}, timm {timm_name}.lvd142m",
    )


def _mocov3(size, embed, depth, heads):
    url = {"s": f"{_FB}/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar",
           "b": f"{_FB}/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar"}.get(size, "")
    name = {"s": "small", "b": "base", "l": "large"}[size]
    return EncoderSpec(
        f"vit_{name}_patch16_224", embed, depth, heads, 16, 4 * embed, 4 * embed, 1,
        resize=False, normalize_first=True, final_norm=True, url=url,
        source="github.com/facebookresearch/moco-v3 " + (f"vit-{size}-300ep.pth.tar" if url else
                                                          "(no public ViT-L file; REPA reads ckpts/mocov3_vitl.pth)"),
        overrides=(("num_heads", heads),),  # MoCo v3's ViT-S has 12 heads, timm's 6
    )


# REPA's --enc-type names -> spec; the one place encoder facts live.
ENCODERS = {
    **{f"dinov2-vit-{s}": _dinov2(s, *dims) for s, dims in
       {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}.items()},
    **{f"dinov2reg-vit-{s}": _dinov2(s, *dims, reg=True) for s, dims in
       {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}.items()},
    "dinov1-vit-b": EncoderSpec(
        "vit_base_patch16_224", 768, 12, 12, 16, 3072, 3072, 1, resize=False, normalize_first=True,
        final_norm=True, url=f"{_FB}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
        source="github.com/facebookresearch/dino dino_vitbase16_pretrain.pth (timm: vit_base_patch16_224.dino)"),
    **{f"mocov3-vit-{s}": _mocov3(s, *dims) for s, dims in
       {"s": (384, 12, 12), "b": (768, 12, 12), "l": (1024, 24, 16)}.items()},
    "clip-vit-L": EncoderSpec(
        "vit_large_patch14_clip_quickgelu_224", 1024, 24, 16, 14, 4096, 4096, 1, resize=True,
        normalize_first=False, final_norm=False, mean=CLIP_MEAN, std=CLIP_STD,
        url="https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
        source="OpenAI CLIP ViT-L/14 (clip.load('ViT-L/14'); timm: vit_large_patch14_clip_quickgelu_224.openai)"),
    "mae-vit-l": EncoderSpec(
        "vit_large_patch16_224", 1024, 24, 16, 16, 4096, 4096, 1, resize=False, normalize_first=True,
        final_norm=False, url=f"{_FB}/mae/pretrain/mae_pretrain_vit_large.pth",
        source="github.com/facebookresearch/mae mae_pretrain_vit_large.pth"),
    "jepa-vit-h": EncoderSpec(
        "vit_huge_patch14_gap_224", 1280, 32, 16, 14, 5120, 5120, 0, resize=True, normalize_first=True,
        final_norm=True, url=f"{_FB}/ijepa/IN1K-vit.h.14-300e.pth.tar",
        source="github.com/facebookresearch/ijepa IN1K-vit.h.14-300e.pth.tar (timm: vit_huge_patch14_gap_224.in1k_ijepa)",
        overrides=(("fc_norm", False),)),  # keep the final norm on the tokens, as I-JEPA's encoder
    # Not one of REPA's: a plain timm ViT of your own (e.g. trained on your data), fed as MoCo v3
    # (ImageNet mean/std, no resize) and read after the final norm; --enc-arch gives its size.
    "custom-vit": EncoderSpec(
        "vit_small_patch16_224", 384, 12, 6, 16, 1536, 1536, 1, resize=False, normalize_first=True,
        final_norm=True, source="a state dict of your own timm ViT (vit_small_patch16_224's layout, sized with "
                                "--enc-arch, e.g. embed_dim=64,depth=4,num_heads=4,patch_size=4)"),
}

# --enc-arch keys that change the shape models/flops.py counts and check_token_grid checks.
_SHAPE_KEYS = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio")


def encoder_spec(name, arch=None):
    """``ENCODERS[name]`` with the shape of ``--enc-arch`` (parsed timm kwargs) applied: the one
    description of the encoder that is built, counted (models/flops.py) and grid-checked."""
    spec = ENCODERS[name]
    arch = {k: v for k, v in (arch or {}).items() if k in _SHAPE_KEYS}
    if not arch:
        return spec
    embed = arch.get("embed_dim", spec.embed_dim)
    if "mlp_ratio" in arch:
        mlp_in = mlp_out = arch["mlp_ratio"] * embed
    else:  # timm keeps the MLP ratio when only the width changes
        mlp_in, mlp_out = spec.mlp_in * embed // spec.embed_dim, spec.mlp_out * embed // spec.embed_dim
    return replace(spec, embed_dim=embed, depth=arch.get("depth", spec.depth),
                   num_heads=arch.get("num_heads", spec.num_heads),
                   patch_size=arch.get("patch_size", spec.patch_size), mlp_in=mlp_in, mlp_out=mlp_out)


def encoder_input_size(spec, resolution):
    """Side in pixels of the image the encoder sees for a dataset of side ``resolution``."""
    return resolution * 7 // 8 if spec.resize else resolution  # REPA: 224 * (R // 256)


def encoder_grid(spec, resolution):
    """Patch-token grid side of ``spec`` at ``resolution`` (R / 16 for every REPA encoder)."""
    return encoder_input_size(spec, resolution) // spec.patch_size


def parse_enc_type(enc_type, enc_path=None):
    """``--enc-type`` ("dinov2-vit-b,mocov3-vit-b=/w/moco.pth.tar") and ``--enc-path`` -> [(name, path|None)].

    ``--enc-path`` is one path for all encoders (a folder holding the official files) or a
    comma list with one file or folder per encoder, in ``--enc-type`` order. ``name=path`` wins.
    Empty / "none" = no encoder.
    """
    text = (enc_type or "").strip()
    if text.lower() in ("", "none"):
        return []
    entries = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, _, path = item.partition("=")
        name = name.strip()
        if name not in ENCODERS:
            raise ValueError(f"--enc-type {name!r} is not known; choose from {', '.join(ENCODERS)}")
        entries.append((name, path.strip() or None))
    paths = [p.strip() for p in (enc_path or "").split(",") if p.strip()]
    if len(paths) > 1 and len(paths) != len(entries):
        raise ValueError(f"--enc-path lists {len(paths)} paths for {len(entries)} encoders in --enc-type; "
                         "give one folder for all, or one path per encoder in the same order")
    if paths:
        paths = paths * len(entries) if len(paths) == 1 else paths
        entries = [(name, own or path) for (name, own), path in zip(entries, paths)]
    return entries


def create_vit(name, resolution, **arch_overrides):
    """The randomly initialised timm ViT of ``--enc-type`` ``name`` sized for ``resolution``.

    ``arch_overrides`` (e.g. ``embed_dim=32, depth=2, num_heads=2``) build a tiny model of the
    same code path for tests.
    """
    spec = ENCODERS[name]
    kwargs = dict(spec.overrides, num_classes=0, img_size=encoder_input_size(spec, resolution))
    kwargs.update(arch_overrides)
    patch = kwargs.get("patch_size", spec.patch_size)
    if kwargs["img_size"] % patch:
        raise ValueError(f"--enc-type {name} at --resolution {resolution} sees {kwargs['img_size']} px images, "
                         f"not a multiple of its patch {patch}; use a resolution divisible by 16")
    return timm.create_model(spec.timm_name, pretrained=False, **kwargs)


def _is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in zf.namelist())


def _find_in_folder(folder, spec):
    names = [os.path.basename(spec.url)] if spec.url else []
    names += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    for n in names:
        if os.path.isfile(os.path.join(folder, n)):
            return os.path.join(folder, n)
    raise EncoderWeightsMissing(f"{folder} holds none of {', '.join(names)}; put the weights file there "
                                f"or pass the file itself")


def read_state_dict(path):
    """A state dict from a torch / safetensors / TorchScript (OpenAI CLIP) file, on the CPU."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    if _is_torchscript(path):  # OpenAI's CLIP releases are TorchScript archives
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            return torch.jit.load(path, map_location="cpu").state_dict()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (error types vary across torch versions)
        pass
    try:  # the file the user named holds Python objects besides tensors (e.g. argparse.Namespace in MAE's)
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [""])[0]
        raise EncoderWeightsError(f"{path} is not a readable weights file ({type(exc).__name__}: {first}); "
                                  "pass the official .pth / .pth.tar / .safetensors file") from None


def _strip_mocov3(sd):
    """MoCo v3 checkpoints: keep ``module.base_encoder.*`` without the prefix or the head, and
    undo the checkpoint's misnamed ``norm13``/``fc13``/``norm14``/``fc14`` keys (REPA does too)."""
    out = {}
    for k, v in sd.items():
        if not k.startswith("module.base_encoder."):
            continue
        k = k[len("module.base_encoder."):]
        for bad, good in (("blocks.13.norm13", "blocks.13.norm1"), ("blocks.13.mlp.fc13", "blocks.13.mlp.fc1"),
                          ("blocks.14.norm14", "blocks.14.norm2"), ("blocks.14.mlp.fc14", "blocks.14.mlp.fc2")):
            k = k.replace(bad, good)
        if not k.startswith("head") and not k.startswith("fc."):
            out[k] = v
    return out


def load_weights(vit, name, path):
    """Load an official (or timm) weights file into ``vit`` strictly; pos-embeds are resampled."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = read_state_dict(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if any(k.startswith("module.base_encoder.") for k in sd):
        sd = _strip_mocov3(sd)
    # Original-format conversion (DINOv2 hub, OpenAI CLIP, I-JEPA, MAE 'model') and bicubic
    # antialiased pos-embed resampling to the model's grid: the timm function REPA also calls.
    sd = checkpoint_filter_fn(sd, vit)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # REPA deletes the heads
    fix = f"pass {ENCODERS[name].source}"
    try:
        missing, unexpected = vit.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # tensor shapes differ: another architecture's file
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise EncoderWeightsError(f"{path} does not fit --enc-type {name} ({ENCODERS[name].timm_name}): "
                                  f"{len(lines)} tensors of another shape, e.g. {lines[:1]}; {fix}") from None
    if missing or unexpected:
        raise EncoderWeightsError(
            f"{path} does not fit --enc-type {name} ({ENCODERS[name].timm_name}): {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}; {fix}")


def _cached_file(spec):
    """The official file in torch.hub's cache (where REPA's torch.hub.load put it), if there."""
    if not spec.url:
        return None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(spec.url))
    return path if os.path.isfile(path) else None


def resolve_weights(name, path=None, allow_download=False):
    """The local weights file for ``name``: ``path`` (file or folder), else torch.hub's cache,
    else a download when ``allow_download``; otherwise EncoderWeightsMissing, one line."""
    spec = ENCODERS[name]
    if path:
        if os.path.isdir(path):
            return _find_in_folder(path, spec)
        if not os.path.isfile(path):
            raise EncoderWeightsMissing(f"--enc-type {name}: weights file {path} does not exist")
        return path
    cached = _cached_file(spec)
    if cached:
        return cached
    where = f"{spec.url} ({spec.source})" if spec.url else spec.source
    hint = (f"--enc-type {name} needs its weights: get {where} and pass "
            f"--enc-type {name}=/path/to/{os.path.basename(spec.url) or 'weights.pth'} (or --enc-path FILE_OR_FOLDER)")
    if allow_download and spec.url:
        target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(spec.url))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            torch.hub.download_url_to_file(spec.url, target, progress=False)
        except Exception as exc:  # noqa: BLE001  (offline, proxy, HTTP errors)
            raise EncoderWeightsMissing(f"{hint}; the download failed ({type(exc).__name__})") from None
        return target
    raise EncoderWeightsMissing(hint)


class Encoder(nn.Module):
    """A frozen encoder: ``encoder(images_uint8)`` -> patch tokens (B, N, z_dim); see module doc."""

    def __init__(self, name, vit, resolution, amp_dtype=None):
        super().__init__()
        self.name, self.spec, self.resolution, self.amp_dtype = name, ENCODERS[name], resolution, amp_dtype
        self.vit = vit
        if not self.spec.final_norm:  # REPA reads MAE / CLIP tokens before the final norm
            self.vit.norm = nn.Identity()
        self.z_dim = vit.embed_dim
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.input_size = encoder_input_size(self.spec, resolution)
        self.grid_size = vit.patch_embed.grid_size[0]
        self.num_tokens = self.grid_size ** 2
        mean, std = torch.tensor(self.spec.mean), torch.tensor(self.spec.std)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode=True):
        """Frozen: stays in eval mode whatever the caller asks."""
        return super().train(False)

    def preprocess(self, images):
        """uint8 (B, 3, R, R) -> the float32 input REPA feeds this encoder (see module doc)."""
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            raise ValueError(f"--enc-type {self.name} was built for {self.resolution} px images "
                             f"(--resolution) but got {tuple(images.shape[-2:])}")
        x = images.float() / 255.0

        def normalize(x):
            return (x - self.mean) / self.std

        def resize(x):
            if not self.spec.resize:
                return x
            return F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)

        return resize(normalize(x)) if self.spec.normalize_first else normalize(resize(x))

    @torch.no_grad()
    def forward(self, images):
        x = self.preprocess(images)
        if self.amp_dtype is None:
            tokens = self.vit.forward_features(x)
        else:
            with torch.autocast(x.device.type, dtype=self.amp_dtype):
                tokens = self.vit.forward_features(x)
        return tokens[:, self.num_prefix_tokens:]


def build_encoder(name, resolution, weights=None, amp_dtype=None, allow_download=False, **arch_overrides):
    """One frozen ``Encoder``; ``weights`` is a file or folder (None: hub cache, download, or error)."""
    vit = create_vit(name, resolution, **arch_overrides)
    load_weights(vit, name, resolve_weights(name, weights, allow_download))
    return Encoder(name, vit, resolution, amp_dtype)


def load_encoders(enc_type, resolution, device="cpu", enc_path=None, amp_dtype=None, allow_download=False,
                  **arch_overrides):
    """All encoders of ``--enc-type`` (see ``parse_enc_type``), frozen, on ``device``.

    Every missing weights file is reported before anything large is built.
    """
    entries = parse_enc_type(enc_type, enc_path)
    files = [resolve_weights(name, path, allow_download) for name, path in entries]
    return [build_encoder(name, resolution, f, amp_dtype, **arch_overrides).to(device)
            for (name, _), f in zip(entries, files)]


def parse_arch_overrides(text):
    """The hidden test flag ``--enc-arch embed_dim=32,depth=2,num_heads=2`` -> timm kwargs (ints)."""
    out = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, _, value = item.partition("=")
        if not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--enc-arch {text!r}: expected key=int pairs, e.g. embed_dim=32,depth=2,num_heads=2")
        out[key.strip()] = int(value)
    return out


def check_token_grid(encoders, sit_tokens, model_name="--model", resolution=None, arch=None):
    """Start-up check: REPA aligns token by token, so every encoder's patch grid must equal the
    SiT's (16x16 at 256 px: SiT-*/2 on 32x32 latents, encoders at 224 px with patch 14 or 256 px
    with patch 16). ``encoders``: ``--enc-type`` names (with ``resolution``; checkable before any
    weights load; ``arch``: the parsed --enc-arch) or built ``Encoder`` objects."""
    for enc in encoders:
        name = enc if isinstance(enc, str) else enc.name
        tokens = encoder_grid(encoder_spec(name, arch), resolution) ** 2 if isinstance(enc, str) else enc.num_tokens
        if tokens != sit_tokens:
            side, sit_side = math.isqrt(tokens), math.isqrt(sit_tokens)
            res = f" at --resolution {resolution}" if resolution else ""
            raise ValueError(
                f"--enc-type {name} gives {side}x{side} patch tokens{res} but --model {model_name} has "
                f"{sit_side}x{sit_side}; REPA aligns token by token: use a patch-2 model (SiT-*/2) or drop --enc-type")


def alignment_fields(enc_type, enc_arch=""):
    """The ModelConfig fields that ``--enc-type`` sets: the encoder names and their token widths
    (``z_dims``), or {} when the flag was not given (a resumed run keeps its checkpoint's)."""
    if enc_type is None:
        return {}
    names = tuple(name for name, _ in parse_enc_type(enc_type))
    arch = parse_arch_overrides(enc_arch)
    return {"enc_type": names, "z_dims": tuple(encoder_spec(n, arch).z_dim for n in names)}


def training_encoders(config, enc_type, enc_path, resolution, device, amp_dtype=None, allow_download=False,
                      enc_arch=""):
    """The frozen encoders of ``config.enc_type`` (REPA) for training, [] when alignment is off.

    Weight files come from ``--enc-type name=path`` / ``--enc-path`` (for a resumed run that omits
    --enc-type: --enc-path or torch.hub's cache). Token grids and widths are checked against the
    model: one line naming the flag.
    """
    if not config.aligned:
        return []
    entries = parse_enc_type(enc_type or ",".join(config.enc_type), enc_path)
    if tuple(name for name, _ in entries) != config.enc_type:
        raise ValueError(f"--enc-type {enc_type} differs from the model's encoders {','.join(config.enc_type)}")
    arch = parse_arch_overrides(enc_arch)
    check_token_grid(list(config.enc_type), config.grid_size ** 2, config.model, resolution, arch)  # before weights
    spec = ",".join(f"{name}={path}" if path else name for name, path in entries)
    encoders = load_encoders(spec, resolution, device, None, amp_dtype, allow_download, **arch)
    check_token_grid(encoders, config.grid_size ** 2, config.model, resolution)
    widths = tuple(e.z_dim for e in encoders)
    if widths != config.z_dims:
        raise ValueError(f"--enc-type {','.join(config.enc_type)} gives token widths {widths} but the model's "
                         f"projectors expect {config.z_dims}")
    return encoders
