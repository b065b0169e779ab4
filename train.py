"""Train a SiT with the LSEP linear-probe loss (docs/method.md; every flag in docs/training.md).

    accelerate launch --num_processes 8 train.py --model SiT-XL/2 --exp-name NAME --data-dir DATA
    torchrun --nproc_per_node 8 train.py ...        python train.py ...   (one process, CPU or GPU)

Same flags and defaults as the authors' train.py, plus a few. This file is the flags and the
wiring; the parts live in ``training/`` (one concern per file) and ``models/``. What differs from
the authors' loop: ``--batch-size`` is the batch of one micro-step over all processes (the
authors' meaning; an optimizer step sees it times --gradient-accumulation-steps); every random
draw is a function of (seed, step, shard), so resuming is exact; previews come from the EMA
model in eval mode; checkpoints are written atomically; a non-finite step is skipped and logged
instead of poisoning the run.
"""
import argparse
import math
import os

from errors import run_cli
from loss import WEIGHTINGS, WEIGHTS_TYPES
from models.config import DEFAULT_ALIGN_DEPTH, DEFAULT_PROJECTOR_DIM, DEFAULTS, MODEL_NAMES, PATH_TYPES
from models.fused import add_speed_option_flags
from posthoc_ema import parse_sigma_rels
from provenance import run_record
from samplers import unwrap_model
from training.checkpoints import FRESH_START, folder_run_id, open_resume_checkpoint, restore_training_state
from training.data_order import build_dataloader, global_batch_size
from training.evaluation import TrainingEval
from training.flags import check_args, explicit_flags, parse_step_list, resume_recipe
from training.init_from import describe_init, init_from
from training.log import logger
from training.loop import TrainingRun, train_loop
from training.optimizer import CLASSIFIER_LR, CLASSIFIER_LR_SIT_B, build_optimizer
from training.posthoc import PosthocTracking
from training.setup import (build_loss, build_model, check_classes, check_data_vae, check_launch, compile_model,
                            data_geometry, launch_precision, load_alignment_encoders, load_preview_vae,
                            make_accelerator, open_dataset, prepare_run_folder, removed_if_refused, training_config)
from training.trackers import tracker_config


def main(args):
    """Train; returns the final step. Raises TrainingError on bad flags/data, TrainingDiverged
    after --max-nonfinite consecutive non-finite steps. A start refused before the loop leaves
    no experiment folder it created and changes nothing of an existing run's files."""
    exp_dir = os.path.join(args.output_dir, args.exp_name)
    args, precision_note = launch_precision(args)  # left out, the precision follows the device
    accelerator = make_accelerator(args, exp_dir)
    with removed_if_refused(exp_dir, accelerator):
        run = start_run(args, accelerator, exp_dir, precision_note)
    return train_loop(run)


def start_run(args, accelerator, exp_dir, precision_note=None):
    """Every check and every part of the run, in order; nothing on disk changes but the new log."""
    # ---- setup: the run folder, the checkpoint to resume and its recipe, then the data ----
    checkpoint_dir = prepare_run_folder(args, accelerator, exp_dir)
    is_main = accelerator.is_main_process
    if precision_note:
        logger.info(precision_note)
    resume_path, resumed = open_resume_checkpoint(checkpoint_dir, args.resume_step,
                                                  warn=logger.warning if is_main else None,
                                                  run_id=folder_run_id(exp_dir))
    changes = []
    if resumed is not None:  # what the command leaves out comes from the run; what it changes is logged
        args, changes = resume_recipe(args, resumed, resume_path, resumed.get("steps"), logger)
    check_launch(args, accelerator)
    dataset = open_dataset(args, paired=bool(args.enc_type))  # REPA: images next to the latents
    vae = load_preview_vae(args, accelerator)
    check_data_vae(args, dataset, vae)
    in_channels, input_size = data_geometry(args, dataset, vae)

    # ---- model config (flags + data, or the checkpoint being resumed), model, optimizer, loss ----
    config = training_config(args, in_channels, input_size, resumed, f"checkpoint {resume_path}")
    check_classes(args, config, dataset, fresh=resumed is None)
    if config.aligned and args.vae != "none" and not dataset.return_images:  # resumed REPA run without --enc-type
        dataset = open_dataset(args, paired=True)
    encoders, encoder_records = load_alignment_encoders(args, config, dataset.resolution, accelerator.device,
                                                        resumed, resume_path)  # REPA; [] when off
    model, ema = build_model(args, config, accelerator.device)
    optimizer = build_optimizer(args, config, model, accelerator.device)
    init_record = None  # --init-from: weights of another run (a resumed run has its own)
    if args.init_from and resumed is None:
        init_record = init_from(args.init_from, args.init_from_weights, model, ema)
        logger.info(describe_init(init_record))
    model, optimizer = accelerator.prepare(model, optimizer)  # never the dataloader: we shard it ourselves
    model = compile_model(args, model)

    # ---- resume ----
    start = FRESH_START
    if resumed is not None:
        start = restore_training_state(resumed, resume_path, args, config, unwrap_model(model), ema, optimizer,
                                       accelerator.scaler, dataset, logger)
    provenance = run_record(resumed and resumed.get("provenance"), args.data_dir, dataset, accelerator.num_processes,
                            accelerator.mixed_precision)
    provenance["init_from"] = init_record or ((resumed or {}).get("provenance") or {}).get("init_from")
    provenance["encoders"] = encoder_records or None  # REPA: what the alignment targets came from
    provenance["recipe_changes"] = (((resumed or {}).get("provenance") or {}).get("recipe_changes") or []) + changes
    posthoc = None  # post-hoc EMA profiles, on the main process (updated after every step)
    if args.posthoc_ema_sigma_rels and is_main:
        posthoc = PosthocTracking(unwrap_model(model), parse_sigma_rels(args.posthoc_ema_sigma_rels),
                                  args.posthoc_ema_every, exp_dir, start.step, resumed, resume_path, logger.warning)
    del resumed
    evaluation = TrainingEval(args, config, accelerator, exp_dir, vae, provenance["run_id"],
                              lambda decoder: check_data_vae(args, dataset, decoder)) if args.eval_every else None

    # ---- the loop's parts; train_loop changes the run's files only from here on ----
    total_steps = min(args.max_train_steps, math.ceil(args.epochs * len(dataset) / global_batch_size(args)))
    data_iter = iter(build_dataloader(args, dataset, accelerator, start.step, start.samples_seen))
    accelerator.init_trackers(project_name="LSEP", config=tracker_config(args, config),
                              init_kwargs={"wandb": {"name": args.exp_name, "dir": exp_dir}})
    return TrainingRun(
        args=args, config=config, accelerator=accelerator, model=model, ema=ema, optimizer=optimizer,
        loss_fn=build_loss(args, config), dataset=dataset, data_iter=data_iter, vae=vae, encoders=encoders,
        provenance=provenance, exp_dir=exp_dir, checkpoint_dir=checkpoint_dir, step=start.step,
        samples_seen=start.samples_seen, nonfinite=start.nonfinite, last_checkpoint=resume_path,
        total_steps=total_steps, posthoc=posthoc, evaluation=evaluation,
        nan_steps=frozenset(parse_step_list(args.debug_nan_steps)), overwrite=args.overwrite and start.step == 0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="LSEP training (SiT + linear-probe loss)")
    # logging
    parser.add_argument("--output-dir", type=str, default="exps")
    parser.add_argument("--exp-name", type=str, required=True)
    parser.add_argument("--logging-dir", type=str, default="logs", help="tracker folder inside <output-dir>/<exp-name>")
    parser.add_argument("--report-to", type=str, default="wandb", choices=["wandb", "tensorboard", "none"],
                        help="wandb logs offline when neither WANDB_MODE nor an API key is set")
    parser.add_argument("--sampling-steps", type=int, default=10000,
                        help="preview interval: a grid of EMA samples every N steps (0 = off)")
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
    parser.add_argument("--allow-tf32", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--mixed-precision", type=str, default="fp16", choices=["no", "fp16", "bf16"],
                        help="default fp16 (the authors') on a GPU; left out on a CPU, no (the log says so)")
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
                        help=f"probe classifier lr; default {CLASSIFIER_LR}, {CLASSIFIER_LR_SIT_B} for SiT-B (the "
                             "authors' rule)")
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
    parser.add_argument("--weighting", type=str, default="uniform", choices=WEIGHTINGS)
    # kept only so the authors' launch scripts run unchanged; it selects nothing in their code either
    parser.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False, help="accepted, unused")
    # LSEP probe loss
    parser.add_argument("--weights-type", type=str, default="constant", choices=WEIGHTS_TYPES)
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
    # fine-tuning, post-hoc EMA, evaluation during training (training/init_from.py, posthoc.py, evaluation.py)
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
    # opt-in speed options (models/fused.py; measured by benchmarks/bench_train.py --levers); all off by default
    add_speed_option_flags(parser)
    # testing: multiply the loss by NaN at these steps, e.g. "3,5-7" (step numbers as logged, from 1)
    parser.add_argument("--debug-nan-steps", type=str, default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_args(parser, args)
    args.explicit_flags = explicit_flags(parser, argv)  # on resume, the others come from the checkpoint
    return args


def cli(argv=None):
    """Exit 1 for something the user must fix (flags, data, checkpoints, output folder, full disk), 2 when the
    run diverged; printed once, by rank 0 (a damaged data file by the rank that read it)."""
    run_cli(lambda a: main(parse_args(a)), argv)


if __name__ == "__main__":
    cli()
