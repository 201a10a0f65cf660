"""Pattern-rewrite rules (installed as ``rewriter.rules``).

One module per rewrite; each exposes a ``RewriteRuleClassBase`` whose ``check()`` records
why a candidate was not rewritten, so the pipeline can report every candidate layer.
"""

from __future__ import annotations

from rewriter.rules._attention_rule import (
    GQA_DTYPES,
    ExportKeeper,
    FormChooser,
    FormDecision,
    LayerKind,
    LayerRewrite,
    LayerSkip,
    always_past,
    node_label,
)
from rewriter.rules._gqa_inputs import GQAInputs
from rewriter.rules.kv_shared_attention import KVSharedAttentionToGQA
from rewriter.rules.nonshared_attention import NonSharedAttentionToGQA

__all__ = [
    "GQA_DTYPES",
    "ExportKeeper",
    "FormChooser",
    "FormDecision",
    "GQAInputs",
    "KVSharedAttentionToGQA",
    "LayerKind",
    "LayerRewrite",
    "LayerSkip",
    "NonSharedAttentionToGQA",
    "always_past",
    "node_label",
]
