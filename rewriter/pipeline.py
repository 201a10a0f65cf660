"""load -> rules -> cleanup -> report: the rewrite as a library pass.

    model, report = rewriter.rewrite(model)

An ``onnx_ir.Model`` is rewritten in place and returned (like an onnx-ir pass); an
``onnx.ModelProto`` is left untouched and a new ``ModelProto`` is returned.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime
from onnxscript.rewriter import pattern

from rewriter import __version__
from rewriter._cleanup import remove_dead_producers
from rewriter.forms import ProbedFormChooser
from rewriter.report import PaddingContract, RewriteReport
from rewriter.rules import (
    FormChooser,
    FormDecision,
    GQAInputs,
    KVSharedAttentionToGQA,
    LayerSkip,
    NonSharedAttentionToGQA,
    node_label,
)
from rewriter.rules._attention_rule import AttentionToGQARule
from rewriter.rules._shape_evidence import ShapeFacts
from rewriter.rules.hf_shared_attention import hf_padding_contract, hf_rules, refine_skips
from rewriter.rules.nonshared_attention import NATIVE_FORM, always_native
from rewriter.speed import SPEED_CHOICES, SpeedProbe

__all__ = ["METADATA_PREFIX", "rewrite"]

METADATA_PREFIX = "kvshare_gqa_rewriter."

# ONNX's own domains and ONNX Runtime's (GroupQueryAttention, RotaryEmbedding); the rules
# look only at ai.onnx Attention, and a report line names any other domain as left alone.
_KNOWN_DOMAINS = frozenset(
    {"", "ai.onnx", "com.microsoft", "ai.onnx.ml", "ai.onnx.preview.training"}
)

ModelT = TypeVar("ModelT", ir.Model, onnx.ModelProto)

_GQA_CACHE_WARNING = (
    "no layer of the original model used GroupQueryAttention; now every layer does, so the "
    "model follows GroupQueryAttention's padding convention: attention_mask rows must be "
    "right-padded, and in batched decode each row's new token goes right after its valid "
    "tokens (a prefix mask, as onnxruntime-genai feeds GQA models) where the original "
    "appended it after the padding; GroupQueryAttention also refuses a batched call of "
    "several tokens after a past (batch 1 only there); use --exact-padding to keep the "
    "original semantics and cache layout"
)

_RIGHT_PADDING_WARNING = (
    "no layer of the original model used GroupQueryAttention, and GroupQueryAttention honours "
    "right padding only: the rewritten model gives different results for left-padded or "
    "holed attention_mask rows, which in this model includes batched decode after a "
    "right-padded prompt (its Attention caches append after the padding); use "
    "--exact-padding to keep exact semantics"
)


LAYER_CHOICES = ("all", "shared")


def rewrite(
    model: ModelT,
    *,
    layers: str = "all",
    form: str = "auto",
    provider: str = "cpu",
    force: bool = False,
    exact_padding: bool = False,
    window_slice: bool = True,
    speed: str = "off",
    choose_form: FormChooser | None = None,
) -> tuple[ModelT, RewriteReport]:
    """Rewrite the Attention layers of `model` into GroupQueryAttention.

    layers: "all" (default) rewrites KV-shared layers and layers with their own cache;
        "shared" only the KV-shared ones.
    form: "auto" picks, per KV-shared layer, the best form the probe found correct on
        `provider`; a form name forces it (FormRejectedError if the probe rejects it,
        unless `force`).
    exact_padding: pass the mask as attention_bias so any padding keeps its meaning.
    window_slice: sliding KV-shared layers read only the keys their window reaches (the
        borrowed cache sliced once per source and step; CPU GQA reads every key it gets).
    speed: "off" (default) rewrites every layer that qualifies; "auto" (experimental, see
        rewriter.speed for its known limit) times each KV-shared layer kind on `provider`
        and keeps the export's layer where it is correct and GroupQueryAttention is slower.
        Only with form="auto" and no `choose_form`.
    choose_form: replaces the probe (tests, or exporters that know their runtime).
    """
    if isinstance(model, onnx.ModelProto):
        ir_model, report = rewrite(
            ir.from_proto(model),
            layers=layers,
            form=form,
            provider=provider,
            force=force,
            exact_padding=exact_padding,
            window_slice=window_slice,
            speed=speed,
            choose_form=choose_form,
        )
        return ir.to_proto(ir_model), report
    if not isinstance(model, ir.Model):
        raise TypeError(f"expected onnx_ir.Model or onnx.ModelProto, got {type(model).__name__}")
    if layers not in LAYER_CHOICES:
        raise ValueError(f"layers must be one of {LAYER_CHOICES}, got {layers!r}")
    if speed not in SPEED_CHOICES:
        raise ValueError(f"speed must be one of {SPEED_CHOICES}, got {speed!r}")

    report = RewriteReport(tool_version=__version__, form_request=form, layers=layers)
    attention_nodes = _attention_nodes(model)
    had_gqa = any(_is_gqa(n) for n in _all_nodes(model))

    probed = ProbedFormChooser(provider, form, force) if choose_form is None else None
    gqa_inputs = GQAInputs(exact_padding=exact_padding)
    # Inferred once, before any rewrite changes the graph the inference would see.
    facts = ShapeFacts.infer(model)
    timed = SpeedProbe(provider) if speed == "auto" and probed is not None else None
    shared_rule = KVSharedAttentionToGQA(
        choose_form or probed,
        inputs=gqa_inputs,
        facts=facts,
        window_slice=window_slice,
        keep_export=timed.keep_export if timed is not None and form == "auto" else None,
    )
    rules: list[AttentionToGQARule] = [shared_rule]
    if layers == "all":
        supports = probed.native_support if probed is not None else _native_from(choose_form)
        rules.append(NonSharedAttentionToGQA(supports, inputs=gqa_inputs, facts=facts))
    # Hugging Face exports (4-D Attention over repeat_kv of a cache, position masks).
    hf = hf_rules(choose_form or probed, layers=layers, inputs=gqa_inputs)
    all_rules = [*rules, *hf]
    rule_set = pattern.RewriteRuleSet([_as_rule(rule) for rule in all_rules])
    # Our own sweep removes what the rewrite left dead; onnxscript's would also remove nodes
    # that were dead in the input, and the rewrite must not touch anything else.
    rule_set.remove_unused_nodes = False
    rule_set.apply_to_model(model)
    for rule in hf:
        rule.redirect_caches()
    report.nodes_removed = remove_dead_producers(
        [node for rule in all_rules for node in rule.replaced_nodes]
    )
    # Readers of a rewritten layer keep seeing the same value names as in the input.
    for rule in all_rules:
        for gqa_output, name in rule.renames:
            gqa_output.name = name
    common_passes.TopologicalSortPass()(model)

    report.rewrites = [r for rule in all_rules for r in rule.rewrites]
    unknown = _unknown_domains(model)
    if unknown:
        report.warnings.append(
            "left alone, the rules do not know these domains: " + ", ".join(unknown)
        )
    report.skipped = refine_skips(
        _skips(attention_nodes, {r.node for r in report.rewrites}, rules), hf
    )
    if report.rewrites:
        report.padding_contract = _padding_contract(had_gqa, exact_padding)
        hf_contract = hf_padding_contract(report.rewrites)
        if hf_contract is not None:
            report.padding_contract, warning = hf_contract
            report.warnings.append(warning)
        elif report.padding_contract == PaddingContract.RIGHT_PADDING_ONLY:
            all_converted = not _attention_nodes(model)
            report.warnings.append(_GQA_CACHE_WARNING if all_converted else _RIGHT_PADDING_WARNING)
    if timed is not None:
        report.speed = {"provider": provider, "layers": timed.tables()}
    if probed is not None:
        report.probe = {"provider": provider, "tables": probed.probe_tables()}
        report.forced = probed.forced_layers > 0
        if report.forced:
            report.warnings.append(
                f"--force: {probed.forced_layers} layer(s) use form {form}, which the probe "
                "rejected on this runtime"
            )
    _record_metadata(model, report)
    return model, report


def _native_from(choose_form: FormChooser | None) -> FormChooser:
    """A caller's chooser also decides where GQA runs at all: no form, no native layer."""
    if choose_form is None:
        return always_native

    def supports(dtype: str, head_size: int, windowed: bool) -> FormDecision:
        decision = choose_form(dtype, head_size, windowed)
        return decision if decision.form is None else FormDecision(NATIVE_FORM)

    return supports


def _skips(
    attention_nodes: list[ir.Node],
    rewritten: set[str],
    rules: list[AttentionToGQARule],
) -> list[LayerSkip]:
    """One reason per candidate left alone: from the rule whose kind of layer it is."""
    shared_rule = rules[0]
    nonshared_rule = rules[1] if len(rules) > 1 else None
    skipped = []
    for node in attention_nodes:
        label = node_label(node)
        if label in rewritten:
            continue
        has_past = any(v is not None for v in node.inputs[4:6])
        if has_past and nonshared_rule is None:
            reason = "a layer with its own cache (past inputs); --layers shared leaves it"
        elif has_past:
            reason = nonshared_rule.skips.get(label, LayerSkip(label, _NO_FORM)).reason
        else:
            reason = shared_rule.skips.get(label, LayerSkip(label, _NO_FORM)).reason
        skipped.append(LayerSkip(label, reason))
    return skipped


_NO_FORM = "does not have the Attention(q, k, v, mask[, past_key, past_value]) form"


def _as_rule(rule: AttentionToGQARule) -> pattern.RewriteRule:
    """A RewriteRule bound to this instance, so its report lists stay reachable."""
    return pattern.RewriteRule(
        rule.pattern,
        rule.rewrite,
        rule.check,
        name=rule.name,
        remove_nodes=rule.remove_nodes,
    )


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Nodes of the main graph, its subgraphs and the model-local functions."""
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def _attention_nodes(model: ir.Model) -> list[ir.Node]:
    return [
        node
        for node in _all_nodes(model)
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx")
    ]


def _unknown_domains(model: ir.Model) -> list[str]:
    """Imported domains that are neither ONNX, ONNX Runtime's nor a model-local function's."""
    local = {function.domain for function in model.functions.values()}
    return [
        f"{domain} (opset {version})"
        for domain, version in sorted(model.opset_imports.items())
        if domain not in _KNOWN_DOMAINS and domain not in local
    ]


def _is_gqa(node: ir.Node) -> bool:
    return node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft"


def _padding_contract(had_gqa: bool, exact_padding: bool) -> str:
    if exact_padding:
        return PaddingContract.EXACT
    # The model's own GQA layers already read attention_mask as right padding.
    return PaddingContract.UNCHANGED if had_gqa else PaddingContract.RIGHT_PADDING_ONLY


def _record_metadata(model: ir.Model, report: RewriteReport) -> None:
    if not report.rewrites and METADATA_PREFIX + "rewrites" in model.metadata_props:
        # A pass over an already rewritten model that changes nothing keeps the first pass's
        # record: its padding contract still holds, and the verifier reads it.
        return
    model.metadata_props[METADATA_PREFIX + "version"] = __version__
    model.metadata_props[METADATA_PREFIX + "rewrites"] = str(report.rewritten)
    forms = sorted({r.form for r in report.rewrites})
    if forms:
        model.metadata_props[METADATA_PREFIX + "forms"] = ",".join(forms)
    model.metadata_props[METADATA_PREFIX + "padding_contract"] = report.padding_contract
    if report.probe is not None:
        model.metadata_props[METADATA_PREFIX + "probed_on"] = (
            f"onnxruntime {onnxruntime.__version__}, provider {report.probe['provider']}"
        )
    if report.forced:
        model.metadata_props[METADATA_PREFIX + "forced"] = "true"
