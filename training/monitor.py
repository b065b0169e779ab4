"""Watching a run: the non-finite guard, the step statistics, memory, and ``stats.jsonl`` (EDM2's habit).

Statistics are summed on the device between log steps, so the loop never waits on them; the
only per-step host sync is the non-finite flag of ``training.loop.optimizer_step``.
"""
import errno
import json
import math
import os
import resource
import time

import torch

from fileio import DiskFull, atomic_write
from loss import LOG_NAMES
from training.checkpoints import CHECKPOINT_NAME
from training.errors import TrainingDiverged

# A logged window's mean loss above this multiple of the lowest window mean so far is out of its
# normal range (a loss on its way to overflowing; the weights may already be damaged).
NORMAL_LOSS_FACTOR = 2.0


class NonFiniteGuard:
    """Counts skipped steps; raises TrainingDiverged after ``max_consecutive`` in a row (0 = never).

    It also names the checkpoint to go back to: the last one saved while the loss was in its
    normal range, meaning that the last logged window before the save (a stats.jsonl record) had
    no skipped step and a finite mean loss at most NORMAL_LOSS_FACTOR x the lowest window mean so
    far, and no step was skipped between that log and the save. Before the first log nothing is
    known against the weights, so they count as in range. ``state()`` goes into each checkpoint,
    so a resumed run keeps the record.
    """

    def __init__(self, max_consecutive, consecutive=0, total=0, lowest_loss=None, in_range=True,
                 good_checkpoint=None):
        self.max_consecutive = max_consecutive
        self.consecutive = consecutive
        self.total = total
        self.lowest_loss = lowest_loss
        self.in_range = in_range
        self.good_checkpoint = good_checkpoint

    def record(self, bad, step, last_checkpoint=None):
        if not bad:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        self.in_range = False
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"training stopped at step {step}: {self.consecutive} consecutive steps with a non-finite loss or "
                f"gradient norm (--max-nonfinite {self.max_consecutive}); {self.where(last_checkpoint)}. Lower "
                f"--learning-rate or try --mixed-precision bf16/no")

    def where(self, last_checkpoint):
        """Which checkpoint to resume from, in words."""
        good = self.good_checkpoint
        if good is None:
            if last_checkpoint is None:
                return "no checkpoint was written"
            return (f"no checkpoint was saved while the loss was in its normal range, so {last_checkpoint} may "
                    "hold damaged weights")
        match = CHECKPOINT_NAME.match(os.path.basename(good))
        resume = f" (--resume-step {int(match.group(1))})" if match else ""
        later = f"; later ones, up to {last_checkpoint}, may hold damaged weights" if last_checkpoint != good else ""
        return f"the last checkpoint saved while the loss was in its normal range is {good}{resume}{later}"

    def note_log(self, mean_loss, skipped):
        """A logged window closed with this mean loss (None or NaN when every step was skipped)."""
        finite = mean_loss is not None and math.isfinite(mean_loss)
        if finite:
            self.lowest_loss = mean_loss if self.lowest_loss is None else min(self.lowest_loss, mean_loss)
        self.in_range = finite and not skipped and mean_loss <= NORMAL_LOSS_FACTOR * self.lowest_loss

    def note_checkpoint(self, path):
        """A checkpoint is about to be saved at ``path`` (call before state() goes into it)."""
        if self.in_range:
            self.good_checkpoint = path

    def state(self):
        return {"consecutive": self.consecutive, "total": self.total, "lowest_loss": self.lowest_loss,
                "in_range": self.in_range, "good_checkpoint": self.good_checkpoint}


class StepStats:
    """Training statistics summed on the device between log steps, so the loop never waits on them.

    One value per ``loss.LossTerms`` field (logged under ``loss.LOG_NAMES``), their sum without
    the alignment term as ``loss`` (the authors' logged loss), and the gradient norm."""

    KEYS = ("loss", *LOG_NAMES.values(), "grad_norm")

    def __init__(self, device):
        self.sums = torch.zeros(len(self.KEYS), device=device, dtype=torch.float64)
        self.good_steps = 0
        self.skipped = 0
        self.overflows = 0
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, terms, grad_norm):
        """Add one finished optimizer step's LossTerms (device scalars, the micro-steps' means) and
        gradient norm; the alignment term is unweighted, as REPA logs it (0 without alignment)."""
        self.sums += torch.stack([v.double() for v in (terms.denoising + terms.probe, *terms, grad_norm)])
        self.good_steps += 1

    def summary(self, accelerator):
        """Means over the window and all processes, plus counts and throughput; resets the window."""
        sums = self.sums
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.clone(), reduction="mean")
        means = (sums / max(self.good_steps, 1)).tolist()
        elapsed = time.perf_counter() - self.start
        out = {k: (v if self.good_steps else float("nan")) for k, v in zip(self.KEYS, means)}
        out.update(skipped_steps=self.skipped, fp16_overflows=self.overflows,
                   samples_per_sec=self.samples / max(elapsed, 1e-9))
        self.sums.zero_()
        self.good_steps = self.skipped = self.overflows = self.samples = 0
        self.start = time.perf_counter()
        return out


def memory_stats(device):
    """Peak CUDA memory since the last call (GiB) and this process's resident memory (GiB)."""
    stats = {}
    if device.type == "cuda":
        stats["cuda_max_alloc_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/statm") as f:
            stats["cpu_rss_gb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):  # not Linux: peak RSS instead
        stats["cpu_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return stats


def trim_stats(path, step, log=print):
    """Drop the stats.jsonl records after ``step`` (a resumed run writes them again: one record per
    step), rewriting the file atomically. A fresh run (step 0) starts an empty file."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill: dropped
    dropped = len(lines) - len(keep)
    if dropped:
        atomic_write(path, lambda f: f.write("".join(line + "\n" for line in keep).encode()))
        log(f"{path}: dropped {dropped} records after step {step} (this run writes them again)")
    return dropped


def append_stats(path, record):
    """Append one JSON line (EDM2's stats.jsonl); non-finite floats are written as null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    try:
        with open(path, "a") as f:
            f.write(json.dumps(clean) + "\n")
    except OSError as exc:  # a line cut short is dropped by trim_stats when the run resumes
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"{exc.strerror.lower()} while appending to {path}; free some space, then resume with "
                           "--resume-step -1") from None
        raise
