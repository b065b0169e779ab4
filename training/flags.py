"""The checks of train.py's flags at parse time: each bad value is one usage line naming the flag,
before anything starts (argparse's exit status 2)."""
from models.encoders import parse_arch_overrides, parse_enc_type
from posthoc_ema import parse_sigma_rels


def check_args(parser, args):
    """Usage errors of train.py's flags (``parser.error``: one line, exit 2)."""
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

def parse_step_list(text):
    """'3,5-7' -> {3, 5, 6, 7} (the hidden --debug-nan-steps)."""
    steps = set()
    for part in filter(None, (text or "").split(",")):
        lo, _, hi = part.partition("-")
        steps.update(range(int(lo), int(hi or lo) + 1))
    return steps
