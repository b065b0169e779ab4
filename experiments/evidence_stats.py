"""The statistics of the digits evidence: spread over seeds, paired differences between arms,
steps to a threshold, and reading a run's curve at a FLOP budget.

Every function takes plain numbers (lists or numpy arrays) so that each is checked against a
closed-form or brute-force case in tests/test_evidence.py.
"""
import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95  # the paired intervals


def mean_std(values):
    """Mean and sample standard deviation (ddof=1; 0 for one value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def paired_difference(treated, control, higher_is_better, confidence=CONFIDENCE):
    """Per-seed differences ``treated - control`` of one metric (seeds paired by position).

    Returns the differences, their mean, the two-sided Student-t interval of the mean at
    ``confidence`` (n - 1 degrees of freedom; None below 2 seeds), how many seeds favour the
    treated arm, how many the control (ties count for neither), and the exact two-sided sign-test
    p-value of those counts (binomial, p = 1/2, ties dropped)."""
    treated, control = np.asarray(treated, dtype=np.float64), np.asarray(control, dtype=np.float64)
    if treated.shape != control.shape or treated.ndim != 1 or len(treated) == 0:
        raise ValueError(f"paired values need one value per seed in each arm, got {treated.shape} and {control.shape}")
    diffs = treated - control
    n = len(diffs)
    mean = float(diffs.mean())
    interval = None
    if n > 1:
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * diffs.std(ddof=1) / math.sqrt(n)
        interval = [mean - float(half), mean + float(half)]
    better = int(np.sum(diffs > 0) if higher_is_better else np.sum(diffs < 0))
    worse = int(np.sum(diffs < 0) if higher_is_better else np.sum(diffs > 0))
    return dict(diffs=diffs.tolist(), mean=mean, interval=interval, confidence=confidence,
                treated_better=better, control_better=worse, sign_test_p=sign_test_p(better, worse))


def sign_test_p(wins, losses):
    """Exact two-sided sign-test p-value of ``wins`` against ``losses`` (1.0 when both are 0)."""
    n = wins + losses
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * stats.binom.cdf(min(wins, losses), n, 0.5)))


def steps_to_threshold(steps, values, threshold, higher_is_better):
    """The first training step at which a curve reaches ``threshold``, linear between the two
    checkpoints that bracket the crossing (the first checkpoint itself if it is already there);
    None if no checkpoint reaches it (the run is censored at its last step)."""
    steps, values = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    reached = values >= threshold if higher_is_better else values <= threshold
    if not reached.any():
        return None
    k = int(np.argmax(reached))
    if k == 0:
        return float(steps[0])
    v0, v1 = values[k - 1], values[k]
    return float(steps[k - 1] + (threshold - v0) / (v1 - v0) * (steps[k] - steps[k - 1]))


def at_flops(flops, values, budget):
    """A run's metric at ``budget`` FLOPs, linear between its two bracketing checkpoints."""
    flops, values = np.asarray(flops, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if not flops[0] * (1 - 1e-12) <= budget <= flops[-1] * (1 + 1e-12):
        raise ValueError(f"budget {budget:.4g} FLOPs is outside the run's checkpoints {flops[0]:.4g}..{flops[-1]:.4g}")
    return float(np.interp(budget, flops, values))
