"""The rule set: every Attention -> GroupQueryAttention rule, configured for one model run.

Like onnxscript's ``ort_fusions`` modules, the rules are built with ``.rule()`` (so onnxscript
calls their setup()/cleanup() around each graph) and gathered in a ``RewriteRuleSet``; what
they did is read from the ``RewriteLog`` they share, not from the rule instances. They read
each layer's form and speed choice from one ``LayerDecisions`` table; ``survey`` lists what
that table must answer before they rewrite.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnxscript.rewriter import pattern

from rewriter.rules._attention_rule import NO_FORM_REASON
from rewriter.rules._decisions import LayerDecisions, Question
from rewriter.rules._gqa_inputs import GQAInputs
from rewriter.rules._log import RewriteLog, RuleLog, SkipOwner
from rewriter.rules._shape_evidence import ShapeFacts
from rewriter.rules.hf_attention import hf_rules
from rewriter.rules.kv_shared_attention import (
    NON_CAUSAL_REASON,
    DrafterBiasAttentionToFold,
    KVSharedAttentionToGQA,
    UnmaskedSharedAttentionToFold,
    unmasked_non_causal,
)
from rewriter.rules.nonshared_attention import (
    LAYERS_SHARED_REASON,
    NonSharedAttentionToGQA,
    owns_cache_input,
)

__all__ = ["LAYER_CHOICES", "GQARules", "gqa_rules", "survey"]

LAYER_CHOICES = ("all", "shared")


@dataclasses.dataclass(frozen=True)
class GQARules:
    """The rule set and the log its rules write."""

    rule_set: pattern.RewriteRuleSet
    log: RewriteLog


def gqa_rules(
    decisions: LayerDecisions,
    *,
    facts: ShapeFacts,
    layers: str = "all",
    exact_padding: bool = False,
    window_slice: bool = True,
) -> GQARules:
    """The rules for one model run, reading forms and speed choices from `decisions`."""
    if layers not in LAYER_CHOICES:
        raise ValueError(f"layers must be one of {LAYER_CHOICES}, got {layers!r}")
    log = RewriteLog()
    inputs = GQAInputs(exact_padding=exact_padding)
    shared = {"inputs": inputs, "facts": facts, "log": log, "decisions": decisions}
    rules = [
        KVSharedAttentionToGQA.rule(window_slice=window_slice, **shared),
        # A drafter's full layer (no mask, is_causal=0): the fold, exact at any S.
        UnmaskedSharedAttentionToFold.rule(**shared),
        # A drafter's masked layer the rule above leaves: the fold with the export's bias.
        DrafterBiasAttentionToFold.rule(**shared),
    ]
    if layers == "all":
        rules.append(NonSharedAttentionToGQA.rule(**shared))
    # Hugging Face exports (4-D Attention over repeat_kv of a cache, position masks).
    hf = hf_rules(layers=layers, **shared)
    rule_set = pattern.RewriteRuleSet([*rules, *hf])
    # The caller's sweep removes what the rewrite left dead; onnxscript's would also remove
    # nodes that were dead in the input, and the rewrite must not touch anything else.
    rule_set.remove_unused_nodes = False
    own_cache = log.rule(NonSharedAttentionToGQA.__name__) if layers == "all" else RuleLog()
    kv_shared = log.rule(KVSharedAttentionToGQA.__name__)
    log.skip_owners = [
        # The HF rules' pattern (4-D inputs, output Reshape) matched: their reason says more.
        *(SkipOwner(log.rule(rule.name)) for rule in hf),
        SkipOwner(
            own_cache,
            owns_cache_input,
            NO_FORM_REASON if layers == "all" else LAYERS_SHARED_REASON,
        ),
        SkipOwner(kv_shared),
        SkipOwner(
            log.rule(UnmaskedSharedAttentionToFold.__name__),
            unmasked_non_causal,
            NON_CAUSAL_REASON,
        ),
        SkipOwner(kv_shared, lambda _: True, NO_FORM_REASON),
    ]
    return GQARules(rule_set, log)


def survey(
    model: ir.Model,
    decisions: LayerDecisions,
    *,
    facts: ShapeFacts,
    layers: str = "all",
    exact_padding: bool = False,
    window_slice: bool = True,
) -> list[Question]:
    """What the rules ask of `decisions` and find no answer to, in the order they ask, for
    `model`, which is left as it is: every rule reads its layers and rewrites none."""
    decisions.surveying = True
    decisions.unanswered.clear()
    try:
        rules = gqa_rules(
            decisions,
            facts=facts,
            layers=layers,
            exact_padding=exact_padding,
            window_slice=window_slice,
        )
        rules.rule_set.apply_to_model(model)
    finally:
        decisions.surveying = False
    unanswered = list(decisions.unanswered)
    decisions.unanswered.clear()
    return unanswered
