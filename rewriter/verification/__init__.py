"""Proof on ONNX Runtime that a rewritten model computes what the original computes.

Public API::

    result = verify(original, candidate, provider="cpu", seed=0, progress=print)
    result.passed, result.checks, result.defects, result.gates, result.summary()

The verdict judges the rewrite: a check the original fails is the original's defect (with
whether the rewrite fixed it), not a failure of the candidate.

The oracles are described in ``_checks``; feeds come from each model's own signature
(``_feeds``); tolerances are fixed per dtype in ``_tolerance``.
"""

from __future__ import annotations

from rewriter.verification._result import (
    CheckResult,
    OriginalDefect,
    VerificationError,
    VerificationResult,
)
from rewriter.verification._verify import verify

__all__ = [
    "CheckResult",
    "OriginalDefect",
    "VerificationError",
    "VerificationResult",
    "verify",
]
