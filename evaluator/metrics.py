"""Metric math of the ADM suite on feature arrays: FID, sFID, Inception Score, precision, recall
(and the kernel distance, KID, which the ADM suite lacks).

Each function mirrors `evaluations/evaluator.py` of openai/guided-diffusion (the numbers
diffusion papers report, docs/evaluation.md); where this file deviates, the docstring says
how and why. Nothing here loads images or networks, so other tools can reuse it on any
(N, D) feature arrays.
"""

import warnings

import numpy as np
import torch
from scipy import linalg
from scipy.special import xlogy

# ADM's ManifoldEstimator defaults (itself from Kynkaanniemi et al.'s reference code).
PR_NEIGHBOURHOOD = 3
PR_ROW_BATCH = 10000
PR_COL_BATCH = 10000


# ----------------------------------------------------------------------------
# Kernel distance (KID): not in the ADM suite, torch-fidelity's estimator
# ----------------------------------------------------------------------------

KID_SUBSETS = 100
KID_MAX_SUBSET = 1000  # torch-fidelity's default subset size; smaller sets use their own size


def kernel_distance(features_a, features_b, subsets=KID_SUBSETS, max_subset=KID_MAX_SUBSET, seed=0):
    """KID between two (N, D) feature arrays: the unbiased squared MMD with the cubic polynomial
    kernel k(x, y) = (x.y / D + 1)^3, averaged over ``subsets`` random subsets of one size from
    each set (torch_fidelity.metric_kid). The size is ``min(len(a), len(b), max_subset)``, so a
    set smaller than torch-fidelity's default of 1000 is still measured (small-sample safe); the
    estimate is unbiased at any size, so it can be negative. Returns (mean, std over subsets)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    a = torch.as_tensor(np.asarray(features_a, dtype=np.float64))
    b = torch.as_tensor(np.asarray(features_b, dtype=np.float64))
    size = min(len(a), len(b), max_subset)
    if size < 2:
        raise ValueError(f"the kernel distance needs at least 2 features in each set, got {len(a)} and {len(b)}")
    out = kid_features_to_metric(a, b, kid_subsets=subsets, kid_subset_size=size, kid_kernel="poly",
                                 kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
                                 rng_seed=seed, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


# ----------------------------------------------------------------------------
# Frechet distance (FID on pool_3, sFID on the spatial features)
# ----------------------------------------------------------------------------

def feature_statistics(features, chunk_size=10000):
    """Mean and unbiased covariance (np.cov, rowvar=False) of (N, D) features, in float64.

    Two passes over row chunks: ADM's np.cov without the (N, D) float64 copy it makes (800 MB
    at 50k x 2048). ADM's np.mean keeps mu in float32; float64 here moves FID by ~1e-6 at most.
    """
    features = np.asarray(features)
    n = features.shape[0]
    if features.ndim != 2 or n < 2:
        raise ValueError(f"feature_statistics needs an (N, D) array with N >= 2, got shape {features.shape}")
    mu = np.zeros(features.shape[1], dtype=np.float64)
    for i in range(0, n, chunk_size):
        mu += features[i:i + chunk_size].sum(axis=0, dtype=np.float64)
    mu /= n
    sigma = np.zeros((features.shape[1], features.shape[1]), dtype=np.float64)
    for i in range(0, n, chunk_size):
        centred = features[i:i + chunk_size].astype(np.float64) - mu
        sigma += centred.T @ centred
    sigma /= n - 1
    return mu, sigma


def _sqrtm(matrix):
    """scipy.linalg.sqrtm's matrix square root, without its error estimate.

    ADM calls sqrtm(..., disp=False) only to silence the printed estimate; SciPy 1.16
    deprecated `disp` (removed in 1.18), and the square root it returns is the same.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        result = linalg.sqrtm(matrix)
    return result[0] if isinstance(result, tuple) else result


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}), exactly as ADM's FIDStatistics.

    If sqrtm(S1 S2) is not finite, eps is added to both diagonals and it is retried (with
    a warning). A complex root is accepted when the imaginary parts on its diagonal (the
    only entries the trace reads) are within 1e-3 of 0, and then its real part is used;
    otherwise ValueError reports the largest imaginary magnitude, as ADM does.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different shapes: {sigma1.shape} vs {sigma2.shape}")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))

    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real

    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------

def softmax(logits):
    """Row-wise softmax in float64 (ADM: softmax of the bias-free 1008-way logits)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    expd = np.exp(shifted)
    return expd / expd.sum(axis=1, keepdims=True)


def inception_score(probs, split_size=5000):
    """Mean over consecutive splits of exp(mean_x KL(p(y|x) || p(y))), as ADM.

    The last split may be shorter, as in ADM. 0 log 0 is taken as 0 (scipy xlogy), where
    ADM's float32 `p * log p` would give NaN for an exact zero; the two agree otherwise.
    Computed in float64.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"inception_score needs (N, classes) probabilities, got shape {probs.shape}")
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------
# Improved precision and recall (Kynkaanniemi et al. 2019, ADM's ManifoldEstimator)
# ----------------------------------------------------------------------------

def pairwise_sq_distances(u, v, half=True):
    """Squared Euclidean distances (float32) between rows of u and v, ADM's DistanceBlock.

    max(|u|^2 - 2 u.v + |v|^2, 0) evaluated in float16 (inputs cast to float16, as ADM's
    graph does); if any entry of the block is not finite, the block is recomputed in
    float32. half=False skips the float16 attempt.
    """
    def block(a, b):
        norm_a = (a * a).sum(dim=1, keepdim=True)
        norm_b = (b * b).sum(dim=1).unsqueeze(0)
        return torch.clamp_min(norm_a - 2 * (a @ b.T) + norm_b, 0.0)

    if half:
        dist = block(u.half(), v.half())
        if torch.isfinite(dist).all():
            return dist.float()
    return block(u.float(), v.float())


def _default_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _features_tensor(features, device):
    if isinstance(features, torch.Tensor):
        return features.to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)


class _ExactHalfMatmul:
    """Keep float32 accumulation in float16 matmuls (TF's default) while computing distances."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = self.saved


def manifold_radii(features, k=PR_NEIGHBOURHOOD, row_batch_size=PR_ROW_BATCH, col_batch_size=PR_COL_BATCH,
                   device=None, half=True):
    """Squared distance from each row to its k-th nearest neighbour within the set, (N,) float32.

    As ADM, the row's own zero distance counts: the radius is entry k of the row's sorted
    distances (the (k+1)-th smallest). Distances come in (row batch x col batch) blocks, each
    with its own float16 / float32 decision; a running top-(k+1) replaces ADM's full
    (row batch x N) buffer, which selects the same value.
    """
    device = _default_device(device)
    feats = _features_tensor(features, device)
    n = feats.shape[0]
    if n < k + 1:
        raise ValueError(f"precision/recall with k={k} needs at least {k + 1} feature vectors per set, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=device)
    with _ExactHalfMatmul():
        for r0 in range(0, n, row_batch_size):
            rows = feats[r0:r0 + row_batch_size]
            best = None
            for c0 in range(0, n, col_batch_size):
                dist = pairwise_sq_distances(rows, feats[c0:c0 + col_batch_size], half=half)
                cand = dist if best is None else torch.cat([best, dist], dim=1)
                best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False, sorted=True).values
            radii[r0:r0 + len(rows)] = best[:, k]
    return radii.cpu().numpy()


def precision_recall(ref_features, sample_features, k=PR_NEIGHBOURHOOD, row_batch_size=PR_ROW_BATCH,
                     col_batch_size=PR_COL_BATCH, device=None, half=True):
    """Improved precision and recall with k-NN balls, as ADM's compute_prec_recall.

    precision = share of samples within some reference ball (squared distance <= that
    reference point's squared k-NN radius); recall = share of reference points within some
    sample ball. Reference rows are taken in row_batch_size blocks, samples in
    col_batch_size blocks, as ADM's evaluate_pr. Returns (precision, recall) as floats.
    """
    device = _default_device(device)
    ref = _features_tensor(ref_features, device)
    smp = _features_tensor(sample_features, device)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(f"feature arrays must be (N, D) with equal D, got {tuple(ref.shape)} and {tuple(smp.shape)}")
    ref_radii = torch.as_tensor(manifold_radii(ref, k, row_batch_size, col_batch_size, device, half), device=device)
    smp_radii = torch.as_tensor(manifold_radii(smp, k, row_batch_size, col_batch_size, device, half), device=device)

    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)  # -> recall
    smp_inside = torch.zeros(len(smp), dtype=torch.bool, device=device)  # -> precision
    with _ExactHalfMatmul():
        for r0 in range(0, len(ref), row_batch_size):
            r1 = min(r0 + row_batch_size, len(ref))
            for c0 in range(0, len(smp), col_batch_size):
                c1 = min(c0 + col_batch_size, len(smp))
                dist = pairwise_sq_distances(ref[r0:r1], smp[c0:c1], half=half)
                ref_inside[r0:r1] |= (dist <= smp_radii[None, c0:c1]).any(dim=1)
                smp_inside[c0:c1] |= (dist <= ref_radii[r0:r1, None]).any(dim=0)
    return float(smp_inside.double().mean()), float(ref_inside.double().mean())


# ----------------------------------------------------------------------------
# All five numbers
# ----------------------------------------------------------------------------

def compute_all(ref_pool, ref_spatial, sample_pool, sample_spatial, sample_probs,
                ref_stats=None, sample_stats=None, split_size=5000, k=PR_NEIGHBOURHOOD, device=None):
    """Inception Score, FID, sFID, precision and recall of a sample batch against a reference batch.

    ref_stats / sample_stats: optional dicts with precomputed "mu", "sigma", "mu_s",
    "sigma_s" (ADM's reference npz), used instead of the statistics of the features, as
    ADM's read_statistics does. Precision/recall always use the pool_3 features.
    """
    def stats(pool, spatial, given):
        if given is not None:
            return (given["mu"], given["sigma"]), (given["mu_s"], given["sigma_s"])
        return feature_statistics(pool), feature_statistics(spatial)

    (mu_r, sig_r), (mu_rs, sig_rs) = stats(ref_pool, ref_spatial, ref_stats)
    (mu_g, sig_g), (mu_gs, sig_gs) = stats(sample_pool, sample_spatial, sample_stats)
    precision, recall = precision_recall(ref_pool, sample_pool, k=k, device=device)
    return {
        "inception_score": inception_score(sample_probs, split_size=split_size),
        "fid": frechet_distance(mu_g, sig_g, mu_r, sig_r),
        "sfid": frechet_distance(mu_gs, sig_gs, mu_rs, sig_rs),
        "precision": precision,
        "recall": recall,
    }
