"""Pattern-rewrite rules (installed as ``rewriter.rules``).

One module per rewrite; each exposes a ``RewriteRuleClassBase`` whose ``check()`` records
why a candidate was not rewritten, so the pipeline can report every candidate layer.
"""

from __future__ import annotations

from rewriter.rules.kv_shared_attention import (
    GQA_DTYPES,
    FormChooser,
    FormDecision,
    KVSharedAttentionToGQA,
    LayerRewrite,
    LayerSkip,
    always_past,
)

__all__ = [
    "GQA_DTYPES",
    "FormChooser",
    "FormDecision",
    "KVSharedAttentionToGQA",
    "LayerRewrite",
    "LayerSkip",
    "always_past",
]
