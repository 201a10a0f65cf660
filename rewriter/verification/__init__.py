"""Proof on ONNX Runtime that a rewritten model computes what the original computes.

Public API::

    result = verify(original, candidate, provider="cpu", seed=0, progress=print)
    result.passed, result.checks, result.original_defects, result.summary()

The oracles are described in ``_checks``; feeds come from each model's own signature
(``_feeds``); tolerances are fixed per dtype in ``_tolerance``.
"""

from __future__ import annotations

from rewriter.verification._result import (
    CheckResult,
    VerificationError,
    VerificationResult,
)
from rewriter.verification._verify import verify

__all__ = ["CheckResult", "VerificationError", "VerificationResult", "verify"]
