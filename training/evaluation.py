"""FID / sFID / IS / precision / recall of the EMA model during training (--eval-every).

Every --eval-every steps the EMA model samples --eval-samples images on every process through
generate.py's code path (the same labels, per-index noise and PNG/npz writing), then the
evaluator's metrics are computed against --eval-ref with the Inception network sharded over the
processes. Everything a user can get wrong is checked at start-up, on every process at once.
"""
import os
import shutil
import time
import types

import torch

from evaluator import EvaluatorError
from evaluator import inception as inc
from evaluator.evaluator import MIN_IMAGES, NpzImages, evaluate
from models.vae import VAEWeightsMissing, load_vae
from sampling.npz import write_npz
from sampling.run import sample_indices
from training.errors import TrainingError

EVAL_KEYS = ("fid", "sfid", "inception_score", "precision", "recall")


def check_eval_inputs(args, config, accelerator):
    """Start-up checks of --eval-*: the reference npz is readable images, the Inception weights
    exist (the main process may download them; the others then find them), the sampler fits the
    model. Returns the weights path. Every failure is one line, on every process at once."""
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
                error = f"--eval-every: {getattr(exc, 'problem', str(exc).splitlines()[0])}; {fix}"
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
        accelerator, args = self.accelerator, self.args
        rank, world = accelerator.process_index, accelerator.num_processes
        start = time.time()
        folder, npz_path = os.path.join(self.folder, f"{step:07d}"), os.path.join(self.folder, f"{step:07d}.npz")
        if accelerator.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)  # a crashed evaluation's leftovers
            os.makedirs(folder)
        accelerator.wait_for_everyone()
        sample_indices(self.settings, ema, self.config, self.vae, list(range(args.eval_samples)), folder,
                                rank, world, accelerator.device, self.config.in_channels)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            identity = {"training_eval": {"run_id": self.run_id, "step": step, "samples": args.eval_samples},
                        "config": self.config.to_dict(), "settings": vars(self.settings)}
            write_npz(folder, args.eval_samples, npz_path, identity)
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
