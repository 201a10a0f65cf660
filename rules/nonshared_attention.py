"""Non-shared ONNX ``Attention`` layers (with past/present) -> ``GroupQueryAttention``.

Dimension letters: B batch, S query length, P past length, T = P + S, N query heads,
Nkv KV heads, D head size. Exporters fall back to the standard op for layers that own a
cache too (every layer in the "default provider" build; full layers with D > 256 in
others): ``Attention(query_BSD, key_BSD, value_BSD, mask, past_key_BNPD, past_value_BNPD)
-> (output, present_key_BNTD, present_value_BNTD)`` with the same P1/P2 masks as the shared
layers. With past inputs ONNX Runtime aligns is_causal to the bottom right, so these layers
are correct in decode; the gain is dropping the mask chain (CPU-placed on CUDA) once no
layer reads it.

The replacement is GQA's native form: new key/value plus past, presents produced under the
same names. Present caches keep the BNSH layout; right-padded rows follow GQA's convention
(new keys written at position seqlens_k), which the report states. Rotary embedding stays
outside (``do_rotary=0``).

A speed choice may instead give the layer ``If(S == 1: fold, else: gqa)`` (or ``else:
export``; rules._speed_choice.own_cache_fold): decode appends the new key/value to the past
with ``Concat`` (the presents) and folds the query heads of each KV head over them with the
export's own bias; prefill is GQA's native form (or the export's node). Its decode keeps the
export's convention (new keys after a row's padding) and its presents, so the rest of the
model reads what it read.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from rewriter.rules._attention_rule import (
    AttentionHeads,
    AttentionToGQARule,
    FormChooser,
    FormDecision,
    LayerRewrite,
    SpeedChooser,
    check_3d,
    check_causal,
    check_dtype,
    dtype_name,
    gqa_attributes,
    infer_head_size,
    layer_kind,
    layer_kind_of,
    node_label,
    read_heads,
)
from rewriter.rules._decisions import NATIVE_FORM, LayerDecisions
from rewriter.rules._failure import MatchFailureError
from rewriter.rules._gqa_inputs import GQAInputs
from rewriter.rules._log import RewriteLog
from rewriter.rules._mask_patterns import MaskForm, match_mask
from rewriter.rules._shape_evidence import ShapeFacts
from rewriter.rules._speed_choice import (
    SPEED_LAYER_KEY,
    SpeedChoice,
    export_attention,
    own_cache_fold,
    phase_if,
)

__all__ = ["LAYERS_SHARED_REASON", "NATIVE_FORM", "NonSharedAttentionToGQA", "owns_cache_input"]

# Why a layer with its own cache is left when only KV-shared layers are asked for.
LAYERS_SHARED_REASON = "a layer with its own cache (past inputs); --layers shared leaves it"


def owns_cache_input(attention: ir.Node) -> bool:
    """The kind of layer this rule owns: an Attention with a past_key or past_value input."""
    return any(value is not None for value in attention.inputs[4:6])


def always_native(dtype: str, head_size: int, windowed: bool) -> FormDecision:
    return FormDecision(NATIVE_FORM)


@dataclasses.dataclass(frozen=True)
class _Plan:
    mask: MaskForm
    heads: AttentionHeads
    head_size: int
    dtype: ir.DataType
    graph: ir.Graph | ir.Function
    speed_reason: str
    # None: GQA's native form; else the If of own_cache_fold (decode fold, prefill export).
    speed: SpeedChoice | None = None


# Why a speed choice never keeps a P1 export (SPEC.md section 2, P1 (b)).
_MASK_3D_FIX = (
    "not timed: the export's 3-D [B, S, T] mask is read as [heads, S, T] (batch 2 fails, a "
    "batch equal to the head count runs wrong); GroupQueryAttention is the correctness fix"
)


class NonSharedAttentionToGQA(AttentionToGQARule):
    def __init__(
        self,
        supports: FormChooser = always_native,
        *,
        exact_padding: bool = False,
        inputs: GQAInputs | None = None,
        facts: ShapeFacts | None = None,
        choose_speed: SpeedChooser | None = None,
        log: RewriteLog | None = None,
        decisions: LayerDecisions | None = None,
    ) -> None:
        # Without a `decisions` table: `supports` answers whether GQA runs this dtype/D here
        # (see NATIVE_FORM); choose_speed, for a layer whose export is correct, whether GQA,
        # the export or the decode fold is faster; these layers have no other forms.
        super().__init__(
            supports,
            exact_padding=exact_padding,
            inputs=inputs,
            facts=facts,
            log=log,
            decisions=decisions,
            choose_speed=choose_speed,
            native_support=supports,
        )

    def pattern(self, op, query_BSD, key_BSD, value_BSD, mask, past_key_BNPD, past_value_BNPD):
        return op.Attention(
            query_BSD,
            key_BSD,
            value_BSD,
            mask,
            past_key_BNPD,
            past_value_BNPD,
            _allow_other_inputs=True,
            _outputs=["output", "present_key_BNTD", "present_value_BNTD"],
        )

    def _plan_for(
        self,
        context,
        attention,
        *,
        query_BSD,
        key_BSD,
        value_BSD,
        mask,
        past_key_BNPD,
        past_value_BNPD,
        **_,
    ) -> _Plan:
        query, key, past_key, past_value = query_BSD, key_BSD, past_key_BNPD, past_value_BNPD
        if past_key is None or past_value is None:
            raise MatchFailureError(
                "has no past_key/past_value: not a layer with its own cache", attention
            )
        if len(attention.outputs) < 3:
            # The matcher binds missing optional outputs to nothing; rewrite() needs both.
            raise MatchFailureError(
                "has no present_key/present_value outputs: not a layer with its own cache",
                attention,
            )
        if len(attention.inputs) > 6 and attention.inputs[6] is not None:
            raise MatchFailureError("has a nonpad_kv_seqlen input", attention)
        if mask is None:
            raise MatchFailureError("has no mask input", attention)
        facts = self.facts(context)
        check_3d(facts, query, key, value_BSD)
        heads = read_heads(context, attention)
        head_size = infer_head_size(
            facts,
            (past_key, past_value),
            key,
            heads.kv_num_heads,
            heads,
            cache_kind="past cache",
            projection_kind="key",
        )
        mask_form = match_mask(context, mask)
        check_causal(attention, mask_form)
        dtype = check_dtype(facts, query, key, past_key)
        windowed = mask_form.local_window_size is not None
        decision = self._form(attention, dtype, head_size, windowed, native=True)
        if decision.form is None:
            raise MatchFailureError(
                f"GroupQueryAttention does not run this layer here: {decision.reason}", attention
            )
        speed_reason = ""
        speed: SpeedChoice | None = None
        if self.decisions.speed_chosen and mask_form.style == "p1":
            speed_reason = _MASK_3D_FIX
        elif self.decisions.speed_chosen:
            kind = layer_kind_of(dtype, heads, head_size, mask_form, own_cache=True)
            choice = self.decisions.speed(kind, attention)
            if choice.label == "export":
                raise MatchFailureError(choice.reason, attention)
            if choice.decode == "fold" and choice.prefill in ("gqa", "export"):
                speed = choice
            elif choice.label != "gqa":
                raise ValueError(
                    "a layer with its own cache is gqa, export or if(S==1: fold, else: gqa or "
                    "export), "
                    f"not {choice.label}"
                )
            speed_reason = choice.reason
        return _Plan(
            mask_form, heads, head_size, dtype, context.graph_or_function, speed_reason, speed
        )

    def rewrite(
        self,
        op,
        query_BSD,
        key_BSD,
        value_BSD,
        past_key_BNPD,
        past_value_BNPD,
        output,
        present_key_BNTD,
        present_value_BNTD,
        **_,
    ):
        plan: _Plan = self._take_plan()
        replaced = [output, present_key_BNTD, present_value_BNTD]
        if plan.speed is not None:
            return self._phase_if(op, query_BSD, plan, plan.speed, replaced)
        attention = output.producer()
        gqa_inputs = self._native_inputs(op, plan, attention)
        record = LayerRewrite(
            node=node_label(attention),
            rule=f"{self.name}/{plan.mask.style}-{layer_kind(plan.mask)}",
            form=NATIVE_FORM,
            local_window_size=plan.mask.local_window_size,
            mask_style=plan.mask.style,
            source=past_key_BNPD.name or "",
            dtype=dtype_name(plan.dtype),
            head_size=plan.head_size,
            speed_reason=plan.speed_reason,
        )
        attributes = gqa_attributes(
            plan.heads, plan.head_size, plan.mask, self.inputs.exact_padding
        )
        return self._emit(op, attention, gqa_inputs, attributes, replaced, record, num_outputs=3)

    def _native_inputs(self, op, plan: _Plan, attention: ir.Node) -> list[ir.Value | None]:
        """GQA's inputs for this layer in its native form, lengths built with `op` (the
        enclosing graph): new key/value, past, seqlens_k, total_sequence_length."""
        inputs = self.inputs.of(plan.graph)
        seqlens_k, total_length = inputs.sequence_lengths(op, plan.mask.attention_mask)
        query, key, value, _, past_key, past_value = attention.inputs[:6]
        gqa_inputs = [query, key, value, past_key, past_value, seqlens_k, total_length]
        if inputs.exact_padding:
            gqa_inputs += [None, None, None, inputs.finite_bias(op, plan.mask, plan.dtype)]
        return gqa_inputs

    def _phase_if(
        self,
        op,
        query_BSD: ir.Value,
        plan: _Plan,
        speed: SpeedChoice,
        replaced: list[ir.Value],
    ) -> list[ir.Value]:
        """``If(S == 1: own_cache_fold, else: GQA's native form or the export's node)``, three
        outputs. A prompt's prefill (no past) writes the same presents either way; a chunk
        after a past differs only for padded rows, which GQA refuses at batch > 1."""
        attention = replaced[0].producer()
        assert attention is not None
        gqa_call = None
        if speed.prefill == "gqa":
            gqa_call = (
                self._native_inputs(op, plan, attention),
                gqa_attributes(plan.heads, plan.head_size, plan.mask, self.inputs.exact_padding),
            )
        window = plan.mask.local_window_size
        # Built in the enclosing graph, once per mask and W.
        window_start = (
            None
            if window is None
            else self.inputs.of(plan.graph).appended_window_start(
                op, plan.mask.attention_mask, window
            )
        )

        def decode(builder) -> tuple[ir.Value, ...]:
            return own_cache_fold(
                builder,
                attention,
                **plan.heads.fold_options(plan.head_size, plan.dtype),
                window_start=window_start,
            )

        def prefill(builder) -> tuple[ir.Value, ...]:
            if gqa_call is not None:
                return tuple(self._gqa_node(builder, *gqa_call, 3))
            outputs = export_attention(builder, attention, num_outputs=3)
            assert isinstance(outputs, tuple | list)
            return tuple(outputs)

        results = phase_if(
            op,
            query_BSD,
            decode=decode,
            prefill=prefill,
            output_type=tuple(value.type for value in replaced),
            name=replaced[0].name or node_label(attention),
        )
        assert isinstance(results, tuple)
        # The verifier's graph diff finds the layer's replacement by this.
        results[0].producer().metadata_props[SPEED_LAYER_KEY] = speed.label
        record = LayerRewrite(
            node=node_label(attention),
            rule=f"{self.name}/{plan.mask.style}-{layer_kind(plan.mask)}",
            form="fold",
            local_window_size=plan.mask.local_window_size,
            mask_style=plan.mask.style,
            source=attention.inputs[4].name or "",
            dtype=dtype_name(plan.dtype),
            head_size=plan.head_size,
            window_slice=window is not None,
            speed_form=speed.label,
            speed_reason=speed.reason,
            decode_convention="export",
        )
        return self._finish(op, attention, list(results), replaced, record)
