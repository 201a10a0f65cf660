"""load -> rules -> cleanup -> report: the rewrite as a library pass.

    model, report = rewriter.rewrite(model)

An ``onnx_ir.Model`` is rewritten in place and returned (like an onnx-ir pass); an
``onnx.ModelProto`` is left untouched and a new ``ModelProto`` is returned.
"""

from __future__ import annotations

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
from rewriter.rules import FormChooser, KVSharedAttentionToGQA, LayerSkip, node_label

__all__ = ["METADATA_PREFIX", "rewrite"]

METADATA_PREFIX = "kvshare_gqa_rewriter."

ModelT = TypeVar("ModelT", ir.Model, onnx.ModelProto)

_RIGHT_PADDING_WARNING = (
    "no layer of the original model used GroupQueryAttention, and GroupQueryAttention honours "
    "right padding only: the rewritten model gives different results for left-padded or "
    "holed attention_mask rows, which in this model includes batched decode after a "
    "right-padded prompt (its Attention caches append after the padding); use "
    "--exact-padding to keep exact semantics"
)


def rewrite(
    model: ModelT,
    *,
    form: str = "auto",
    provider: str = "cpu",
    force: bool = False,
    exact_padding: bool = False,
    choose_form: FormChooser | None = None,
) -> tuple[ModelT, RewriteReport]:
    """Rewrite every KV-shared Attention layer of `model` into GroupQueryAttention.

    form: "auto" picks, per layer, the best form the probe found correct on `provider`;
        a form name forces it (FormRejectedError if the probe rejects it, unless `force`).
    exact_padding: pass the mask as attention_bias so any padding keeps its meaning.
    choose_form: replaces the probe (tests, or exporters that know their runtime).
    """
    if isinstance(model, onnx.ModelProto):
        ir_model, report = rewrite(
            ir.from_proto(model),
            form=form,
            provider=provider,
            force=force,
            exact_padding=exact_padding,
            choose_form=choose_form,
        )
        return ir.to_proto(ir_model), report
    if not isinstance(model, ir.Model):
        raise TypeError(f"expected onnx_ir.Model or onnx.ModelProto, got {type(model).__name__}")

    report = RewriteReport(tool_version=__version__, form_request=form)
    candidates = [node_label(n) for n in _attention_nodes(model)]
    had_gqa = any(_is_gqa(n) for n in ir.traversal.RecursiveGraphIterator(model.graph))

    chooser = choose_form or ProbedFormChooser(provider, form, force)
    rule = KVSharedAttentionToGQA(chooser, exact_padding=exact_padding)
    rule_set = pattern.RewriteRuleSet([_as_rule(rule)])
    # Our own sweep removes what the rewrite left dead; onnxscript's would also remove nodes
    # that were dead in the input, and the rewrite must not touch anything else.
    rule_set.remove_unused_nodes = False
    rule_set.apply_to_model(model)
    report.nodes_removed = remove_dead_producers(rule.replaced_nodes)
    # Readers of a rewritten layer keep seeing the same value name as in the input.
    for gqa_output, name in rule.renames:
        gqa_output.name = name
    common_passes.TopologicalSortPass()(model)

    report.rewrites = list(rule.rewrites)
    done = {r.node for r in report.rewrites}
    report.skipped = [
        rule.skips.get(label, LayerSkip(label, "does not have the Attention(q, k, v, mask) form"))
        for label in candidates
        if label not in done
    ]
    if report.rewrites:
        report.padding_contract = _padding_contract(had_gqa, exact_padding)
        if report.padding_contract == PaddingContract.RIGHT_PADDING_ONLY:
            report.warnings.append(_RIGHT_PADDING_WARNING)
    if isinstance(chooser, ProbedFormChooser):
        report.probe = {"provider": provider, "tables": chooser.probe_tables()}
        report.forced = chooser.forced_layers > 0
        if report.forced:
            report.warnings.append(
                f"--force: {chooser.forced_layers} layer(s) use form {form}, which the probe "
                "rejected on this runtime"
            )
    _record_metadata(model, report)
    return model, report


def _as_rule(rule: KVSharedAttentionToGQA) -> pattern.RewriteRule:
    """A RewriteRule bound to this instance, so its report lists stay reachable."""
    return pattern.RewriteRule(
        rule.pattern,
        rule.rewrite,
        rule.check,
        name=rule.name,
        remove_nodes=rule.remove_nodes,
    )


def _attention_nodes(model: ir.Model) -> list[ir.Node]:
    return [
        node
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx")
    ]


def _is_gqa(node: ir.Node) -> bool:
    return node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft"


def _padding_contract(had_gqa: bool, exact_padding: bool) -> str:
    if exact_padding:
        return PaddingContract.EXACT
    # The model's own GQA layers already read attention_mask as right padding.
    return PaddingContract.UNCHANGED if had_gqa else PaddingContract.RIGHT_PADDING_ONLY


def _record_metadata(model: ir.Model, report: RewriteReport) -> None:
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
