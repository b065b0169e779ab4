"""ADM evaluation suite (FID, sFID, Inception Score, precision, recall) without TensorFlow.

`metrics` holds the math on feature arrays, `inception` the 2015-12-05 Inception-v3
features (torch-fidelity's TF-compatible port), `evaluator` the command line
(`python evaluator/evaluator.py REF.npz SAMPLE.npz`). See docs/evaluation.md.
"""
from errors import UserError


class EvaluatorError(UserError, RuntimeError):
    """A problem the user can fix (a path, a file's format, missing weights); the CLI prints it and exits 2."""


from .metrics import (  # noqa: E402  (EvaluatorError first: submodules import it from here)
    compute_all,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
    softmax,
)

__all__ = [
    "EvaluatorError",
    "compute_all",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "precision_recall",
    "softmax",
]
