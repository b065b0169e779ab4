"""train.py's fine-tuning start, post-hoc EMA tracking and evaluation during training (issue 15).

* ``init_from``: a fresh run (step 0, fresh optimizer) starts from another checkpoint's EMA or
  model weights, at another resolution or on another dataset. The new run's config comes from
  its flags and data; the source must have the same sizes. The fixed sin-cos ``pos_embed`` is the
  new model's (rebuilt for the new grid); heads that depend on the classes (``classifier.*``,
  ``y_embedder.*``) and other codebases' heads (REPA's ``projectors.*``) are skipped when they do
  not fit, and reported in one list; every other weight is copied exactly.
* ``PosthocTracking``: the EDM2 power-function EMA profiles of ``posthoc_ema.py``, updated after
  every optimizer step, snapshotted every ``--posthoc-ema-every`` steps, resumed exactly.
* ``TrainingEval``: every ``--eval-every`` steps, samples from the EMA model on every process
  with generate.py's ``sample_indices`` (the same labels, per-index noise and PNG/npz writing),
  then FID / sFID / IS / precision / recall with ``evaluator.evaluator.evaluate`` (Inception
  sharded over the processes). Everything a user can get wrong is checked at start-up.
"""
import os
import shutil
import time
import types

import torch

from models.checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file, weights_entry, weights_sha256
from train_utils import TrainingError

#################################################################################
#                        --init-from: start from other weights                  #
#################################################################################

# Heads that another --num-classes (or another codebase) changes: skipped when they do not fit.
HEAD_PREFIXES = ("classifier.", "y_embedder.", "projectors.")
FIXED_KEYS = ("pos_embed",)  # not learned: the new model's (the sin-cos table of its own grid)


def init_weights_plan(own, state, source):
    """(weights to copy, [(key, reason)] skipped) for loading ``state`` into a model whose state
    dict is ``own``. A backbone key missing on either side or with another shape is a size
    mismatch: TrainingError naming the key and both shapes."""
    copy, skipped = {}, []
    for key in sorted(set(own) | set(state)):
        mine, theirs = own.get(key), state.get(key)
        if key in FIXED_KEYS:
            if theirs is not None and mine is not None and mine.shape != theirs.shape:
                skipped.append((key, f"rebuilt for the new grid {tuple(theirs.shape)} -> {tuple(mine.shape)}"))
            continue
        if mine is not None and theirs is not None and mine.shape == theirs.shape:
            copy[key] = theirs
            continue
        if key.startswith(HEAD_PREFIXES):
            if theirs is None:
                skipped.append((key, "not in the source (kept at init)"))
            elif mine is None:
                skipped.append((key, "not in the new model (dropped)"))
            else:
                skipped.append((key, f"shape {tuple(theirs.shape)} -> {tuple(mine.shape)} (kept at init)"))
            continue
        there = "absent" if theirs is None else tuple(theirs.shape)
        here = "absent" if mine is None else tuple(mine.shape)
        raise TrainingError(f"--init-from {source} does not fit the new model: {key} is {there} there and {here} "
                            f"here; the sizes (--model, --hidden-size, --depth, --patch-size, --qk-norm, --vae) must "
                            f"match the source, only the resolution, the classes and the probe may change")
    return copy, skipped


@torch.no_grad()
def init_from(path, which, model, ema):
    """Copy the ``which`` ("ema" or "model") weights of checkpoint ``path`` into ``model`` and
    ``ema`` (see ``init_weights_plan``). Returns the record for checkpoint["provenance"]["init_from"]."""
    try:
        checkpoint = load_checkpoint_file(path)
        state = extract_state_dict(checkpoint, which)
    except CheckpointError as exc:
        raise TrainingError(f"--init-from: {exc}") from None
    is_dict = isinstance(checkpoint, dict)
    used = weights_entry(checkpoint, which)
    copy, skipped = init_weights_plan(model.state_dict(), state, path)
    for target in (model, ema):
        own = target.state_dict()
        for key, value in copy.items():
            own[key].copy_(value)
    provenance = (checkpoint.get("provenance") or {}) if is_dict else {}
    return {"path": os.path.abspath(path), "which": used, "weights_sha256": weights_sha256(state),
            "steps": checkpoint.get("steps") if is_dict else None, "run_id": provenance.get("run_id"),
            "copied": len(copy), "skipped": [f"{key}: {reason}" for key, reason in skipped]}


def describe_init(record):
    """The one log line of an --init-from start."""
    skipped = "; ".join(record["skipped"]) or "none"
    return (f"Initialised from {record['path']} ({record['which']} weights, sha256 {record['weights_sha256'][:12]}, "
            f"step {record['steps']}): {record['copied']} tensors copied; skipped: {skipped}")


#################################################################################
#                              Post-hoc EMA tracking                            #
#################################################################################

def parse_sigma_rels(text):
    """'0.05,0.10' -> (0.05, 0.1); ValueError with the reason otherwise."""
    from posthoc_ema import MAX_SIGMA_REL

    values = tuple(float(part) for part in text.split(",") if part.strip())
    for value in values:
        if not 0.0 < value <= MAX_SIGMA_REL:
            raise ValueError(f"{value} is outside (0, {MAX_SIGMA_REL:.4f}]")
    if len(set(values)) != len(values):
        raise ValueError("the values must be distinct")
    return values


class PosthocTracking:
    """posthoc_ema.PowerFunctionEMA on the main process, wired into train.py's loop."""

    STATE_KEY = "posthoc_ema_tracker"  # its entry in the training checkpoint

    def __init__(self, model, sigma_rels, every, exp_dir, step, resumed=None, resume_path=None, log=print):
        from posthoc_ema import SNAPSHOT_DIR, PowerFunctionEMA, list_step_files

        self.names = [name for name, _ in model.named_parameters()]
        self.params = list(model.parameters())
        self.every, self.exp_dir = every, exp_dir
        self.tracker = PowerFunctionEMA(self.params, sigma_rels, step=step)
        for saved, path in list_step_files(os.path.join(exp_dir, SNAPSHOT_DIR)):
            if saved > step:  # a longer earlier run's (or an overwritten run's): never mixed with this one's
                os.remove(path)
                log(f"removed the post-hoc EMA snapshot {path}: it is past this run's step {step}")
        if resumed is not None:
            state = resumed.get(self.STATE_KEY)
            if state is None:
                log(f"warning: {resume_path} has no post-hoc EMA state: its profiles start at step {step}")
            else:
                try:
                    self.tracker.load_state_dict(state)
                except (ValueError, KeyError, TypeError) as exc:
                    raise TrainingError(f"--posthoc-ema-sigma-rels: {resume_path}: {exc}") from None

    def update(self, step):
        self.tracker.update(self.params, step)

    def maybe_snapshot(self, step, total_steps, extra):
        """Write <exp>/posthoc-ema/<step:07d>.pt every --posthoc-ema-every steps and at the end."""
        from posthoc_ema import save_snapshot

        if step % self.every == 0 or step == total_steps:
            return save_snapshot(self.exp_dir, step, self.names, self.tracker, extra=extra)
        return None

    def state_dict(self):
        return self.tracker.state_dict()


def posthoc_checkpoint_entry(tracking):
    """The training checkpoint's post-hoc EMA entry (None when tracking is off or not on this process)."""
    return {PosthocTracking.STATE_KEY: tracking.state_dict() if tracking is not None else None}


#################################################################################
#                          Evaluation during training                           #
#################################################################################

EVAL_KEYS = ("fid", "sfid", "inception_score", "precision", "recall")


def check_eval_inputs(args, config, accelerator):
    """Start-up checks of --eval-*: the reference npz is readable images, the Inception weights
    exist (the main process may download them; the others then find them), the sampler fits the
    model. Returns the weights path. Every failure is one line, on every process at once."""
    from evaluator import EvaluatorError
    from evaluator import inception as inc
    from evaluator.evaluator import MIN_IMAGES, NpzImages

    error, weights = None, None
    if args.eval_cfg_scale > 1 and not config.has_null_label:
        error = (f"--eval-cfg-scale {args.eval_cfg_scale} needs the null-label row, but this model trains without "
                 f"label dropout (--cfg-prob 0); use --eval-cfg-scale 1")
    elif args.eval_ref is None:
        error = "--eval-every needs --eval-ref REF.npz (reference images, e.g. ADM's VIRTUAL_imagenet256_labeled.npz)"
    else:
        try:
            with NpzImages(args.eval_ref) as ref:
                if len(ref) < MIN_IMAGES:
                    error = f"--eval-ref {args.eval_ref} holds {len(ref)} images; at least {MIN_IMAGES} are needed"
        except EvaluatorError as exc:
            error = f"--eval-ref {exc}"
    given = args.eval_inception_weights
    fix = f"download {inc.WEIGHTS_FILE} from {inc.WEIGHTS_URL} and pass --eval-inception-weights PATH"
    if error is None and given and not os.path.isfile(given):
        error = f"--eval-inception-weights {given}: no such file; {fix}"
    for turn in ("main", "others"):  # the main process may download them; the others then find them
        if error is None and (turn == "main") == accelerator.is_main_process:
            try:
                weights = inc.resolve_weights(given, download=turn == "main")
            except EvaluatorError as exc:
                error = f"--eval-every: {str(exc).splitlines()[0]} {fix}"
        if accelerator.num_processes > 1:
            accelerator.wait_for_everyone()
    failed = torch.tensor([float(error is not None)], device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, reduction="sum")
    if failed.item():
        raise TrainingError(error or "--eval-every: the evaluation inputs failed their check on another process")
    return weights


def open_eval_decoder(args, preview_vae, accelerator, check_vae):
    """The --vae decoder on every process (the preview one where train.py loaded it); failures are
    one line at start-up, on every process at once."""
    from models.vae import VAEWeightsMissing, load_vae

    vae, error = preview_vae, None
    if vae is None:
        try:
            vae = load_vae(args.vae, accelerator.device)
            check_vae(vae)
        except (VAEWeightsMissing, TrainingError) as exc:
            error = f"--eval-every: the --vae {args.vae} decoder: {exc}"
    failed = torch.tensor([float(error is not None)], device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, reduction="sum")
    if failed.item():
        raise TrainingError(error or f"--eval-every: the --vae {args.vae} decoder failed on another process")
    return vae


class TrainingEval:
    """Sample --eval-samples images from the EMA model with generate.py's code path on every
    process, build their npz, and compute the evaluator's metrics against --eval-ref."""

    def __init__(self, args, config, accelerator, exp_dir, preview_vae, run_id, check_vae):
        """``preview_vae``: train.py's decoder (main process, previews on) or None; ``check_vae(vae)``
        raises when a decoder does not belong to the training latents."""
        self.args, self.config, self.accelerator = args, config, accelerator
        self.folder = os.path.join(exp_dir, "eval")
        self.run_id = run_id
        self.weights = check_eval_inputs(args, config, accelerator)
        self.vae = preview_vae if args.vae == "none" else open_eval_decoder(args, preview_vae, accelerator, check_vae)
        self.precision = "fp32" if args.mixed_precision == "no" else "bf16"
        # generate.py's sampler settings (the flags of its parse_args, by name)
        self.settings = types.SimpleNamespace(
            num_fid_samples=args.eval_samples, balanced_labels=False, global_seed=args.seed, mode=args.eval_mode,
            num_steps=args.eval_steps, heun=False, cfg_scale=args.eval_cfg_scale, guidance_low=0.0,
            guidance_high=1.0, precision=self.precision, fused_attn=args.fused_attn, compile=False,
            per_proc_batch_size=max(1, args.batch_size // accelerator.num_processes), max_batches=None)

    def due(self, step):
        return self.args.eval_every > 0 and step % self.args.eval_every == 0

    @torch.no_grad()
    def run(self, ema, step):
        """Evaluate ``ema`` at ``step`` on every process; returns the metrics dict on the main
        process (keys eval_*), None elsewhere. TF32 switches are restored afterwards."""
        import generate
        from evaluator.evaluator import evaluate

        accelerator, args = self.accelerator, self.args
        rank, world = accelerator.process_index, accelerator.num_processes
        start = time.time()
        folder, npz_path = os.path.join(self.folder, f"{step:07d}"), os.path.join(self.folder, f"{step:07d}.npz")
        if accelerator.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)  # a crashed evaluation's leftovers
            os.makedirs(folder)
        accelerator.wait_for_everyone()
        generate.sample_indices(self.settings, ema, self.config, self.vae, list(range(args.eval_samples)), folder,
                                rank, world, accelerator.device, self.config.in_channels)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            identity = {"training_eval": {"run_id": self.run_id, "step": step, "samples": args.eval_samples},
                        "config": self.config.to_dict(), "settings": vars(self.settings)}
            generate.write_npz(folder, args.eval_samples, npz_path, identity)
            shutil.rmtree(folder)
        accelerator.wait_for_everyone()
        flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        try:
            results = evaluate(args.eval_ref, npz_path, self.weights, batch_size=self.settings.per_proc_batch_size,
                               device=accelerator.device.type, progress=False, log=lambda *a, **k: None)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return None
        if not args.eval_keep_samples:
            os.remove(npz_path)
        out = {f"eval_{key}": float(results[key]) for key in EVAL_KEYS}
        out.update(eval_samples=args.eval_samples, eval_seconds=time.time() - start)
        return out
