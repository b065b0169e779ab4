"""train.py's flags beyond their definitions: the range and consistency checks at parse time
(each bad value is one usage line naming the flag, argparse's exit status 2, before anything
starts), which flags were given explicitly, and the recipe a resumed run takes from its checkpoint."""
import argparse
import os

from flagcheck import AT_LEAST_0, AT_LEAST_1, BETA, POSITIVE, UNIT, Range, check_ranges, flag_name
from models.config import DERIVED_FIELDS, FIELD_RANGES, FLAGS, flag_dest
from models.encoders import parse_arch_overrides, parse_enc_type
from posthoc_ema import parse_sigma_rels
from training.errors import TrainingError

RANGES = {
    "batch_size": AT_LEAST_1, "gradient_accumulation_steps": AT_LEAST_1, "log_every": AT_LEAST_1,
    "max_train_steps": AT_LEAST_1, "epochs": AT_LEAST_1, "sampling_steps": AT_LEAST_0,
    "checkpointing_steps": AT_LEAST_0, "checkpointing_epochs": AT_LEAST_0, "max_nonfinite": AT_LEAST_0,
    "num_workers": AT_LEAST_0, "ema_decay": UNIT, "learning_rate": AT_LEAST_0, "learning_rate_class": AT_LEAST_0,  # 0 freezes
    "adam_beta1": BETA, "adam_beta2": BETA, "adam_epsilon": POSITIVE, "adam_weight_decay": AT_LEAST_0,
    "adam_weight_decay_class": AT_LEAST_0, "max_grad_norm": Range(0, low_open=True, allow_inf=True),
    "weight_class": AT_LEAST_0, "weight_start": AT_LEAST_0, "weight_end": AT_LEAST_0, "n_weights": AT_LEAST_1,
    "proj_coeff": AT_LEAST_0, "seed": AT_LEAST_0, "resolution": AT_LEAST_1, "posthoc_ema_every": AT_LEAST_1,
    "eval_every": AT_LEAST_0, "eval_samples": Range(4),  # precision/recall's k-NN radii need k=3 other images
    # the flags that set a ModelConfig field directly, by the field's own rule
    **{flag_dest(FLAGS[field]): rule for field, rule in FIELD_RANGES.items() if field not in DERIVED_FIELDS},
    "crop_start": AT_LEAST_1, "projector_dim": AT_LEAST_1, "align_depth": AT_LEAST_1,
}

# What a resumed run takes from its checkpoint's flags when the command does not give them: the
# recipe, every flag that changes what is trained. A flag given explicitly that differs is a
# logged change, recorded in provenance. Launch flags (paths, workers, logging, trackers,
# checkpoint and preview intervals, evaluation) are the command's own.
RECIPE_FLAGS = ("learning_rate", "learning_rate_class", "adam_beta1", "adam_beta2", "adam_epsilon",
                "adam_weight_decay", "adam_weight_decay_class", "max_grad_norm", "ema_decay", "batch_size",
                "gradient_accumulation_steps", "weighting", "weights_type", "weight_class", "weight_start",
                "weight_end", "n_weights", "prediction", "proj_coeff", "seed", "allow_tf32", "epochs",
                "max_train_steps", "posthoc_ema_sigma_rels", "posthoc_ema_every")
# Recipe flags the run cannot take over once it has started (the accelerator exists): a resume
# that leaves them out while the checkpoint differs is refused with the flag to pass.
RESTATE_FLAGS = ("mixed_precision",)


def check_args(parser, args):
    """Usage errors of train.py's flags (``parser.error``: one line, exit 2)."""
    check_ranges(parser, args, RANGES)
    if args.resume_step < -1:
        parser.error("--resume-step must be a step >= 0, or -1 for the latest checkpoint")
    if args.overwrite and args.resume_step != 0:
        parser.error(f"--overwrite starts over; it contradicts --resume-step {args.resume_step}")
    name = os.path.normpath(args.exp_name) if args.exp_name.strip() else ""
    if not name or name in (".", "..") or os.path.isabs(args.exp_name) or name.startswith(".." + os.sep):
        parser.error(f"--exp-name {args.exp_name!r} must name a folder inside --output-dir (no empty name, no "
                     "absolute path, no '..'), e.g. --exp-name lsep-xl2")
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
    check_finetune_eval_flags(parser, args)


def explicit_flags(parser, argv):
    """The dests of the flags ``argv`` gives explicitly (a second parse with every default suppressed)."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return sorted(vars(given))


def resume_recipe(args, checkpoint, path, step, log):
    """The flags of a resumed run: recipe flags the command leaves out come from the checkpoint's
    own flags (its ``args``); explicit ones that differ are changes. Returns (args, changes), a new
    Namespace and [{"step", "flag", "was", "now"}], each change and each value taken logged."""
    before = vars(checkpoint.get("args") or argparse.Namespace()) if isinstance(checkpoint, dict) else {}
    before = before if isinstance(before, dict) else {}
    explicit = set(getattr(args, "explicit_flags", None) or ())
    values, changes = dict(vars(args)), []
    for dest in RECIPE_FLAGS + RESTATE_FLAGS:
        if dest not in before or before[dest] == values.get(dest):
            continue
        if dest in explicit:
            changes.append({"step": step, "flag": flag_name(dest), "was": before[dest], "now": values[dest]})
            log.warning(f"{flag_name(dest)} {values[dest]} changes the resumed run's {before[dest]} (from step {step})")
        elif dest in RESTATE_FLAGS:
            raise TrainingError(f"{path} was trained with {flag_name(dest)} {before[dest]}; pass "
                                f"{flag_name(dest)} {before[dest]} to continue it (another value is a logged change)")
        else:
            log.info(f"{flag_name(dest)} {before[dest]}: taken from {path} (the command does not give it)")
            values[dest] = before[dest]
    return argparse.Namespace(**values), changes


def check_finetune_eval_flags(parser, args):
    """Usage errors of the fine-tuning, post-hoc EMA and evaluation flags."""
    if args.init_from and args.resume_step > 0:
        parser.error(f"--init-from starts a new run; --resume-step {args.resume_step} continues one: pass one of them")
    try:
        parse_sigma_rels(args.posthoc_ema_sigma_rels)
    except ValueError as exc:
        parser.error(f"--posthoc-ema-sigma-rels {args.posthoc_ema_sigma_rels!r}: {exc}; e.g. 0.05,0.10")
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
