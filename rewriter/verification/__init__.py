"""Proof on ONNX Runtime that a rewritten model computes what the original computes.

Public API::

    result = verify(original, candidate, provider="cpu", seed=0, progress=print, mode="auto")
    result.passed, result.layers, result.graph_diff, result.model, result.checks,
    result.defects, result.layer_defects, result.gates, result.summary(), result.to_dict()

    result = verify_pair((prefill, decode), (prefill2, decode2))  # exports in two graphs
    result.passed, result.checks, result.summary()

The verdict judges the rewrite: a check the original fails is the original's defect (with
whether the rewrite fixed it), not a failure of the candidate.

``mode`` (``_modes``): ``layers`` proves each rewritten layer on its own against a float64
reference (``_layer_proofs``) and diffs the graph outside the layers (``_graph_diff``);
``model`` runs the whole-model oracles (``_checks``; feeds from each model's own signature,
``_feeds``); ``all`` both; ``auto`` layers, and the whole model where its estimated memory
fits. Tolerances are fixed per dtype in ``_tolerance``. ``verify_pair`` (``_pair``) checks
an export that comes as separate prefill and decode graphs (transformers exporter).
"""

from __future__ import annotations

from rewriter.verification._layer_proofs import LayerProof
from rewriter.verification._modes import MODES, MemoryEstimate, estimate_model_memory, verify
from rewriter.verification._pair import PairCheck, PairResult, verify_pair
from rewriter.verification._result import (
    CheckResult,
    OriginalDefect,
    VerificationError,
    VerificationResult,
)

__all__ = [
    "MODES",
    "CheckResult",
    "LayerProof",
    "MemoryEstimate",
    "OriginalDefect",
    "PairCheck",
    "PairResult",
    "VerificationError",
    "VerificationResult",
    "estimate_model_memory",
    "verify",
    "verify_pair",
]
