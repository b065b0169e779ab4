"""Train a SiT with the LSEP linear-probe loss (``LSEP_SPEC.md`` sections 5 and 8).

    accelerate launch --num_processes 8 train.py --model SiT-XL/2 --exp-name NAME --data-dir DATA
    torchrun --nproc_per_node 8 train.py ...        python train.py ...   (one process, CPU or GPU)

Same flags and defaults as the authors' train.py, plus a few (see ``parse_args``). Differences
that matter: ``--batch-size`` is the global batch of one optimizer step (split over processes
and accumulation steps); every random draw is a function of (seed, step, shard) so resuming is
exact; previews come from the EMA model in eval mode; checkpoints are written atomically; a
non-finite step is skipped and logged instead of poisoning the run.
"""
import argparse
import contextlib
import copy
import json
import logging
import math
import os
import sys
import time

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from loss import LSEPLoss
from models import SiT
from models.checkpoint import CheckpointError
from models.fused import add_lever_flags, apply_speed_levers, persistent_compile_cache
from models.config import DEFAULT_ALIGN_DEPTH, DEFAULT_PROJECTOR_DIM, DEFAULTS, MODEL_NAMES, PATH_TYPES
from models.encoders import EncoderWeightsError, EncoderWeightsMissing, parse_arch_overrides, parse_enc_type, \
    training_encoders
from models.vae import (VAEWeightsMissing, decode_to_uint8, downsample_factor, latent_channels,
                        load_vae, pixels_to_uint8, sample_posterior, uint8_to_pixels, vae_identity)
from samplers import euler_sampler, unwrap_model
from seeding import derive_seed
from train_eval import (PosthocTracking, TrainingEval, describe_init, init_from, parse_sigma_rels,
                        posthoc_checkpoint_entry)
from train_utils import (NonFiniteGuard, StepBatchSampler, StepStats, TrainingDiverged, TrainingError, append_stats,
                         build_checkpoint, checkpoint_path, classifier_learning_rate, ensure_wandb_cannot_hang,
                         global_batch_size, image_grid, log_image, memory_stats,
                         restore_checkpoint, run_provenance, save_png, seed_step, training_config, update_ema)
# reliability (issue 13): one-line faults, no half-written files
from fileio import OutputError, atomic_write, check_writable, remove_stale_temps
from preprocessing.storage import DatasetError
from train_utils import (TrainingDataError, data_error, open_resume_checkpoint, refuse_overwrite, remove_checkpoints,
                         save_checkpoint, trim_stats)

PREVIEW_SAMPLES = 64      # images in each preview grid (the authors' 64)
PREVIEW_STEPS = 50        # Euler steps of the preview sampler
PREVIEW_CFG = 4.0         # the authors' preview guidance scale
DATA_HINT = ("create it with preprocessing/dataset_tools.py: `convert --source IMAGENET/train --dest DATA/images "
             "--resolution 256x256`, then `encode --source DATA/images --dest DATA/vae-sd` (see its --help)")

logger = logging.getLogger("lsep.train")


#################################################################################
#                                     Setup                                     #
#################################################################################

def setup_logging(exp_dir, is_main):
    """Log to stdout and <exp>/log.txt on the main process; warnings only elsewhere."""
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(os.path.join(exp_dir, "log.txt")))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)


def open_dataset(args, paired=False):
    """The training set: SD-VAE moments from <data-dir>/vae-sd, or uint8 images with --vae none;
    ``paired`` (REPA alignment): each latent with its image, which the encoders read."""
    from dataset import CustomDataset
    from preprocessing.storage import DatasetError

    if not os.path.isdir(args.data_dir):
        raise TrainingError(f"--data-dir {args.data_dir} does not exist; {DATA_HINT}")
    mode = "pixel" if args.vae == "none" else "latent+pixel" if paired else "latent"
    try:
        return CustomDataset(args.data_dir, mode=mode)
    except DatasetError as exc:
        raise TrainingError(f"--data-dir {args.data_dir}: {exc}") from None


def load_alignment_encoders(args, config, resolution, device, resumed=None, resume_path=None):
    """REPA's frozen encoders of ``config.enc_type`` ([] when alignment is off), in bf16 autocast
    when training runs in mixed precision, and their record for the checkpoints' provenance (name
    and weights hash each). A missing or wrong weights file is one line, and so are weights other
    than those a resumed checkpoint was trained with (its alignment targets would change)."""
    from models.checkpoint import weights_sha256

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
    their encoder, so either decodes latents made by the other)."""
    record = getattr(dataset, "vae_record", None)
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


def tracker_config(args, config):
    """Flag values and the model config as scalars/strings (TensorBoard's hparams accepts nothing else)."""
    out = {}
    for key, value in [*vars(args).items(), *((f"config.{k}", v) for k, v in config.to_dict().items())]:
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(value)
        out[key] = "None" if value is None else value
    return out


def build_dataloader(args, dataset, accelerator, start_step, start_sample):
    """A DataLoader over this process's shards of every step (never re-sharded by accelerate)."""
    accum = args.gradient_accumulation_steps
    rank = accelerator.process_index
    sampler = StepBatchSampler(
        dataset_size=len(dataset), global_batch=global_batch_size(args), num_shards=accelerator.num_processes * accum,
        shards=range(rank * accum, (rank + 1) * accum), seed=args.seed, start_step=start_step,
        start_sample=start_sample)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                        pin_memory=accelerator.device.type == "cuda", persistent_workers=args.num_workers > 0)
    return loader


#################################################################################
#                                   Previews                                    #
#################################################################################

def preview_noise(args, config, device):
    """Fixed preview noise and labels, a function of --seed only (same grid content every time)."""
    generator = torch.Generator().manual_seed(derive_seed(args.seed, -2, 0))
    size, channels = config.input_size, config.in_channels
    x = torch.randn(PREVIEW_SAMPLES, channels, size, size, generator=generator)
    y = torch.randint(0, config.num_classes, (PREVIEW_SAMPLES,), generator=generator)
    return x.to(device), y.to(device)


@torch.no_grad()
def make_preview(ema, vae, noise, labels, config, accelerator):
    """(B, H, W, 3) uint8 samples of the EMA model in eval mode (not the training-mode model)."""
    with accelerator.autocast():
        x = euler_sampler(ema, noise, labels, num_steps=PREVIEW_STEPS, cfg_scale=PREVIEW_CFG,
                          guidance_low=0.0, guidance_high=1.0, path_type=config.path_type, heun=False)
    x = x.float()
    if vae is None:  # pixel space
        return pixels_to_uint8(x)
    return torch.cat([decode_to_uint8(vae, chunk) for chunk in x.split(16)])


#################################################################################
#                                  Training loop                                #
#################################################################################

def make_accelerator(args, exp_dir):
    """The Accelerator (CPU processes with gloo when no GPU is visible, so torchrun works on CPU)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    if args.report_to == "wandb":
        message = ensure_wandb_cannot_hang()
        if message:
            print(message)
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainingError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=exp_dir, logging_dir=os.path.join(exp_dir, args.logging_dir)),
        # gradients live in DDP's communication buckets: one gradient-sized copy less per step
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
    )


def build_model_and_optimizer(args, config, device):
    """SiT (same init on every process: seeded by --seed), its EMA copy, and AdamW with the
    classifier as its own parameter group (the authors' --learning-rate-class)."""
    torch.manual_seed(args.seed)
    model = SiT(config, fused_attn=args.fused_attn).to(device)
    model.grad_checkpoint = args.grad_checkpoint
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    try:  # opt-in kernels (models/fused.py); same Parameters and keys, so the EMA and checkpoints are unchanged
        apply_speed_levers(model, gelu_epilogue=args.gelu_epilogue, fused_norm_modulate=args.fused_norm_modulate,
                           fp8=args.fp8)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    classifier = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    backbone = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    optimizer = torch.optim.AdamW(
        [{"params": backbone, "weight_decay": args.adam_weight_decay},
         {"params": classifier, "lr": classifier_learning_rate(args, config),
          "weight_decay": args.adam_weight_decay_class}],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        fused=device.type == "cuda")  # one kernel for all parameters on GPUs
    return model, ema, optimizer


def restore_training_state(checkpoint, path, args, config, model, ema, optimizer, scaler, dataset):
    """Load a checkpoint into the training objects; returns (step, samples_seen, nonfinite)."""
    step, samples_seen, nonfinite = restore_checkpoint(checkpoint, unwrap_model(model), ema, optimizer, scaler,
                                                       source=path)
    for group, lr, decay in zip(optimizer.param_groups, (args.learning_rate, classifier_learning_rate(args, config)),
                                (args.adam_weight_decay, args.adam_weight_decay_class)):
        group.update(lr=lr, weight_decay=decay)  # the flags win over the saved values
    if (checkpoint.get("data") or {}).get("dataset_size", len(dataset)) != len(dataset):
        logger.warning(f"the dataset has changed size since {path}: the data order differs from an unbroken run")
    samples_seen = step * global_batch_size(args) if samples_seen is None else samples_seen
    logger.info(f"Resumed from {path} at step {step} ({samples_seen:,} samples seen)")
    return step, samples_seen, nonfinite


def run_optimizer_step(model, loss_fn, optimizer, scaler, data_iter, args, step, accelerator, nan_steps, encoders=()):
    """One optimizer step over --gradient-accumulation-steps micro-batches, each seeded by
    (seed, step, shard). A non-finite loss (or gradient norm without fp16's scaler) on any
    process skips the step on every process. Returns (losses or None when skipped, what was bad).
    ``encoders`` (REPA): frozen, no randomness; their tokens of each micro-batch's images are
    the alignment targets, and --proj-coeff x the alignment loss joins the objective."""
    device, accum = accelerator.device, args.gradient_accumulation_steps
    denoising_sum = probe_sum = accuracy_sum = proj_sum = torch.zeros((), device=device)
    for micro in range(accum):
        *images, data, labels = next(data_iter)  # paired items (REPA) lead with the image
        seed_step(args.seed, step, accelerator.process_index * accum + micro, device)
        data = data.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        raw = images[0].to(device, non_blocking=True) if images else data  # the encoders' uint8 input
        zs = [encoder(raw) for encoder in encoders]
        x = uint8_to_pixels(data) if args.vae == "none" else sample_posterior(data)
        sync = accelerator.no_sync(model) if micro < accum - 1 else contextlib.nullcontext()
        with sync:
            denoising_loss, probe_loss, probe_accuracy, proj_loss = loss_fn(model, x, dict(y=labels), zs=zs)
            denoising_loss = denoising_loss.mean()
            if step + 1 in nan_steps:
                denoising_loss = denoising_loss * float("nan")
            accelerator.backward((denoising_loss + probe_loss + args.proj_coeff * proj_loss) / accum)
        denoising_sum = denoising_sum + denoising_loss.detach() / accum
        probe_sum = probe_sum + probe_loss.detach() / accum
        accuracy_sum = accuracy_sum + probe_accuracy.detach() / accum
        proj_sum = proj_sum + proj_loss.detach() / accum
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)

    # one reduced flag (the only per-step host sync), so every process takes the same branch
    flags = torch.stack([~torch.isfinite(denoising_sum + probe_sum + proj_sum),
                         ~torch.isfinite(grad_norm)]).float().reshape(2)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    loss_bad, grad_bad = (bool(v > 0) for v in flags.tolist())
    if loss_bad or (grad_bad and scaler is None):  # with fp16 an overflow is the scaler's to handle
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()  # unscale_ ran in clip_grad_norm_; reset the scaler and back off its scale
        return None, "loss" if loss_bad else "gradient norm"
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (denoising_sum, probe_sum, accuracy_sum, grad_norm, proj_sum), None


def main(args):
    """Train; returns the final step. Raises TrainingError on bad flags/data, TrainingDiverged
    after --max-nonfinite consecutive non-finite steps."""
    # ---- setup ----
    exp_dir = os.path.join(args.output_dir, args.exp_name)
    checkpoint_dir = os.path.join(exp_dir, "checkpoints")
    accelerator = make_accelerator(args, exp_dir)
    device, is_main = accelerator.device, accelerator.is_main_process
    if is_main:  # before any work: a read-only --output-dir costs seconds, not a run
        check_writable(exp_dir, "--output-dir")
        check_writable(checkpoint_dir, "--output-dir")
    refuse_overwrite(checkpoint_dir, args.resume_step, args.overwrite)
    accelerator.wait_for_everyone()
    setup_logging(exp_dir, is_main)
    if is_main:  # temporaries of killed saves (10 GB each at SiT-XL/2) whose process is gone
        for folder in (checkpoint_dir, exp_dir, os.path.join(exp_dir, "samples")):
            remove_stale_temps(folder, log=logger.info)
    if args.batch_size % accelerator.num_processes:
        raise TrainingError(f"--batch-size {args.batch_size} is not divisible by the {accelerator.num_processes} "
                            "processes; each process takes --batch-size / processes samples per micro-step")

    # ---- data: every user error surfaces here, before any training ----
    dataset = open_dataset(args, paired=bool(args.enc_type))  # REPA: images next to the latents
    vae = load_preview_vae(args, accelerator)
    check_data_vae(args, dataset, vae)
    in_channels, input_size = data_geometry(args, dataset, vae)

    # ---- model config (flags + data, or the checkpoint being resumed), model, optimizer, loss ----
    resume_path, resumed = open_resume_checkpoint(checkpoint_dir, args.resume_step,
                                                  warn=logger.warning if is_main else None)
    config = training_config(args, in_channels, input_size, resumed, f"checkpoint {resume_path}")
    if dataset.num_classes > config.num_classes:
        raise TrainingError(f"--num-classes {config.num_classes} is smaller than the {dataset.num_classes} classes "
                            f"of {args.data_dir} (labels up to {int(dataset.labels.max())})")
    if config.aligned and args.vae != "none" and not dataset.return_images:  # resumed REPA run without --enc-type
        dataset = open_dataset(args, paired=True)
    encoders, encoder_records = load_alignment_encoders(args, config, dataset.resolution, device, resumed,
                                                        resume_path)  # REPA; [] when off
    model, ema, optimizer = build_model_and_optimizer(args, config, device)
    init_record = None  # --init-from: weights of another run (a resumed run has its own)
    if args.init_from and resumed is None:
        init_record = init_from(args.init_from, args.init_from_weights, model, ema)
        logger.info(describe_init(init_record))
    loss_fn = LSEPLoss(prediction=args.prediction, path_type=config.path_type, weighting=args.weighting,
                       weights_type=args.weights_type, weight_class=args.weight_class,
                       weight_start=args.weight_start, weight_end=args.weight_end, n_weights=args.n_weights)
    model, optimizer = accelerator.prepare(model, optimizer)  # never the dataloader: we shard it ourselves
    if args.compile:  # the training forward + loss trace as one graph (tests/test_perf_paths.py)
        if args.compile_cache:
            persistent_compile_cache(args.compile_cache)
        mode = None if args.compile_mode == "default" else args.compile_mode
        model = torch.compile(model, backend=args.compile_backend, mode=mode)
    scaler = accelerator.scaler

    # ---- resume ----
    step, samples_seen, nonfinite = 0, 0, {"consecutive": 0, "total": 0}
    if resumed is not None:
        step, samples_seen, nonfinite = restore_training_state(resumed, resume_path, args, config, model, ema,
                                                               optimizer, scaler, dataset)
    elif args.overwrite and is_main:  # refused without --overwrite (refuse_overwrite, at start-up)
        remove_checkpoints(checkpoint_dir, log=logger.warning)
    provenance = run_provenance(resumed and resumed.get("provenance"), args, dataset, accelerator)
    provenance["init_from"] = init_record or ((resumed or {}).get("provenance") or {}).get("init_from")
    provenance["encoders"] = encoder_records or None  # REPA: what the alignment targets came from
    posthoc = None  # post-hoc EMA profiles, on the main process (updated after every step)
    if args.posthoc_ema_sigma_rels and is_main:
        posthoc = PosthocTracking(unwrap_model(model), parse_sigma_rels(args.posthoc_ema_sigma_rels),
                                  args.posthoc_ema_every, exp_dir, step, resumed, resume_path, logger.warning)
    del resumed
    evaluation = TrainingEval(args, config, accelerator, exp_dir, vae, provenance["run_id"],
                              lambda decoder: check_data_vae(args, dataset, decoder)) if args.eval_every else None
    global_batch = global_batch_size(args)
    total_steps = min(args.max_train_steps, math.ceil(args.epochs * len(dataset) / global_batch))
    data_iter = iter(build_dataloader(args, dataset, accelerator, step, samples_seen))
    ema_params, model_params = list(ema.parameters()), list(unwrap_model(model).parameters())
    if is_main:
        write_json(os.path.join(exp_dir, "args.json"), {"args": vars(args), "config": config.to_dict(),
                                                        "provenance": provenance})
        log_run_summary(args, config, dataset, accelerator, total_steps, exp_dir, provenance)
    accelerator.init_trackers(project_name="LSEP", config=tracker_config(args, config),
                              init_kwargs={"wandb": {"name": args.exp_name, "dir": exp_dir}})

    # ---- loop ----
    model.train()
    stats_path = os.path.join(exp_dir, "stats.jsonl")
    if is_main:  # one record per step: a resumed run rewrites the steps after its checkpoint
        trim_stats(stats_path, step, log=logger.info)
    preview = preview_noise(args, config, device) if is_main and args.sampling_steps > 0 else None
    guard, stats = NonFiniteGuard(args.max_nonfinite, **nonfinite), StepStats(device)
    nan_steps, last_checkpoint = parse_step_list(args.debug_nan_steps), resume_path
    progress = tqdm(total=total_steps, initial=step, desc="Steps", disable=not accelerator.is_local_main_process)
    start_time = time.time()
    try:
        while step < total_steps:
            losses, bad = run_optimizer_step(model, loss_fn, optimizer, scaler, data_iter, args, step, accelerator,
                                             nan_steps, encoders)
            if bad:
                stats.skipped += 1
            elif accelerator.optimizer_step_was_skipped:
                stats.overflows += 1
            else:
                update_ema(ema_params, model_params, args.ema_decay)
                stats.add(*losses)
            step += 1
            if posthoc is not None:
                posthoc.update(step)
            samples_seen += global_batch
            stats.samples += global_batch
            progress.update(1)
            if bad:
                logger.warning(f"step {step}: non-finite {bad}; optimizer step skipped ({guard.consecutive + 1} in a row)")
            diverged = None
            try:
                guard.record(bool(bad), step, last_checkpoint)
            except TrainingDiverged as exc:
                diverged = exc

            # ---- logging: stats.jsonl, trackers, progress bar ----
            if step % args.log_every == 0 or step == total_steps or diverged is not None:
                record = {"step": step, "kimg": samples_seen / 1e3, "epoch": samples_seen / len(dataset),
                          **stats.summary(accelerator), "nonfinite_total": guard.total,
                          "lr": optimizer.param_groups[0]["lr"], "lr_class": optimizer.param_groups[1]["lr"],
                          "loss_scale": scaler.get_scale() if scaler is not None else None,
                          "time": time.time() - start_time, **memory_stats(device)}
                guard.note_log(record["loss"], record["skipped_steps"])  # is the loss in its normal range?
                if is_main:
                    append_stats(stats_path, record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", probe=f"{record['probe_loss']:.4f}",
                                         acc=f"{record['probe_accuracy']:.3f}",
                                         **({"proj": f"{record['proj_loss']:.4f}"} if encoders else {}))
                accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                                step=step)
            if diverged is not None:
                logger.error(str(diverged))
                raise diverged

            if posthoc is not None:
                posthoc.maybe_snapshot(step, total_steps, {"samples_seen": samples_seen, "global_batch": global_batch})

            # ---- checkpoint: every --checkpointing-steps, every --checkpointing-epochs, and at the end ----
            if checkpoint_due(args, step, total_steps, samples_seen, global_batch, len(dataset)):
                path = checkpoint_path(checkpoint_dir, step)
                guard.note_checkpoint(path)
                if is_main:
                    save_checkpoint({**build_checkpoint(unwrap_model(model), ema, optimizer, args, config, provenance,
                                                        step, samples_seen, len(dataset), scaler, guard.state()),
                                     **posthoc_checkpoint_entry(posthoc)}, path, last_checkpoint,
                                    pause=step == args.debug_slow_save_step)
                    logger.info(f"Saved checkpoint to {path}")
                accelerator.wait_for_everyone()
                last_checkpoint = path

            # ---- FID / IS / precision / recall of the EMA model (--eval-every), on every process ----
            if evaluation is not None and evaluation.due(step):
                metrics = evaluation.run(ema, step)
                if is_main:
                    append_stats(stats_path, {"step": step, **metrics})
                    logger.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                accelerator.log(metrics or {}, step=step)

            # ---- preview grid from the EMA model in eval mode ----
            if preview is not None and step % args.sampling_steps == 0:
                grid = image_grid(make_preview(ema, vae, *preview, config, accelerator))
                save_png(grid, os.path.join(exp_dir, "samples", f"{step:07d}.png"))
                log_image(accelerator, "samples", grid, step)
                logger.info(f"Saved preview samples/{step:07d}.png")
    except DatasetError as exc:  # a file damaged after the start-up checks (also from a DataLoader worker)
        raise data_error(exc, step, last_checkpoint) from None
    finally:
        progress.close()
        accelerator.end_training()
    logger.info(f"Done: {step} steps")
    return step


def checkpoint_due(args, step, total_steps, samples_seen, global_batch, dataset_size):
    """True every --checkpointing-steps, when an epoch multiple of --checkpointing-epochs ends, and at the end."""
    epoch_now, epoch_before = samples_seen // dataset_size, (samples_seen - global_batch) // dataset_size
    every = args.checkpointing_epochs
    epoch_due = every > 0 and epoch_now // every > epoch_before // every
    return (args.checkpointing_steps > 0 and step % args.checkpointing_steps == 0) or epoch_due or step == total_steps


def log_run_summary(args, config, dataset, accelerator, total_steps, exp_dir, provenance):
    accum = args.gradient_accumulation_steps
    logger.info(f"Experiment directory {exp_dir} (run {provenance['run_id']}, code {provenance['code']})")
    logger.info(f"Model: {config.describe()}")
    logger.info(f"Dataset: {len(dataset):,} items ({args.data_dir}, {dataset.mode})")
    logger.info(f"Global batch {global_batch_size(args)} per optimizer step = {accelerator.num_processes} processes "
                f"x {accum} accumulation steps x {args.batch_size // accelerator.num_processes} per micro-batch "
                f"(the authors fix 256; any size works); {total_steps} steps (--max-train-steps "
                f"{args.max_train_steps}, --epochs {args.epochs}); classifier lr "
                f"{classifier_learning_rate(args, config)}; {accelerator.mixed_precision} precision")


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def parse_step_list(text):
    """'3,5-7' -> {3, 5, 6, 7} (the hidden --debug-nan-steps)."""
    steps = set()
    for part in filter(None, (text or "").split(",")):
        lo, _, hi = part.partition("-")
        steps.update(range(int(lo), int(hi or lo) + 1))
    return steps


#################################################################################
#                                      CLI                                      #
#################################################################################

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="LSEP training (SiT + linear-probe loss)")
    # logging
    parser.add_argument("--output-dir", type=str, default="exps")
    parser.add_argument("--exp-name", type=str, required=True)
    parser.add_argument("--logging-dir", type=str, default="logs", help="tracker folder inside <output-dir>/<exp-name>")
    parser.add_argument("--report-to", type=str, default="wandb", choices=["wandb", "tensorboard", "none"],
                        help="wandb logs offline when neither WANDB_MODE nor an API key is set")
    parser.add_argument("--sampling-steps", type=int, default=10000, help="preview grid every N steps (0 = off)")
    parser.add_argument("--resume-step", type=int, default=0,
                        help="resume from <exp>/checkpoints/<N:07d>.pt; -1 = the latest one, or a fresh start if none")
    parser.add_argument("--log-every", type=int, default=100, help="stats/tracker/progress-bar update every N steps")
    # model: flags that set a ModelConfig field default to the resumed checkpoint's value, else to
    # the authors' default (shown in the help); a flag that contradicts the checkpoint is an error
    d = DEFAULTS
    parser.add_argument("--model", type=str, default=None, choices=MODEL_NAMES, metavar="MODEL",
                        help=f"one of {', '.join(MODEL_NAMES)} (required for a fresh run)")
    parser.add_argument("--num-classes", type=int, default=None, help=f"default {d['num_classes']}")
    parser.add_argument("--encoder-depth", type=int, default=None,
                        help=f"block after which the probe reads the tokens (default {d['encoder_depth']})")
    parser.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the model (first steps are slow while it compiles)")
    parser.add_argument("--compile-backend", type=str, default="inductor", help=argparse.SUPPRESS)
    parser.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                        help="recompute each block's activations in the backward pass (less memory, more compute)")
    parser.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None, help="default off")
    parser.add_argument("--uncond-prob", type=float, default=None,
                        help=f"null-label probability of the probe branch (default {d['uncond_prob']})")
    parser.add_argument("--probe", action=argparse.BooleanOptionalAction, default=None,
                        help="--no-probe trains the SiT baseline: no probe branch, no probe loss, all else equal")
    parser.add_argument("--random-crop", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on when --crop-start is below the token grid side; --no-random-crop forces off")
    parser.add_argument("--crop-start", type=int, default=None,
                        help=f"smallest probe window side, in tokens (default {d['crop_start']}: off at 256 px)")
    parser.add_argument("--crop-end", type=int, default=None,
                        help="exclusive largest side; default grid side + 1 (the authors' 17 at 256 px, patch 2)")
    parser.add_argument("--hidden-size", type=int, default=None, help="override the config's width")
    parser.add_argument("--depth", type=int, default=None, help="override the config's depth")
    parser.add_argument("--num-heads", type=int, default=None, help="override the config's heads")
    parser.add_argument("--patch-size", type=int, default=None, help="override the config's patch size")
    # dataset
    parser.add_argument("--data-dir", type=str, default="../data/imagenet256")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels; default: the data's (given, it is checked against the data)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="samples per micro-step over all processes (the authors' meaning); an optimizer "
                             "step sees --batch-size x --gradient-accumulation-steps")
    parser.add_argument("--vae", type=str, default="mse",
                        help="preview decoder: ema | mse | hub name | folder; none = pixel-space training on images/")
    # precision
    parser.add_argument("--allow-tf32", action="store_true")
    parser.add_argument("--mixed-precision", type=str, default="fp16", choices=["no", "fp16", "bf16"])
    # optimization
    parser.add_argument("--epochs", type=int, default=1400)
    parser.add_argument("--max-train-steps", type=int, default=400010)
    parser.add_argument("--checkpointing-steps", type=int, default=400000)
    parser.add_argument("--checkpointing-epochs", type=int, default=100, help="also checkpoint every N epochs (0 = off)")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--adam-beta1", type=float, default=0.9)
    parser.add_argument("--adam-beta2", type=float, default=0.999)
    parser.add_argument("--adam-weight-decay", type=float, default=0.0)
    parser.add_argument("--adam-epsilon", type=float, default=1e-08)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--learning-rate-class", type=float, default=None,
                        help="probe classifier lr; default 1e-4, 3e-2 for SiT-B (the authors' rule)")
    parser.add_argument("--adam-weight-decay-class", type=float, default=0.0)
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    parser.add_argument("--max-nonfinite", type=int, default=10,
                        help="stop after N consecutive skipped non-finite steps (0 = never)")
    # seed / cpu
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=8)
    # loss
    parser.add_argument("--path-type", type=str, default=None, choices=PATH_TYPES, help="default linear")
    parser.add_argument("--prediction", type=str, default="v", choices=["v"])
    parser.add_argument("--cfg-prob", type=float, default=None,
                        help=f"label dropout of the main branch, for CFG (default {DEFAULTS['class_dropout_prob']})")
    parser.add_argument("--weighting", type=str, default="uniform", choices=["uniform", "lognormal"])
    # kept only so the authors' launch scripts run unchanged; it selects nothing in their code either
    parser.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False, help="accepted, unused")
    # LSEP probe loss
    parser.add_argument("--weights-type", type=str, default="constant", choices=["constant", "steps"])
    parser.add_argument("--weight-class", type=float, default=0.02, help="probe weight for --weights-type constant")
    parser.add_argument("--weight-start", type=float, default=0.02, help="first bin's weight for --weights-type steps")
    parser.add_argument("--weight-end", type=float, default=0.03, help="last bin's weight for --weights-type steps")
    parser.add_argument("--n-weights", type=int, default=10, help="time bins for --weights-type steps")
    # REPA alignment (sihyun-yu/REPA): REPA's flag names and defaults, except that REPA's
    # --encoder-depth (its alignment depth) is --align-depth here: --encoder-depth is the probe depth
    parser.add_argument("--enc-type", type=str, default=None,
                        help="align to these frozen encoders (comma list of REPA's names, e.g. dinov2-vit-b; "
                             "name=/path/weights.pth for a local file); default off ('' = off)")
    parser.add_argument("--enc-path", type=str, default=None,
                        help="encoder weights: a file/folder, or one per --enc-type entry (default: torch.hub cache)")
    parser.add_argument("--enc-download", action=argparse.BooleanOptionalAction, default=False,
                        help="download missing encoder weights from their official URLs into torch.hub's cache")
    parser.add_argument("--proj-coeff", type=float, default=0.5, help="weight of the alignment loss (REPA's 0.5)")
    parser.add_argument("--projector-dim", type=int, default=None,
                        help=f"hidden width of the projector MLPs (default {DEFAULT_PROJECTOR_DIM})")
    parser.add_argument("--align-depth", type=int, default=None,
                        help=f"the aligned block, REPA's --encoder-depth (default {DEFAULT_ALIGN_DEPTH})")
    parser.add_argument("--enc-arch", type=str, default="",
                        help="timm size overrides for the encoders, e.g. embed_dim=64,depth=4,num_heads=4,patch_size=4 "
                             "(for --enc-type custom-vit=FILE, a ViT of your own; tests also use it for tiny encoders)")
    # fine-tuning, post-hoc EMA, evaluation during training (train_eval.py)
    parser.add_argument("--init-from", type=str, default=None, metavar="CKPT",
                        help="start a new run (step 0, fresh optimizer) from these weights, e.g. at another "
                             "resolution or on another dataset; sizes must match, pos_embed is rebuilt, heads that "
                             "do not fit (classifier, label table, projectors) are skipped and listed")
    parser.add_argument("--init-from-weights", type=str, default="ema", choices=["ema", "model"],
                        help="which weights of --init-from to start from")
    parser.add_argument("--posthoc-ema-sigma-rels", type=str, default="",
                        help="track power-function EMAs of these relative lengths for posthoc_ema.py (EDM2: "
                             "0.05,0.10); empty = off")
    parser.add_argument("--posthoc-ema-every", type=int, default=10000,
                        help="post-hoc EMA snapshot every N steps (and at the end)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="FID / sFID / IS / precision / recall of the EMA model every N steps (0 = off)")
    parser.add_argument("--eval-ref", type=str, default=None, metavar="REF.npz",
                        help="reference batch for --eval-every (ADM's VIRTUAL_imagenet256_labeled.npz)")
    parser.add_argument("--eval-samples", type=int, default=10000, help="images per evaluation, over all processes")
    parser.add_argument("--eval-mode", type=str, default="ode", choices=["ode", "sde"], help="evaluation sampler")
    parser.add_argument("--eval-steps", type=int, default=50, help="evaluation sampler steps")
    parser.add_argument("--eval-cfg-scale", type=float, default=1.0, help="evaluation guidance (1 = none)")
    parser.add_argument("--eval-inception-weights", type=str, default=None, metavar="PT",
                        help="local Inception-v3 weights for --eval-every (default: torch.hub cache, else download)")
    parser.add_argument("--eval-keep-samples", action="store_true",
                        help="keep <exp>/eval/<step>.npz (default: deleted once evaluated)")
    # reliability
    parser.add_argument("--overwrite", action="store_true",
                        help="start a fresh run (--resume-step 0) in an experiment folder that holds checkpoints, "
                             "deleting them (refused otherwise)")
    # testing: sleep inside the save of this step's checkpoint, its temporary file written (kill tests)
    parser.add_argument("--debug-slow-save-step", type=int, default=None, help=argparse.SUPPRESS)
    # speed levers (models/fused.py; measured by benchmarks/bench_train.py --levers); all off by default
    add_lever_flags(parser)
    # testing: multiply the loss by NaN at these steps, e.g. "3,5-7" (step numbers as logged, from 1)
    parser.add_argument("--debug-nan-steps", type=str, default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    for flag in ("batch_size", "gradient_accumulation_steps", "log_every", "max_train_steps", "epochs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("sampling_steps", "checkpointing_steps", "checkpointing_epochs", "max_nonfinite", "num_workers"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.resume_step < -1:
        parser.error("--resume-step must be a step >= 0, or -1 for the latest checkpoint")
    if args.overwrite and args.resume_step != 0:
        parser.error(f"--overwrite starts over; it contradicts --resume-step {args.resume_step}")
    if not 0.0 <= args.ema_decay <= 1.0:
        parser.error(f"--ema-decay must be in [0, 1], got {args.ema_decay}")
    if (args.compile_mode != "default" or args.compile_cache) and not args.compile:
        parser.error("--compile-mode / --compile-cache take effect only with --compile")
    if args.fp8 and args.mixed_precision != "bf16":
        parser.error(f"--fp8 runs with --mixed-precision bf16 (got {args.mixed_precision})")
    try:
        parse_step_list(args.debug_nan_steps)
    except ValueError:
        parser.error(f"--debug-nan-steps {args.debug_nan_steps!r}: expected e.g. 3,5-7")
    try:  # REPA alignment flags
        parse_enc_type(args.enc_type, args.enc_path)
        parse_arch_overrides(args.enc_arch)
    except ValueError as exc:
        parser.error(str(exc))
    if args.proj_coeff < 0:
        parser.error(f"--proj-coeff must be >= 0, got {args.proj_coeff}")
    check_finetune_eval_flags(parser, args)
    return args


def check_finetune_eval_flags(parser, args):
    """Usage errors of the fine-tuning, post-hoc EMA and evaluation flags."""
    if args.init_from and args.resume_step > 0:
        parser.error(f"--init-from starts a new run; --resume-step {args.resume_step} continues one: pass one of them")
    try:
        parse_sigma_rels(args.posthoc_ema_sigma_rels)
    except ValueError as exc:
        parser.error(f"--posthoc-ema-sigma-rels {args.posthoc_ema_sigma_rels!r}: {exc}; e.g. 0.05,0.10")
    if args.posthoc_ema_every < 1:
        parser.error(f"--posthoc-ema-every must be >= 1, got {args.posthoc_ema_every}")
    if args.eval_every < 0:
        parser.error(f"--eval-every must be >= 0 (0 = off), got {args.eval_every}")
    if args.eval_samples < 4:  # precision/recall's k-NN radii need k=3 other images
        parser.error(f"--eval-samples must be >= 4, got {args.eval_samples}")
    if args.eval_steps < (2 if args.eval_mode == "sde" else 1):
        parser.error(f"--eval-steps {args.eval_steps} is too few for --eval-mode {args.eval_mode}")
    if args.eval_cfg_scale < 1.0:
        parser.error(f"--eval-cfg-scale {args.eval_cfg_scale} < 1 is not guidance; use 1 for unguided sampling")


def cli(argv=None):
    args = parse_args(argv)
    try:
        main(args)
    except (TrainingError, TrainingDiverged, OutputError, DatasetError, CheckpointError) as exc:
        # exit 1: something the user must fix (flags, data, checkpoints, output folder, full disk); 2: diverged
        if os.environ.get("RANK", "0") == "0" or isinstance(exc, TrainingDataError):  # the rank that read the file
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, TrainingDiverged) else 1)


if __name__ == "__main__":
    cli()
