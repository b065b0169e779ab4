"""The model, decoder and output folder of a sample set, each checked against the checkpoint."""
import os

from errors import UserError
from models.checkpoint import load_model
from models.config import DEFAULTS, ConfigError, given_flags
from models.vae import LatentNorm, LatentNormError, decoder_mismatch, load_vae, set_latent_norm, vae_identity
from sampling.errors import GenerateError


def load_sampling_model(args, hash_weights=True):
    """The checkpoint's EMA model and config (models.checkpoint.load_model): flags the checkpoint
    knows default to its values and must agree with them."""
    given = given_flags(args)
    try:
        return load_model(args.ckpt, given=given, which="ema", fused_attn=args.fused_attn, hash_weights=hash_weights)
    except ConfigError as exc:
        raise GenerateError(str(exc)) from None


# What the guide must share with the main model: the same inputs, classes and interpolant.
GUIDE_MUST_MATCH = ("in_channels", "input_size", "num_classes", "path_type")


def load_guide(args, main, hash_weights=True):
    """The autoguidance model of --guide-ckpt (its --guide-weights entry) through the one loader, or
    None without --guide-ckpt. Fields its checkpoint does not record default to the main model's
    (``main``: its LoadedModel); the inputs, classes and path type must equal the main model's."""
    path = getattr(args, "guide_ckpt", None)
    if path is None:
        return None
    defaults = {**DEFAULTS, "num_classes": main.config.num_classes, "path_type": main.config.path_type}
    try:
        guide = load_model(path, defaults=defaults, which=args.guide_weights, fused_attn=args.fused_attn,
                           hash_weights=hash_weights)
    except UserError as exc:
        raise GenerateError(f"--guide-ckpt: {exc}") from None
    for key in GUIDE_MUST_MATCH:
        mine, theirs = getattr(guide.config, key), getattr(main.config, key)
        if mine != theirs:
            raise GenerateError(f"--guide-ckpt {path} has {key}={mine} but --ckpt {args.ckpt} has {key}={theirs}; "
                                "the guide must take the same inputs, classes and path type as the main model")
    return guide


def decoder_spec(args, config):
    """--vae, or its default: 'none' for a pixel-space model (3 input channels), else the authors' 'ema'."""
    if args.vae is not None:
        if args.vae != "none" and config.in_channels == 3:
            raise GenerateError(f"--vae {args.vae}: the checkpoint's model is pixel-space (3 input channels, trained "
                                "on images with --vae none), so there is no latent to decode; drop --vae")
        return args.vae
    return "none" if config.in_channels == 3 else "ema"


def open_decoder(spec, loaded, device):
    """(VAE or None, its record or None, latent channels, downsample factor). The VAE must match the
    model's input channels and, when the checkpoint records the VAE of its training latents, have
    the same encoder weights (the SD-VAE ft-EMA and ft-MSE share theirs) and the config's scaling /
    shift factor recorded there. The VAE carries the normalisation of that record (older or no
    record: the SD-VAE's 0.18215), so decoding inverts exactly what training did."""
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
    if vae is not None:
        mismatch = decoder_mismatch(vae, trained)
        if mismatch:
            raise GenerateError(f"--vae {spec} cannot decode the latents {os.path.basename(loaded.path)} was trained "
                                f"on: {mismatch}; pass --vae {trained.get('spec') or trained.get('name')}")
        try:
            norm = LatentNorm.from_record(trained)
        except LatentNormError as exc:
            raise GenerateError(f"--ckpt {loaded.path}: the latents' record in its provenance is unreadable ({exc}); "
                                "use a checkpoint written by train.py") from None
        if norm.channels is not None and norm.channels != channels:
            raise GenerateError(f"--ckpt {loaded.path} records per-channel statistics of {norm.channels} channels "
                                f"but --vae {spec} has {channels}; pick the VAE it was trained with")
        set_latent_norm(vae, norm)
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
    """``<sample_dir>/<folder>``, named as the authors' generate.py names it; with autoguidance
    ``-guide-<guide ckpt>`` follows the scale. The name is not the identity: ``provenance.json``
    inside is (see ``sample_set_identity``)."""
    model = config.model.replace("/", "-")
    ckpt = os.path.basename(args.ckpt).removesuffix(".pt")
    guide_path = getattr(args, "guide_ckpt", None)
    guide = "" if guide_path is None else f"-guide-{os.path.basename(guide_path).removesuffix('.pt')}"
    name = (f"{model}-enc{config.encoder_depth}-{ckpt}-size-{resolution}-vae-{vae_name(vae_spec)}-"
            f"cfg-{args.cfg_scale}{guide}-seed-{args.global_seed}-{args.mode}-{args.name_add}")
    return os.path.join(args.sample_dir, name)
