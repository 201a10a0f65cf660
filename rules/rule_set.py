"""The rule set: every Attention -> GroupQueryAttention rule, configured for one model run.

Like onnxscript's ``ort_fusions`` modules, the rules are built with ``.rule()`` (so onnxscript
calls their setup()/cleanup() around each graph) and gathered in a ``RewriteRuleSet``; what
they did is read from the ``RewriteLog`` they share, not from the rule instances.
"""

from __future__ import annotations

import dataclasses

from onnxscript.rewriter import pattern

from rewriter.rules._attention_rule import FormChooser, FormDecision, SpeedChooser
from rewriter.rules._gqa_inputs import GQAInputs
from rewriter.rules._log import RewriteLog, RuleLog
from rewriter.rules._shape_evidence import ShapeFacts
from rewriter.rules.hf_shared_attention import hf_rules
from rewriter.rules.kv_shared_attention import (
    DrafterBiasAttentionToFold,
    KVSharedAttentionToGQA,
    UnmaskedSharedAttentionToFold,
)
from rewriter.rules.nonshared_attention import NATIVE_FORM, NonSharedAttentionToGQA

__all__ = ["LAYER_CHOICES", "GQARules", "gqa_rules", "native_support_from"]

LAYER_CHOICES = ("all", "shared")


@dataclasses.dataclass(frozen=True)
class GQARules:
    """The rule set and, by kind of layer, the logs its rules write."""

    rule_set: pattern.RewriteRuleSet
    log: RewriteLog
    shared: RuleLog  # KV-shared layers in the 3-D export style (mobius)
    unmasked: RuleLog  # KV-shared layers without mask and causal flag (a drafter's full layer)
    own_cache: RuleLog | None  # layers with their own cache; None with layers="shared"
    hf: list[RuleLog]  # the Hugging Face exporters' 4-D style, every variant


def gqa_rules(
    choose_form: FormChooser,
    *,
    facts: ShapeFacts,
    layers: str = "all",
    exact_padding: bool = False,
    window_slice: bool = True,
    choose_speed: SpeedChooser | None = None,
    native_support: FormChooser | None = None,
) -> GQARules:
    """choose_form picks the form of each KV-shared layer; native_support says whether GQA
    runs a layer with its own cache (default: whenever choose_form finds a form)."""
    if layers not in LAYER_CHOICES:
        raise ValueError(f"layers must be one of {LAYER_CHOICES}, got {layers!r}")
    log = RewriteLog()
    inputs = GQAInputs(exact_padding=exact_padding)
    rules = [
        KVSharedAttentionToGQA.rule(
            choose_form,
            inputs=inputs,
            facts=facts,
            window_slice=window_slice,
            choose_speed=choose_speed,
            log=log,
        ),
        # A drafter's full layer (no mask, is_causal=0): the fold, exact at any S.
        UnmaskedSharedAttentionToFold.rule(choose_form, inputs=inputs, facts=facts, log=log),
        # A drafter's masked layer the rule above leaves: the fold with the export's bias.
        DrafterBiasAttentionToFold.rule(choose_form, inputs=inputs, facts=facts, log=log),
    ]
    if layers == "all":
        supports = native_support or native_support_from(choose_form)
        rules.append(
            NonSharedAttentionToGQA.rule(
                supports, inputs=inputs, facts=facts, choose_speed=choose_speed, log=log
            )
        )
    # Hugging Face exports (4-D Attention over repeat_kv of a cache, position masks).
    hf = hf_rules(choose_form, layers=layers, inputs=inputs, facts=facts, log=log)
    rule_set = pattern.RewriteRuleSet([*rules, *hf])
    # The caller's sweep removes what the rewrite left dead; onnxscript's would also remove
    # nodes that were dead in the input, and the rewrite must not touch anything else.
    rule_set.remove_unused_nodes = False
    return GQARules(
        rule_set,
        log,
        log.rule(KVSharedAttentionToGQA.__name__),
        log.rule(UnmaskedSharedAttentionToFold.__name__),
        log.rule(NonSharedAttentionToGQA.__name__) if layers == "all" else None,
        [log.rule(rule.name) for rule in hf],
    )


def native_support_from(choose_form: FormChooser) -> FormChooser:
    """A form chooser also decides where GQA runs at all: no form, no native layer."""

    def supports(dtype: str, head_size: int, windowed: bool) -> FormDecision:
        decision = choose_form(dtype, head_size, windowed)
        return decision if decision.form is None else FormDecision(NATIVE_FORM)

    return supports
