"""The report's account of a model: every candidate layer, the padding contract, warnings.

The rules log what they rewrote, why each candidate was left alone (the reason of the rule
whose kind of layer it is, ``RewriteLog.skip_reason``) and any padding contract their
rewrites need; this collects them and adds what only the whole model shows: domains no rule
knows and the padding convention the rewritten model now follows.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir

from rewriter.report import PaddingContract, RewriteReport
from rewriter.rules import LayerSkip, RewriteLog, node_label

__all__ = ["all_nodes", "attention_nodes", "describe", "is_gqa"]

# ONNX's own domains and ONNX Runtime's (GroupQueryAttention, RotaryEmbedding); the rules
# look only at ai.onnx Attention, and a report line names any other domain as left alone.
_KNOWN_DOMAINS = frozenset(
    {"", "ai.onnx", "com.microsoft", "ai.onnx.ml", "ai.onnx.preview.training"}
)

_GQA_CACHE_WARNING = (
    "no layer of the original model used GroupQueryAttention; now every layer with its own "
    "cache does, so the model follows GroupQueryAttention's padding convention: "
    "attention_mask rows must be "
    "right-padded, and in batched decode each row's new token goes right after its valid "
    "tokens where the original appended it after the padding: GroupQueryAttention reads only "
    "each row's count of ones, so onnxruntime-genai's batched decode feed (the appended mask, "
    "e.g. [1,1,1,1,1,1,0,0,0,0,1], with position ids continuing from each row's length; genai "
    "treats only trailing pad tokens as padding) gives the original's tokens for right-padded "
    "prompts (leading pad tokens genai reads as tokens, in the original as in the rewrite); "
    "GroupQueryAttention also refuses a batched call of "
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

_EXPORT_DECODE_WARNING = (
    "no layer of the original model used GroupQueryAttention, and GroupQueryAttention honours "
    "right padding only: in prefill (GroupQueryAttention) a left-padded or "
    "holed attention_mask gives different results; every decode step keeps the export's "
    "convention (a right-padded row's new token after its padding, the folds reading the "
    "export's own mask), so batched decode after a right-padded prompt gives the original's "
    "results; use --exact-padding to keep exact semantics in prefill too"
)


def describe(
    report: RewriteReport,
    model: ir.Model,
    candidates: list[ir.Node],
    log: RewriteLog,
    *,
    had_gqa: bool,
    exact_padding: bool,
) -> None:
    """Fill the report's skips, padding contract and warnings once the rules have run.

    candidates: the ai.onnx Attention nodes of the model before the rewrite; log: what the
    rules wrote.
    """
    unknown = _unknown_domains(model)
    if unknown:
        report.warnings.append(
            "left alone, the rules do not know these domains: " + ", ".join(unknown)
        )
    rewritten = {r.node for r in report.rewrites}
    report.skipped = [
        LayerSkip(node_label(node), log.skip_reason(node))
        for node in candidates
        if node_label(node) not in rewritten
    ]
    if not report.rewrites:
        return
    report.padding_contract = _padding_contract(had_gqa, exact_padding)
    if all(r.mask_style in ("none", "export") for r in report.rewrites):
        # Only a drafter's folds: without mask or with the export's own bias, they read
        # attention_mask as the export does, so no padding convention changed.
        report.padding_contract = PaddingContract.UNCHANGED
        return
    if log.padding_contract is not None:
        report.padding_contract = log.padding_contract.contract
        report.warnings.append(log.padding_contract.warning)
    elif report.padding_contract == PaddingContract.RIGHT_PADDING_ONLY:
        # A KV-shared layer's decode fold is an Attention without a cache of its own: it reads
        # the borrowed cache as the GQA layer that owns it wrote it.
        all_converted = not any(_owns_cache(node) for node in attention_nodes(model))
        if all(r.decode_convention == "export" for r in report.rewrites):
            report.warnings.append(_EXPORT_DECODE_WARNING)
        else:
            report.warnings.append(_GQA_CACHE_WARNING if all_converted else _RIGHT_PADDING_WARNING)


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Nodes of the main graph, its subgraphs and the model-local functions."""
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def attention_nodes(model: ir.Model) -> list[ir.Node]:
    return [
        node
        for node in all_nodes(model)
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx")
    ]


def _owns_cache(attention: ir.Node) -> bool:
    """An ONNX Attention with past inputs or read present outputs (inputs 4-5, outputs 1-2)."""
    past = any(value is not None for value in attention.inputs[4:6])
    return past or any(
        value is not None and (value.is_graph_output() or bool(list(value.uses())))
        for value in attention.outputs[1:3]
    )


def is_gqa(node: ir.Node) -> bool:
    return node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft"


def _unknown_domains(model: ir.Model) -> list[str]:
    """Imported domains that are neither ONNX, ONNX Runtime's nor a model-local function's."""
    local = {function.domain for function in model.functions.values()}
    return [
        f"{domain} (opset {version})"
        for domain, version in sorted(model.opset_imports.items())
        if domain not in _KNOWN_DOMAINS and domain not in local
    ]


def _padding_contract(had_gqa: bool, exact_padding: bool) -> str:
    if exact_padding:
        return PaddingContract.EXACT
    # The model's own GQA layers already read attention_mask as right padding.
    return PaddingContract.UNCHANGED if had_gqa else PaddingContract.RIGHT_PADDING_ONLY
