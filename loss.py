"""Flow-matching loss plus the LSEP probe loss and REPA's alignment loss (docs/method.md, "Loss").

``interpolant`` is the one definition of the path x_t = alpha_t x + sigma_t e; the samplers
import it from here. The loss returns a ``LossTerms`` record: a new term is a new field there,
and the training loop, its statistics and ``stats.jsonl`` follow it (``LOG_NAMES``).
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from models.config import PATH_TYPES
from models.repa import per_sample_alignment

WEIGHTINGS = ("uniform", "lognormal")    # --weighting: how training times are drawn
WEIGHTS_TYPES = ("constant", "steps")    # --weights-type: how the probe loss is weighted over time


class LossTerms(NamedTuple):
    """The terms of one loss evaluation (the same four fields whatever the method).

    ``denoising``: per-sample squared error (B,), or its mean once reduced; ``probe``: the
    already weighted probe cross-entropy (scalar, 0 without a probe); ``probe_accuracy``: its
    top-1, detached, for logging; ``alignment``: REPA's alignment loss, unweighted as REPA logs
    it (scalar, 0 without alignment).
    """
    denoising: torch.Tensor
    probe: torch.Tensor
    probe_accuracy: torch.Tensor
    alignment: torch.Tensor

    def objective(self, proj_coeff=0.0):
        """What is minimised: mean denoising loss + probe loss + proj_coeff x alignment."""
        return self.denoising.mean() + self.probe + proj_coeff * self.alignment


# LossTerms field -> its name in stats.jsonl and the trackers (REPA's and the authors' names)
LOG_NAMES = {"denoising": "denoising_loss", "probe": "probe_loss", "probe_accuracy": "probe_accuracy",
             "alignment": "proj_loss"}


def interpolant(t, path_type="linear"):
    """Returns (alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt) for x_t = alpha_t x + sigma_t e."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        half_pi = math.pi / 2
        return (torch.cos(half_pi * t), torch.sin(half_pi * t),
                -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t))
    raise ValueError(f"unknown --path-type {path_type!r}; choose one of {PATH_TYPES}")


def sample_time(batch_size, weighting="uniform", path_type="linear", device=None):
    """Training times t in [0, 1]: uniform, or EDM's lognormal sigma mapped onto the path."""
    if weighting == "uniform":
        return torch.rand(batch_size, device=device)
    if weighting == "lognormal":
        sigma = torch.randn(batch_size, device=device).exp()
        if path_type == "linear":
            return sigma / (1 + sigma)
        if path_type == "cosine":
            return 2 / math.pi * torch.atan(sigma)
        raise ValueError(f"unknown --path-type {path_type!r}; choose one of {PATH_TYPES}")
    raise ValueError(f"unknown --weighting {weighting!r}; choose one of {WEIGHTINGS}")


def time_bin_weights(t, weight_start, weight_end, n_weights):
    """Probe-loss weight of each time: [0, 1] cut into n equal bins (last one closed at 1),
    weights linspace(weight_start, weight_end, n). Bin edges compare like the authors' masks."""
    edges = torch.arange(1, n_weights, device=t.device, dtype=torch.float64) / n_weights
    bins = torch.bucketize(t, edges.to(t.dtype), right=True)
    weights = torch.linspace(weight_start, weight_end, n_weights, device=t.device, dtype=torch.float32)
    return weights[bins]


def mean_flat(x):
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class LSEPLoss:
    """``loss_fn(model, x, model_kwargs, zs=None) -> LossTerms``.

    ``denoising`` is per sample (B,); ``probe`` is the already weighted scalar to add to its
    mean (for ``constant``: ``weight_class`` x mean CE, a factor the authors apply in their
    train.py). The probe loss uses the true label even where the probe branch saw the null
    label; probe terms are zero when the model returns no probe logits.

    REPA: ``zs`` is a list of the frozen encoders' (B, T, z_dim) tokens (empty or None when
    alignment is off); ``alignment`` is then the mean over tokens, samples and encoders of -cos,
    in float32 (the training loop multiplies it by --proj-coeff).
    """

    def __init__(self, prediction="v", path_type="linear", weighting="uniform", weights_type="constant",
                 weight_class=0.02, weight_start=0.02, weight_end=0.03, n_weights=10, multi_weights=None):
        if multi_weights is not None:  # the authors' packing: [start, end, n, type]
            weight_start, weight_end, n_weights, weights_type = multi_weights
        if prediction != "v":
            raise ValueError(f"--prediction {prediction!r} is not supported; only 'v' (velocity)")
        if path_type not in PATH_TYPES:
            raise ValueError(f"unknown --path-type {path_type!r}; choose one of {PATH_TYPES}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown --weighting {weighting!r}; choose one of {WEIGHTINGS}")
        if weights_type not in WEIGHTS_TYPES:
            raise ValueError(f"unknown --weights-type {weights_type!r}; choose one of {WEIGHTS_TYPES}")
        if weights_type == "steps" and n_weights < 1:
            raise ValueError(f"--n-weights must be >= 1, got {n_weights}")
        self.prediction = prediction
        self.path_type = path_type
        self.weighting = weighting
        self.weights_type = weights_type
        self.weight_class = weight_class
        self.weight_start = weight_start
        self.weight_end = weight_end
        self.n_weights = int(n_weights)

    def probe_weights(self, t):
        """Per-sample probe-loss weights for times t (B,)."""
        if self.weights_type == "constant":
            return torch.full_like(t, self.weight_class, dtype=torch.float32)
        return time_bin_weights(t, self.weight_start, self.weight_end, self.n_weights)

    def __call__(self, model, images, model_kwargs=None, zs=None):
        model_kwargs = {} if model_kwargs is None else model_kwargs
        batch = images.shape[0]
        t = sample_time(batch, self.weighting, self.path_type, images.device).to(images.dtype)
        noises = torch.randn_like(images)
        alpha_t, sigma_t, d_alpha_t, d_sigma_t = (a.view(batch, 1, 1, 1) for a in interpolant(t, self.path_type))
        model_input = alpha_t * images + sigma_t * noises
        model_target = d_alpha_t * images + d_sigma_t * noises
        model_output, probe_logits, *projected = model(model_input, t, **model_kwargs)
        denoising_loss = mean_flat((model_output.float() - model_target.float()) ** 2)
        zero = denoising_loss.new_zeros(())
        probe_loss = probe_accuracy = zero
        if probe_logits is not None:
            labels = model_kwargs["y"]
            ce = F.cross_entropy(probe_logits.float(), labels, reduction="none")
            probe_loss = (self.probe_weights(t) * ce).mean()
            probe_accuracy = (probe_logits.detach().argmax(dim=1) == labels).float().mean()
        if bool(projected) != bool(zs):
            raise ValueError("REPA alignment needs both the model's projectors (--enc-type when it was built) and "
                             f"the encoders' tokens: got {len(projected)} projector outputs and "
                             f"{len(zs or [])} encoder token sets")
        alignment = per_sample_alignment(projected[0], zs).mean() if zs else zero
        return LossTerms(denoising_loss, probe_loss, probe_accuracy, alignment)


LSEP_Loss = LSEPLoss  # the authors' name
