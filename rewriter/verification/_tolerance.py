"""Numeric comparison with dtype-aware tolerances fixed in one place.

A difference is judged relative to the scale of the reference output:
``max|actual - reference| <= RELATIVE_TOLERANCE[dtype] * max(1, max|reference|)``.
The constants are never adjusted per model: a model that needs more is a model that differs.
"""

from __future__ import annotations

import numpy as np

from rewriter.verification._result import Case
from rewriter.verification._spread import allowed_difference

__all__ = ["RELATIVE_TOLERANCE", "compare", "tolerance_for"]

# fp32: accumulation order differs between kernels (GQA vs Attention, prefill vs decode
# paths), worth a few ulps of the largest logit; 1e-4 leaves room for that and nothing more.
# fp16: a single rounding is ~5e-4 relative, and intermediate fp16 softmax/matmul results
# compound it, hence 1e-2.
RELATIVE_TOLERANCE: dict[np.dtype, float] = {
    np.dtype(np.float64): 1e-6,
    np.dtype(np.float32): 1e-4,
    np.dtype(np.float16): 1e-2,
}


def tolerance_for(reference: np.ndarray) -> float:
    """Absolute tolerance for comparing against ``reference``."""
    rtol = RELATIVE_TOLERANCE.get(reference.dtype)
    if rtol is None:
        # Integer or boolean outputs (token ids, flags) must match exactly.
        return 0.0
    finite = reference[np.isfinite(reference)]
    scale = float(np.max(np.abs(finite.astype(np.float64)))) if finite.size else 0.0
    return rtol * max(1.0, scale)


def compare(
    label: str, reference: np.ndarray, actual: np.ndarray, spread: float | None = None
) -> Case:
    """Compare two arrays of one output; any NaN/inf in either one fails the case.

    ``spread``: the reference model's own difference to itself at these feeds
    (``_spread``); the case then passes within ``max(tolerance, SPREAD_FACTOR x spread)``.
    """
    tolerance = tolerance_for(reference)
    if reference.shape != actual.shape:
        return Case(label, np.inf, tolerance, False, f"shape {actual.shape} != {reference.shape}")
    if not np.all(np.isfinite(actual)):
        return Case(label, np.inf, tolerance, False, "non-finite values (NaN/inf) in the output")
    if not np.all(np.isfinite(reference)):
        return Case(label, np.inf, tolerance, False, "non-finite values (NaN/inf) in the reference")
    if reference.size == 0:
        return Case(label, 0.0, tolerance, True)
    diff = float(np.max(np.abs(actual.astype(np.float64) - reference.astype(np.float64))))
    allowed = allowed_difference(tolerance, spread)
    return Case(label, diff, tolerance, diff <= allowed, spread=spread)
