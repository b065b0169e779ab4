"""The training loop: one optimizer step and the EMA update, then logging, post-hoc EMA,
checkpoint, evaluation and preview, each when due. ``TrainingRun`` holds what train.py wired;
``train_loop`` runs it."""
import contextlib
import os
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from tqdm.auto import tqdm

from loss import LossTerms
from models.vae import sample_posterior, uint8_to_pixels
from preprocessing.storage import DatasetError
from samplers import unwrap_model
from training.checkpoints import build_checkpoint, checkpoint_path, remove_checkpoints, save_checkpoint
from training.data_order import global_batch_size, seed_step
from training.errors import TrainingDiverged, data_error
from training.log import log_run_summary, logger, write_run_record
from training.monitor import NonFiniteGuard, StepStats, append_stats, memory_stats, trim_stats
from training.posthoc import posthoc_checkpoint_entry
from training.preview import make_preview, preview_noise
from training.trackers import image_grid, log_image, save_png


class StepOutcome(NamedTuple):
    """One optimizer step: its LossTerms (means over the micro-steps) and gradient norm, or, when
    the step was skipped, what was non-finite ("loss" or "gradient norm")."""
    terms: Optional[LossTerms]
    grad_norm: Optional[torch.Tensor]
    skipped: Optional[str]


def optimizer_step(model, loss_fn, optimizer, scaler, data_iter, args, step, accelerator, nan_steps, encoders=(),
                   latent_norm=None):
    """One optimizer step over --gradient-accumulation-steps micro-batches, each seeded by
    (seed, step, shard). A non-finite loss (or gradient norm without fp16's scaler) on any
    process skips the step on every process. ``encoders`` (REPA): frozen, no randomness; their
    tokens of each micro-batch's images are the alignment targets. ``latent_norm``: the data's
    models.vae.LatentNorm (its record's), turning posterior samples into model inputs."""
    device, accum = accelerator.device, args.gradient_accumulation_steps
    sums = LossTerms(*(torch.zeros((), device=device) for _ in LossTerms._fields))
    for micro in range(accum):
        batch = next(data_iter)
        seed_step(args.seed, step, accelerator.process_index * accum + micro, device)
        labels = batch.label.to(device, non_blocking=True)
        image = batch.image.to(device, non_blocking=True) if hasattr(batch, "image") else None  # uint8
        zs = [encoder(image) for encoder in encoders]
        x = uint8_to_pixels(image) if args.vae == "none" else sample_posterior(
            batch.moments.to(device, non_blocking=True), norm=latent_norm)
        sync = accelerator.no_sync(model) if micro < accum - 1 else contextlib.nullcontext()
        with sync:
            terms = loss_fn(model, x, dict(y=labels), zs=zs)
            terms = terms._replace(denoising=terms.denoising.mean())
            if step + 1 in nan_steps:
                terms = terms._replace(denoising=terms.denoising * float("nan"))
            accelerator.backward(terms.objective(args.proj_coeff) / accum)
        sums = LossTerms(*(total + value.detach() / accum for total, value in zip(sums, terms)))
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)

    # one reduced flag (the only per-step host sync), so every process takes the same branch
    flags = torch.stack([~torch.isfinite(sums.denoising + sums.probe + sums.alignment),
                         ~torch.isfinite(grad_norm)]).float().reshape(2)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    loss_bad, grad_bad = (bool(v > 0) for v in flags.tolist())
    if loss_bad or (grad_bad and scaler is None):  # with fp16 an overflow is the scaler's to handle
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()  # unscale_ ran in clip_grad_norm_; reset the scaler and back off its scale
        return StepOutcome(None, None, "loss" if loss_bad else "gradient norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(sums, grad_norm, None)


@torch.no_grad()
def update_ema(ema_params, model_params, decay):
    """ema <- decay * ema + (1 - decay) * model, over two equally ordered lists of tensors (the
    authors' 0.9999 after every optimizer step; the EMA starts as a copy of the model)."""
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)  # one read-modify-write pass


def checkpoint_due(args, step, total_steps, samples_seen, global_batch, dataset_size):
    """True every --checkpointing-steps, when an epoch multiple of --checkpointing-epochs ends, and at the end."""
    epoch_now, epoch_before = samples_seen // dataset_size, (samples_seen - global_batch) // dataset_size
    every = args.checkpointing_epochs
    epoch_due = every > 0 and epoch_now // every > epoch_before // every
    return (args.checkpointing_steps > 0 and step % args.checkpointing_steps == 0) or epoch_due or step == total_steps


@dataclass
class TrainingRun:
    """Everything train.py wired, handed to ``train_loop``."""
    args: object
    config: object
    accelerator: object
    model: object            # prepared (and maybe compiled) by accelerate
    ema: object
    optimizer: object
    loss_fn: object
    dataset: object
    data_iter: object
    vae: object              # preview decoder (main process) or None
    encoders: list           # REPA's frozen encoders, [] when off
    provenance: dict
    exp_dir: str
    checkpoint_dir: str
    step: int
    samples_seen: int
    nonfinite: dict
    last_checkpoint: Optional[str]
    total_steps: int
    posthoc: object = None   # training.posthoc.PosthocTracking on the main process, or None
    evaluation: object = None  # training.evaluation.TrainingEval, or None
    nan_steps: frozenset = frozenset()  # the hidden --debug-nan-steps
    overwrite: bool = False  # --overwrite: the previous run's checkpoints go when the loop begins

    @property
    def stats_path(self):
        return os.path.join(self.exp_dir, "stats.jsonl")


def train_loop(run):
    """Train from ``run.step`` to ``run.total_steps``; returns the final step. Raises
    TrainingDiverged after --max-nonfinite consecutive non-finite steps, TrainingDataError when a
    data file turns out damaged mid-run."""
    args, accelerator, is_main = run.args, run.accelerator, run.accelerator.is_main_process
    if is_main:
        begin(run)
    run.model.train()
    preview = preview_noise(args, run.config, accelerator.device) if is_main and args.sampling_steps > 0 else None
    guard, stats = NonFiniteGuard(args.max_nonfinite, **run.nonfinite), StepStats(accelerator.device)
    ema_params, model_params = list(run.ema.parameters()), list(unwrap_model(run.model).parameters())
    progress = tqdm(total=run.total_steps, initial=run.step, desc="Steps", disable=not accelerator.is_local_main_process)
    start_time = time.time()
    try:
        while run.step < run.total_steps:
            outcome = optimizer_step(run.model, run.loss_fn, run.optimizer, accelerator.scaler, run.data_iter, args,
                                     run.step, accelerator, run.nan_steps, run.encoders,
                                     latent_norm=getattr(run.dataset, "latent_norm", None))
            if outcome.skipped:
                stats.skipped += 1
            elif accelerator.optimizer_step_was_skipped:
                stats.overflows += 1
            else:
                update_ema(ema_params, model_params, args.ema_decay)
                stats.add(outcome.terms, outcome.grad_norm)
            run.step += 1
            if run.posthoc is not None:
                run.posthoc.update(run.step)
            run.samples_seen += global_batch_size(args)
            stats.samples += global_batch_size(args)
            progress.update(1)
            if outcome.skipped:
                logger.warning(f"step {run.step}: non-finite {outcome.skipped}; optimizer step skipped "
                               f"({guard.consecutive + 1} in a row)")
            diverged = None
            try:
                guard.record(bool(outcome.skipped), run.step, run.last_checkpoint)
            except TrainingDiverged as exc:
                diverged = exc
            if run.step % args.log_every == 0 or run.step == run.total_steps or diverged is not None:
                log_window(run, stats, guard, progress, start_time)
            if diverged is not None:
                logger.error(str(diverged))
                raise diverged
            if run.posthoc is not None:
                run.posthoc.maybe_snapshot(run.step, run.total_steps, {"samples_seen": run.samples_seen,
                                                                       "global_batch": global_batch_size(args)})
            if checkpoint_due(args, run.step, run.total_steps, run.samples_seen, global_batch_size(args),
                              len(run.dataset)):
                save_training_checkpoint(run, guard)
            if run.evaluation is not None and run.evaluation.due(run.step):
                evaluate_ema(run)
            if preview is not None and run.step % args.sampling_steps == 0:
                save_preview(run, preview)
    except DatasetError as exc:  # a file damaged after the start-up checks (also from a DataLoader worker)
        raise data_error(exc, run.step, run.last_checkpoint) from None
    finally:
        progress.close()
        accelerator.end_training()
    logger.info(f"Done: {run.step} steps")
    return run.step


def begin(run):
    """The run's files change only from here, once every start-up check has passed: --overwrite
    deletes the previous run's checkpoints, stats.jsonl keeps one record per step up to the start
    (a resumed run writes the later ones again), post-hoc EMA snapshots past the start go, and
    args.json records this launch."""
    if run.overwrite:
        remove_checkpoints(run.checkpoint_dir, log=logger.warning)
    trim_stats(run.stats_path, run.step, log=logger.info)
    if run.posthoc is not None:
        run.posthoc.drop_later_snapshots(run.step, logger.warning)
    write_run_record(run.exp_dir, run.args, run.config, run.provenance)
    log_run_summary(run.args, run.config, run.dataset, run.accelerator, run.total_steps, run.exp_dir, run.provenance)


def log_window(run, stats, guard, progress, start_time):
    """Close a logged window: one stats.jsonl record, the trackers and the progress bar."""
    accelerator, optimizer, scaler = run.accelerator, run.optimizer, run.accelerator.scaler
    record = {"step": run.step, "kimg": run.samples_seen / 1e3, "epoch": run.samples_seen / len(run.dataset),
              **stats.summary(accelerator), "nonfinite_total": guard.total,
              "lr": optimizer.param_groups[0]["lr"], "lr_class": optimizer.param_groups[1]["lr"],
              "loss_scale": scaler.get_scale() if scaler is not None else None,
              "time": time.time() - start_time, **memory_stats(accelerator.device)}
    guard.note_log(record["loss"], record["skipped_steps"])  # is the loss in its normal range?
    if accelerator.is_main_process:
        append_stats(run.stats_path, record)
        progress.set_postfix(loss=f"{record['loss']:.4f}", probe=f"{record['probe_loss']:.4f}",
                             acc=f"{record['probe_accuracy']:.3f}",
                             **({"proj": f"{record['proj_loss']:.4f}"} if run.encoders else {}))
    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step=run.step)


def save_training_checkpoint(run, guard):
    """Write ``<exp>/checkpoints/<step>.pt`` on the main process (atomically), then wait for all."""
    path = checkpoint_path(run.checkpoint_dir, run.step)
    guard.note_checkpoint(path)
    if run.accelerator.is_main_process:
        checkpoint = build_checkpoint(unwrap_model(run.model), run.ema, run.optimizer, run.args, run.config,
                                      run.provenance, run.step, run.samples_seen, len(run.dataset),
                                      run.accelerator.scaler, guard.state())
        save_checkpoint({**checkpoint, **posthoc_checkpoint_entry(run.posthoc)}, path, run.last_checkpoint,
                        pause=run.step == run.args.debug_slow_save_step)
        logger.info(f"Saved checkpoint to {path}")
    run.accelerator.wait_for_everyone()
    run.last_checkpoint = path


def evaluate_ema(run):
    """FID / IS / precision / recall of the EMA model (--eval-every), on every process."""
    metrics = run.evaluation.run(run.ema, run.step)
    if run.accelerator.is_main_process:
        append_stats(run.stats_path, {"step": run.step, **metrics})
        logger.info(f"step {run.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    run.accelerator.log(metrics or {}, step=run.step)


def save_preview(run, noise):
    """A preview grid of the EMA model in eval mode: <exp>/samples/<step>.png and the trackers."""
    grid = image_grid(make_preview(run.ema, run.vae, *noise, run.config, run.accelerator))
    save_png(grid, os.path.join(run.exp_dir, "samples", f"{run.step:07d}.png"))
    log_image(run.accelerator, "samples", grid, run.step)
    logger.info(f"Saved preview samples/{run.step:07d}.png")
