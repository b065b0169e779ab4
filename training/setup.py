"""Start-up of a training run: everything a user can get wrong is checked here, before any step.

The accelerator, the data (and its VAE), the model config (flags + data, or the checkpoint being
resumed), REPA's encoders, the model with its EMA copy, the optimizer and the loss.
"""
import argparse
import contextlib
import copy
import os
import shutil

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

from dataset import CustomDataset
from devices import check_cuda
from errors import UserError
from fileio import check_writable, remove_stale_temps
from loss import LSEPLoss
from models.checkpoint import CheckpointError, config_from_checkpoint, extract_state_dict, weights_sha256
from models.config import DEFAULTS, MODEL_NAMES, ConfigError, given_flags, resolve_config
from models.encoders import EncoderWeightsError, EncoderWeightsMissing, alignment_fields, training_encoders
from models.fused import apply_speed_options, persistent_compile_cache
from models.sit import SiT
from models.vae import (VAEWeightsMissing, decoder_mismatch, downsample_factor, latent_channels, load_vae,
                        set_latent_norm, vae_identity)
from preprocessing.storage import DatasetError
from training.checkpoints import refuse_overwrite
from training.errors import TrainingError
from training.log import close_log, logger, setup_logging
from training.trackers import ensure_wandb_cannot_hang

DATA_HINT = ("create it from class folders with preprocessing/dataset_tools.py: `convert --source CLASS_FOLDERS "
             "--dest DATA/images --resolution WxH`, then `encode --source DATA/images --dest DATA/vae-sd` (or train "
             "on the images with --vae none); ImageNet's settings are in docs/data.md")


def prepare_run_folder(args, accelerator, exp_dir):
    """``<exp>/checkpoints``, after checking before any work that the folder is writable and holds
    no other run's checkpoints (unless --overwrite or a resume), starting the log, and removing
    the temporaries of killed saves (10 GB each at SiT-XL/2) whose process is gone."""
    checkpoint_dir = os.path.join(exp_dir, "checkpoints")
    if accelerator.is_main_process:  # a read-only --output-dir costs seconds, not a run
        check_writable(exp_dir, "--output-dir")
        check_writable(checkpoint_dir, "--output-dir")
    refuse_overwrite(checkpoint_dir, args.resume_step, args.overwrite)
    accelerator.wait_for_everyone()
    setup_logging(exp_dir, accelerator.is_main_process)
    if accelerator.is_main_process:
        for folder in (checkpoint_dir, exp_dir, os.path.join(exp_dir, "samples")):
            remove_stale_temps(folder, log=logger.info)
    return checkpoint_dir


@contextlib.contextmanager
def removed_if_refused(exp_dir, accelerator):
    """A start refused with a UserError inside this block removes the experiment folder when this
    launch created it (its log of the refusal included): nothing of the user's was in it."""
    created = accelerator.is_main_process and not os.path.exists(exp_dir)
    try:
        yield
    except UserError:
        if created and os.path.isdir(exp_dir):
            close_log()
            shutil.rmtree(exp_dir, ignore_errors=True)
        raise


def check_launch(args, accelerator):
    """What depends on the (resumed) recipe and the launch: --batch-size splits over the processes;
    --allow-tf32 switches TF32 matmuls on."""
    if args.batch_size % accelerator.num_processes:
        raise TrainingError(f"--batch-size {args.batch_size} is not divisible by the {accelerator.num_processes} "
                            "processes; each process takes --batch-size / processes samples per micro-step")
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def check_classes(args, config, dataset, fresh):
    """The model must know every class of the data; a fresh run with more classes than the data
    has is allowed (labels index the table) but said at start-up."""
    if dataset.num_classes > config.num_classes:
        raise TrainingError(f"--num-classes {config.num_classes} is smaller than the {dataset.num_classes} classes "
                            f"of {args.data_dir} (labels up to {int(dataset.labels.max())})")
    if fresh and config.num_classes > dataset.num_classes:
        logger.warning(f"--num-classes {config.num_classes} is larger than the {dataset.num_classes} classes of "
                       f"{args.data_dir}: the extra label rows are never trained (pass --num-classes "
                       f"{dataset.num_classes} to match the data)")


def open_dataset(args, paired=False):
    """The training set: SD-VAE moments from <data-dir>/vae-sd, or uint8 images with --vae none;
    ``paired`` (REPA alignment): each latent with its image, which the encoders read."""
    if not os.path.isdir(args.data_dir):
        raise TrainingError(f"--data-dir {args.data_dir} does not exist; {DATA_HINT}")
    mode = "pixel" if args.vae == "none" else "latent+pixel" if paired else "latent"
    try:
        return CustomDataset(args.data_dir, mode=mode, pixel_flag="--vae none")
    except DatasetError as exc:
        raise TrainingError(f"--data-dir {args.data_dir}: {exc}") from None


def load_alignment_encoders(args, config, resolution, device, resumed=None, resume_path=None):
    """REPA's frozen encoders of ``config.enc_type`` ([] when alignment is off), in bf16 autocast
    when training runs in mixed precision, and their record for the checkpoints' provenance (name
    and weights hash each). A missing or wrong weights file is one line, and so are weights other
    than those a resumed checkpoint was trained with (its alignment targets would change)."""
    amp_dtype = torch.bfloat16 if args.mixed_precision != "no" else None
    try:
        encoders = training_encoders(config, args.enc_type, args.enc_path, resolution, device, amp_dtype,
                                     args.enc_download, args.enc_arch)
    except (EncoderWeightsMissing, EncoderWeightsError, ValueError) as exc:
        raise TrainingError(str(exc)) from None
    records = [{"name": e.name, "arch": args.enc_arch or None, "weights_sha256": weights_sha256(e.vit.state_dict())}
               for e in encoders]
    before = ((resumed or {}).get("provenance") or {}).get("encoders") or []  # none: made before this record
    for now, then in zip(records, before):
        if now["weights_sha256"] != then["weights_sha256"]:
            raise TrainingError(f"--enc-type {now['name']}: the weights given (sha256 {now['weights_sha256'][:12]}) "
                                f"are not the ones {resume_path} was trained with ({then['weights_sha256'][:12]}); "
                                "pass that encoder's file, or start a new run")
    return encoders, records


def data_geometry(args, dataset, vae):
    """(in_channels, input_size) of the model, derived from the data and checked against --resolution."""
    if args.vae == "none":
        channels, height, width = dataset.image_shape
        if height != width:
            raise TrainingError(f"--data-dir images are {width}x{height}; SiT needs square inputs")
        if args.resolution is not None and height != args.resolution:
            raise TrainingError(f"--resolution {args.resolution} does not match the {height}x{height} images in "
                                f"{args.data_dir}; pass --resolution {height}")
        return channels, height
    channels2, height, width = dataset.latent_shape
    if height != width:
        raise TrainingError(f"--data-dir latents are {width}x{height}; SiT needs square inputs")
    factor = downsample_factor(vae) if vae is not None else dataset.resolution // height  # the encode record's
    if args.resolution is not None and height * factor != args.resolution:
        raise TrainingError(f"--resolution {args.resolution} does not match the data: {height}x{height} latents are "
                            f"{height * factor} px with the VAE's factor {factor}; pass --resolution "
                            f"{height * factor} or re-encode the images at {args.resolution} px")
    if vae is not None and latent_channels(vae) * 2 != channels2:
        raise TrainingError(f"--vae {args.vae} has {latent_channels(vae)} latent channels but the data's moments have "
                            f"{channels2 // 2}; pass the VAE the data was encoded with")
    return channels2 // 2, height


def load_preview_vae(args, accelerator):
    """The decoder for preview grids, on the main process only; every process fails together."""
    vae, error = None, None
    if accelerator.is_main_process and args.vae != "none" and args.sampling_steps > 0:
        try:
            vae = load_vae(args.vae, accelerator.device)
        except VAEWeightsMissing as exc:
            error = exc
    failed = torch.tensor([float(error is not None)], device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, reduction="sum")
    if failed.item():
        raise TrainingError(f"--vae {args.vae}: the preview decoder could not be loaded"
                            f"{': ' + str(error) if error else ' on the main process'}\n"
                            "(training itself only needs the latents: --sampling-steps 0 turns previews off)")
    return vae


def check_data_vae(args, dataset, vae):
    """The preview decoder must belong to the VAE that encoded the latents: its encoder weights
    must hash to the ones recorded in vae-sd/dataset.json (the SD-VAE ft-EMA and ft-MSE share
    their encoder, so either decodes latents made by the other), and its config's scaling / shift
    factor must be the recorded ones. The decoder then carries the data's normalisation
    (models.vae.set_latent_norm), so previews and --eval-every decode what training normalised."""
    record = getattr(dataset, "vae_record", None)
    if vae is not None and getattr(dataset, "latent_norm", None) is not None:
        set_latent_norm(vae, dataset.latent_norm)
    if vae is None or not record or not record.get("encoder_sha256"):
        if args.vae != "none" and dataset.mode == "latent" and not record:
            logger.warning(f"{args.data_dir}/vae-sd records no VAE (encoded by an older version): the --vae "
                           f"{args.vae} preview decoder cannot be checked against the latents")
        return
    mine = vae_identity(vae, args.vae)
    if mine["encoder_sha256"] != record["encoder_sha256"]:
        raise TrainingError(f"--vae {args.vae} is not the VAE that encoded {args.data_dir}/vae-sd (its encoder "
                            f"weights {mine['encoder_sha256'][:12]} differ from {record['encoder_sha256'][:12]} of "
                            f"{record.get('name')}); pass --vae {record.get('spec') or record.get('name')}")
    mismatch = decoder_mismatch(vae, record)
    if mismatch:
        raise TrainingError(f"--vae {args.vae} cannot decode {args.data_dir}/vae-sd: {mismatch}; pass --vae "
                            f"{record.get('spec') or record.get('name')} (the VAE the data was encoded with)")


def training_config(args, in_channels, input_size, checkpoint=None, source=None):
    """The ModelConfig of this run: the data fixes the input (channels, side); a resumed
    checkpoint fixes everything it records (a flag contradicting it is a TrainingError naming
    both); flags set the rest, else the authors' defaults (``models.config.DEFAULTS``)."""
    given = given_flags(args)
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


def launch_precision(args):
    """(args, note): --mixed-precision as the command gives it; left out, it follows the device:
    the authors' fp16 on a GPU, none on a CPU (fp16 autocast needs CUDA). ``note`` is the line to
    log when the device chose, else None."""
    explicit = getattr(args, "explicit_flags", None)
    if explicit is None or "mixed_precision" in explicit or args.mixed_precision == "no" or torch.cuda.is_available():
        return args, None
    return (argparse.Namespace(**{**vars(args), "mixed_precision": "no"}),
            f"--mixed-precision no: no GPU here (the default {args.mixed_precision} is for GPUs; pass "
            "--mixed-precision bf16 for bf16 autocast on the CPU)")


def make_accelerator(args, exp_dir):
    """The Accelerator (CPU processes with gloo when no GPU is visible, so torchrun works on CPU);
    a GPU that torch cannot use is one line first (devices.check_cuda)."""
    check_cuda("train.py")
    if args.report_to == "wandb":
        message = ensure_wandb_cannot_hang()
        if message:
            print(message)
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainingError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=exp_dir, logging_dir=os.path.join(exp_dir, args.logging_dir)),
        # gradients live in DDP's communication buckets: one gradient-sized copy less per step
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
    )


def build_model(args, config, device):
    """SiT (same init on every process: seeded by --seed) and its EMA copy (eval mode, no grad),
    with the opt-in speed options of models/fused.py applied to the trained copy."""
    torch.manual_seed(args.seed)
    model = SiT(config, fused_attn=args.fused_attn).to(device)
    model.grad_checkpoint = args.grad_checkpoint
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    try:  # same Parameters and keys, so the EMA and checkpoints are unchanged
        apply_speed_options(model, gelu_epilogue=args.gelu_epilogue, fused_norm_modulate=args.fused_norm_modulate,
                           fp8=args.fp8)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    return model, ema


def build_loss(args, config):
    """The flow-matching + probe (+ alignment) loss of the flags and the model's interpolant."""
    return LSEPLoss(prediction=args.prediction, path_type=config.path_type, weighting=args.weighting,
                    weights_type=args.weights_type, weight_class=args.weight_class, weight_start=args.weight_start,
                    weight_end=args.weight_end, n_weights=args.n_weights)


def compile_model(args, model):
    """--compile: the training forward + loss trace as one graph (tests/test_perf_paths.py)."""
    if not args.compile:
        return model
    if args.compile_cache:
        persistent_compile_cache(args.compile_cache)
    mode = None if args.compile_mode == "default" else args.compile_mode
    return torch.compile(model, backend=args.compile_backend, mode=mode)
