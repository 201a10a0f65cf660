"""What every Attention -> GroupQueryAttention rule shares: facts read off the Attention
node, the report records, and emitting the GQA node.

Dimension letters: B batch, S query length, T total length, N query heads, Nkv KV heads,
D head size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from rewriter.rules._decisions import (
    FormChooser,
    FormDecision,
    FormQuestion,
    LayerDecisions,
    LayerKind,
    SpeedChooser,
    always_past,
)
from rewriter.rules._failure import MatchFailureError
from rewriter.rules._gqa_inputs import GQAInputs
from rewriter.rules._log import LayerRewrite, LayerSkip, RewriteLog, node_label
from rewriter.rules._mask_patterns import MaskForm
from rewriter.rules._naming import name_after
from rewriter.rules._shape_evidence import HeadSizeEvidence, ShapeFacts
from rewriter.rules._speed_choice import SPEED_FORM_KEY

__all__ = [
    "GQA_DTYPES",
    "NO_FORM_REASON",
    "AttentionHeads",
    "AttentionToGQARule",
    "FormChooser",
    "FormDecision",
    "FormQuestion",
    "LayerDecisions",
    "LayerKind",
    "LayerRewrite",
    "LayerSkip",
    "SpeedChooser",
    "always_past",
    "check_opset",
    "dtype_name",
    "infer_head_size",
    "layer_kind",
    "layer_kind_of",
    "node_label",
    "read_heads",
]

# Why a candidate no rule's pattern reached was left alone.
NO_FORM_REASON = "does not have the Attention(q, k, v, mask[, past_key, past_value]) form"

# GroupQueryAttention kernels exist for these (CPU: fp32/fp16; CUDA: fp16/bf16). Which of
# them a provider runs is the probe's business; anything else is never rewritten.
GQA_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


@dataclasses.dataclass(frozen=True)
class AttentionHeads:
    num_heads: int
    kv_num_heads: int
    scale: float | None  # None: the op default 1/sqrt(D), made explicit once D is known
    softcap: float

    def explicit_scale(self, head_size: int) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(head_size)

    def fold_options(self, head_size: int, dtype: ir.DataType) -> dict[str, Any]:
        """What every fold form of rules._speed_choice takes besides its values: head counts,
        D, the explicit scale, the softcap and the dtype (which picks the product's ops)."""
        return {
            "dtype": dtype,
            "num_heads": self.num_heads,
            "kv_num_heads": self.kv_num_heads,
            "head_size": head_size,
            "scale": self.explicit_scale(head_size),
            "softcap": self.softcap,
        }


def layer_kind_of(
    dtype: ir.DataType,
    heads: AttentionHeads,
    head_size: int,
    mask: MaskForm,
    *,
    own_cache: bool = False,
    export_correct: bool = True,
) -> LayerKind:
    """What a layer's speed depends on, from what a rule read off it."""
    return LayerKind(
        dtype_name(dtype),
        heads.num_heads,
        heads.kv_num_heads,
        head_size,
        mask.local_window_size,
        heads.explicit_scale(head_size),
        heads.softcap,
        own_cache=own_cache,
        export_correct=export_correct,
    )


def dtype_name(dtype: ir.DataType) -> str:
    """NumPy spelling (float32, float16, bfloat16), as the probe and the report use."""
    return np.dtype(dtype.numpy()).name


def layer_kind(mask: MaskForm) -> str:
    return "full" if mask.local_window_size is None else "sliding"


def check_opset(context, attention: ir.Node) -> None:
    opset = context.model.opset_imports.get("", 0)
    if opset not in (23, 24):
        raise MatchFailureError(
            f"ai.onnx opset {opset}: the rules know Attention of opsets 23 and 24", attention
        )


def read_heads(context, attention: ir.Node) -> AttentionHeads:
    """Attributes every rewrite needs (MatchFailureError: why the node cannot be rewritten)."""
    check_opset(context, attention)
    attrs = attention.attributes
    num_heads = attrs.get_int("q_num_heads", 0)
    kv_num_heads = attrs.get_int("kv_num_heads", 0)
    if "q_num_heads" not in attrs or "kv_num_heads" not in attrs:
        raise MatchFailureError(
            "q_num_heads/kv_num_heads missing (needed for 3-D inputs)", attention
        )
    if num_heads <= 0 or kv_num_heads <= 0:
        raise MatchFailureError(
            f"q_num_heads={num_heads}, kv_num_heads={kv_num_heads}: head counts must be positive",
            attention,
        )
    if num_heads % kv_num_heads:
        raise MatchFailureError(
            f"q_num_heads {num_heads} is not a multiple of kv_num_heads {kv_num_heads}", attention
        )
    if len(attention.outputs) > 3 and (
        attention.outputs[3].uses() or attention.outputs[3].is_graph_output()
    ):
        raise MatchFailureError("qk_matmul_output is used", attention.outputs[3])
    scale = attrs.get("scale")
    return AttentionHeads(
        num_heads,
        kv_num_heads,
        scale.as_float() if scale is not None else None,
        attrs.get_float("softcap", 0.0),
    )


def infer_head_size(
    facts: ShapeFacts,
    caches_BNSH: tuple[ir.Value, ir.Value],
    projection_BSD: ir.Value,
    projection_heads: int,
    heads: AttentionHeads,
    *,
    cache_kind: str,
    projection_kind: str,
    more_evidence: tuple[HeadSizeEvidence, ...] = (),
) -> int:
    """D, agreed on by every static source: the caches' last dim (annotated or inferred), the
    past input and new key/value of the layer that writes them, a 3-D projection's last dim
    over its head count, and `more_evidence` (MatchFailureError: why it cannot be known)."""
    evidence = list(more_evidence)
    for cache in caches_BNSH:
        rank = facts.rank(cache)
        if rank is not None and rank != 4:
            raise MatchFailureError(f"{cache_kind} {cache.name} is not 4-D BNSH", cache)
        for cache_heads in facts.static_dims(cache, 1):
            if cache_heads != heads.kv_num_heads:
                raise MatchFailureError(
                    f"{cache_kind} has {cache_heads} heads, kv_num_heads={heads.kv_num_heads}",
                    cache,
                )
        writer_heads = facts.writer_kv_heads(cache)
        if writer_heads is not None and writer_heads != heads.kv_num_heads:
            raise MatchFailureError(
                f"{cache_kind} {cache.name} is written with kv_num_heads={writer_heads}, "
                f"read with kv_num_heads={heads.kv_num_heads}",
                cache,
            )
        evidence += facts.cache_head_sizes(cache, cache_kind)
    for shape in facts.shapes(projection_BSD):
        if shape.rank() != 3 or not isinstance(width := shape[2], int):
            continue
        if width % projection_heads:
            raise MatchFailureError(
                f"{projection_kind} width {width} is not a multiple of {projection_heads} heads",
                projection_BSD,
            )
        evidence.append(
            HeadSizeEvidence(
                width // projection_heads,
                f"{projection_kind} {projection_BSD.name} ({width}/{projection_heads})",
            )
        )
    sizes = {item.head_size for item in evidence}
    if not sizes:
        raise MatchFailureError(
            f"head size unknown (no static shape on the {projection_kind} and {cache_kind})",
            projection_BSD,
        )
    if len(sizes) > 1:
        stated = "; ".join(f"{item.head_size} from {item.source}" for item in evidence)
        raise MatchFailureError(
            f"inconsistent head sizes {sorted(sizes)}: {stated}", projection_BSD
        )
    return sizes.pop()


def check_top_level(context, attention: ir.Node) -> None:
    """Only the main graph is rewritten: a layer inside an If/Loop body (or a function) cannot
    be cut out and proven on its own, and a rewrite there would change the whole If/Loop node
    in the verifier's graph diff; better left as it is, with the reason, than refused later."""
    if context.graph_or_function is not context.model.graph:
        raise MatchFailureError(
            "inside a subgraph (an If/Loop body or a function): left as it is, since its "
            "layer could not be proven on its own",
            attention,
        )


def check_not_chosen(attention: ir.Node) -> None:
    """An Attention a speed choice wrote (rules._speed_choice) was chosen over GQA."""
    form = attention.metadata_props.get(SPEED_FORM_KEY)
    if form is not None:
        raise MatchFailureError(
            f"written by a speed choice ({form}), measured faster than GroupQueryAttention "
            "there: left as it is",
            attention,
        )


def check_causal(attention: ir.Node, mask: MaskForm) -> None:
    if not attention.attributes.get_int("is_causal", 0) and not mask.causal_in_mask:
        raise MatchFailureError(
            "neither is_causal nor the mask makes attention causal; GQA is always causal",
            mask.mask_value,
        )


def check_3d(facts: ShapeFacts, query: ir.Value, key: ir.Value, value: ir.Value) -> None:
    """The rules read 3-D [B, S, heads*D] query/key/value; 4-D BNSH inputs (the Hugging Face
    exporters' layout) are another pattern."""
    for role, operand in (("query", query), ("key", key), ("value", value)):
        rank = facts.rank(operand)
        if rank == 4:
            raise MatchFailureError(
                f"{role} {operand.name} is 4-D [B, heads, S, D] (the Hugging Face exporters' "
                "layout); these rules match 3-D [B, S, heads*D] query/key/value",
                operand,
            )
        if rank is not None and rank != 3:
            raise MatchFailureError(
                f"{role} {operand.name} is {rank}-D, not 3-D [B, S, heads*D]", operand
            )


def check_dtype(facts: ShapeFacts, query: ir.Value, *others: ir.Value) -> ir.DataType:
    """The one GQA-supported dtype stated by the query or else the caches, not contradicted."""
    stated = [dtype for dtype in (facts.dtype(v) for v in (query, *others)) if dtype is not None]
    if not stated:
        raise MatchFailureError(
            "dtype unknown: the query and the cache carry no type information", query
        )
    dtype = stated[0]
    if dtype not in GQA_DTYPES:
        raise MatchFailureError(f"dtype {dtype} has no GroupQueryAttention kernel", query)
    if any(other != dtype for other in stated[1:]):
        raise MatchFailureError("query and key/value dtypes differ", query)
    return dtype


class AttentionToGQARule(pattern.RewriteRuleClassBase):
    """Bookkeeping shared by the rules: every Attention reaching check() is either
    rewritten or skipped with a reason, in this rule's part of the ``RewriteLog``.

    Subclasses implement ``pattern``, ``_plan_for`` (a plan; ``MatchFailureError`` says why
    there is none) and ``rewrite``, which starts with ``_take_plan()``. Built with
    ``.rule(...)`` for a rule set: the log, the shared ``GQAInputs``, the shape facts and the
    ``LayerDecisions`` table are passed in, so nothing is read back from the instance. A rule
    reads forms and speed choices from the table only; given choosers instead (a rule used
    on its own), it asks them through ``LayerDecisions.asking``.
    """

    def __init__(
        self,
        choose_form: FormChooser = always_past,
        *,
        name: str | None = None,
        exact_padding: bool = False,
        inputs: GQAInputs | None = None,
        facts: ShapeFacts | None = None,
        log: RewriteLog | None = None,
        decisions: LayerDecisions | None = None,
        choose_speed: SpeedChooser | None = None,
        native_support: FormChooser | None = None,
    ) -> None:
        # The rule's name (default: its class's) keys its part of the log.
        name = name or type(self).__name__
        super().__init__(name, remove_nodes=False)
        self.decisions = decisions or LayerDecisions.asking(
            choose_form, choose_speed, native_support
        )
        self.inputs = inputs or GQAInputs(exact_padding=exact_padding)
        # Shapes inferred before any rewrite; a rule used on its own infers them at its
        # first check() of a model.
        self._facts = facts
        self._facts_model: ir.Model | None = None
        self.log = log if log is not None else RewriteLog()
        self.record = self.log.rule(name)
        # check() hands its plan to the rewrite() that onnxscript calls right after it.
        self._plan: Any = None

    def setup(self) -> None:
        # onnxscript calls this before each graph (subgraphs included) and cleanup() after.
        self._plan = None

    def cleanup(self) -> None:
        self._plan = None

    def check(self, context, **bindings) -> pattern.MatchResult | bool:
        attention = context.root
        return self._record(
            context, attention, lambda: self._plan_for(context, attention, **bindings)
        )

    def _record(
        self, context, attention: ir.Node, plan_for: Callable[[], Any]
    ) -> pattern.MatchResult | bool:
        """A plan for rewrite(), or the reason `attention` is skipped (and what is at fault)."""
        label = node_label(attention)
        try:
            check_not_chosen(attention)  # first: a speed choice writes its forms inside an If
            check_top_level(context, attention)
            plan = plan_for()
            if self.decisions.surveying:
                # A survey asks every layer its questions and rewrites none.
                raise MatchFailureError("survey: nothing is rewritten", attention)
        except MatchFailureError as failure:
            self.record.skips[label] = LayerSkip(label, failure.reason)
            return pattern.MatchResult().fail(
                failure.reason, list(failure.failure_sources) or attention
            )
        self.record.skips.pop(label, None)
        self._plan = plan
        return True

    def _plan_for(self, context, attention: ir.Node, **bindings) -> Any:
        raise NotImplementedError

    def _form(
        self,
        attention: ir.Node,
        dtype: ir.DataType,
        head_size: int,
        windowed: bool,
        *,
        native: bool = False,
    ) -> FormDecision:
        """The form the table gives this layer's kind (native: whether GQA runs it)."""
        question = FormQuestion(dtype_name(dtype), head_size, windowed, native)
        return self.decisions.form(question, attention, node_label(attention))

    def facts(self, context) -> ShapeFacts:
        if self._facts is None or (
            self._facts_model is not None and self._facts_model is not context.model
        ):
            self._facts = ShapeFacts.infer(context.model)
            self._facts_model = context.model
        return self._facts

    def _take_plan(self) -> Any:
        plan, self._plan = self._plan, None
        assert plan is not None, "rewrite() without a successful check()"
        return plan

    def _emit(
        self,
        op,
        attention: ir.Node,
        inputs: list[ir.Value | None],
        attributes: dict[str, object],
        replaced_outputs: list[ir.Value],
        record: LayerRewrite,
        num_outputs: int,
    ) -> list[ir.Value]:
        """One GQA node whose first len(replaced_outputs) outputs replace the Attention's."""
        results = self._gqa_node(op, inputs, attributes, num_outputs)
        return self._finish(op, attention, results, replaced_outputs, record)

    def _gqa_node(
        self,
        op,
        inputs: list[ir.Value | None],
        attributes: dict[str, object],
        num_outputs: int,
    ) -> list[ir.Value]:
        results = op.GroupQueryAttention(
            *inputs, _domain="com.microsoft", _outputs=num_outputs, **attributes
        )
        results = list(results) if num_outputs > 1 else [results]
        self.inputs.created.add(results[0].producer())
        return results

    def _finish(
        self,
        op,
        attention: ir.Node,
        results: list[ir.Value],
        replaced_outputs: list[ir.Value],
        record: LayerRewrite,
    ) -> list[ir.Value]:
        """`results` take over the names of `replaced_outputs`; the layer is logged.

        The nodes `op` built for this layer alone (not the inputs all layers share) are named
        after the Attention node they replace.
        """
        own = [node for node in op.nodes if node not in self.inputs.shared]
        name_after(own, node_label(attention))
        self.record.replaced_nodes.append(attention)
        for new, old in zip(results, replaced_outputs, strict=False):
            if old.name:
                self.record.renames.append((new, old.name))
        self.record.rewrites.append(record)
        return results[: len(replaced_outputs)]


def gqa_attributes(
    heads: AttentionHeads, head_size: int, mask: MaskForm, exact_padding: bool
) -> dict[str, object]:
    attributes: dict[str, object] = {
        "num_heads": heads.num_heads,
        "kv_num_heads": heads.kv_num_heads,
        "scale": heads.explicit_scale(head_size),
        "do_rotary": 0,
    }
    if heads.softcap:
        attributes["softcap"] = heads.softcap
    # With --exact-padding the bias carries the window (in the mask's own position space).
    if mask.local_window_size is not None and not exact_padding:
        attributes["local_window_size"] = mask.local_window_size
    return attributes
