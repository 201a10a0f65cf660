"""Pattern-rewrite rules (installed as ``rewriter.rules``).

One module per rewrite; each exposes a ``RewriteRuleClassBase`` whose ``check()`` records
in a shared ``RewriteLog`` why a candidate was not rewritten, so the report accounts for
every candidate layer. The rules read each layer's form and speed choice from a
``LayerDecisions`` table decided before they run (``rule_set.survey`` lists its questions);
``gqa_rules()`` builds the rule set. Depends on onnxscript and onnx-ir only.
"""

from __future__ import annotations

from rewriter.rules._attention_rule import GQA_DTYPES
from rewriter.rules._decisions import (
    FormChooser,
    FormDecision,
    FormQuestion,
    LayerDecisions,
    LayerKind,
    SpeedChooser,
    always_past,
    native_support_from,
)
from rewriter.rules._gqa_inputs import GQAInputs
from rewriter.rules._log import LayerRewrite, LayerSkip, RewriteLog, RuleLog, node_label
from rewriter.rules._padding_contract import PaddingContract
from rewriter.rules._speed_choice import DEFECTIVE_EXPORT_REASON, PHASE_FORMS, SpeedChoice
from rewriter.rules.kv_shared_attention import KVSharedAttentionToGQA
from rewriter.rules.nonshared_attention import NonSharedAttentionToGQA
from rewriter.rules.rule_set import GQARules, gqa_rules

__all__ = [
    "DEFECTIVE_EXPORT_REASON",
    "GQA_DTYPES",
    "PHASE_FORMS",
    "FormChooser",
    "FormDecision",
    "FormQuestion",
    "GQAInputs",
    "GQARules",
    "KVSharedAttentionToGQA",
    "LayerDecisions",
    "LayerKind",
    "LayerRewrite",
    "LayerSkip",
    "NonSharedAttentionToGQA",
    "PaddingContract",
    "RewriteLog",
    "RuleLog",
    "SpeedChoice",
    "SpeedChooser",
    "always_past",
    "gqa_rules",
    "native_support_from",
    "node_label",
]
