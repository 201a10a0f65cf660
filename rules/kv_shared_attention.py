"""KV-shared ONNX ``Attention`` layers -> one ``com.microsoft.GroupQueryAttention`` each.

Dimension letters: B batch, S query length, T total length, N query heads, Nkv KV heads,
D head size. A KV-shared layer computes only its query ``query_BSD`` ([B, S, N*D], already
rotated) and attends over the cache of an earlier *source* layer, ``key_BNSH``/``value_BNSH``
([B, Nkv, T, D]), which the export turns 3-D with Transpose+Reshape (a copy per step).

The replacement reads the borrowed cache directly as GQA's past_key/past_value with an empty
[B, 0, Nkv*D] key/value ("past" form; SPEC.md section 3), so the transposes, reshapes and the
mask chain all die. GQA's built-in causality, ``local_window_size = W`` and
``seqlens_k = sum(attention_mask) - 1`` express exactly what the P1/P2 masks express for
right-padded batches; ``--exact-padding`` instead passes the mask as ``attention_bias``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from rewriter.rules._attention_rule import (
    AttentionHeads,
    AttentionToGQARule,
    FormChooser,
    LayerDecisions,
    LayerRewrite,
    SpeedChooser,
    always_past,
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
from rewriter.rules._borrowed_cache import BorrowedCache, match_borrowed_cache
from rewriter.rules._cache_writers import cache_writer, is_own_cache_fold
from rewriter.rules._failure import MatchFailureError
from rewriter.rules._gqa_inputs import GQAInputs
from rewriter.rules._log import RewriteLog
from rewriter.rules._mask_patterns import MaskForm, match_mask
from rewriter.rules._shape_evidence import HeadSizeEvidence, ShapeFacts
from rewriter.rules._speed_choice import (
    DEFECTIVE_EXPORT_REASON,
    SPEED_LAYER_KEY,
    SpeedChoice,
    attention_bnsh,
    export_attention,
    fold,
    fold_unmasked,
    phase_if,
)

__all__ = [
    "NON_CAUSAL_REASON",
    "DrafterBiasAttentionToFold",
    "KVSharedAttentionToGQA",
    "UnmaskedSharedAttentionToFold",
    "unmasked_non_causal",
]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What check() established, for rewrite() to build."""

    key: BorrowedCache
    value: BorrowedCache
    mask: MaskForm
    heads: AttentionHeads
    head_size: int
    dtype: ir.DataType
    form: str
    graph: ir.Graph | ir.Function
    speed: SpeedChoice
    attention: ir.Node


class KVSharedAttentionToGQA(AttentionToGQARule):
    """Every ai.onnx Attention node reaches check(); it decides and says why not."""

    def __init__(
        self,
        choose_form: FormChooser = always_past,
        *,
        exact_padding: bool = False,
        inputs: GQAInputs | None = None,
        facts: ShapeFacts | None = None,
        window_slice: bool = True,
        choose_speed: SpeedChooser | None = None,
        log: RewriteLog | None = None,
        decisions: LayerDecisions | None = None,
    ) -> None:
        # choose_speed: asked, for a layer whose export is correct, which form each phase
        # runs (without a `decisions` table).
        super().__init__(
            choose_form,
            exact_padding=exact_padding,
            inputs=inputs,
            facts=facts,
            log=log,
            decisions=decisions,
            choose_speed=choose_speed,
        )
        # Sliding layers read only the keys their window reaches (GQAInputs.window_slice).
        self.window_slice = window_slice

    def pattern(self, op, query_BSD, key_BSD, value_BSD, mask):
        return op.Attention(
            query_BSD, key_BSD, value_BSD, mask, _allow_other_inputs=True, _outputs=["output"]
        )

    def _plan_for(self, context, attention, *, query_BSD, key_BSD, value_BSD, mask, **_) -> _Plan:
        query, key, value = query_BSD, key_BSD, value_BSD
        if any(v is not None for v in attention.inputs[4:]):
            raise MatchFailureError(
                "has past_key/past_value/nonpad_kv_seqlen inputs: not a KV-shared layer", attention
            )
        if any(out.uses() or out.is_graph_output() for out in attention.outputs[1:3]):
            raise MatchFailureError("present outputs are used", attention)
        if mask is None:
            raise MatchFailureError("has no mask input", attention)
        facts = self.facts(context)
        check_3d(facts, query, key, value)
        heads = read_heads(context, attention)
        borrowed_key, borrowed_value, head_size = _borrowed_kv(
            context, facts, query, key, value, heads
        )
        mask_form = match_mask(context, mask)
        check_causal(attention, mask_form)
        dtype = check_dtype(facts, query, borrowed_key.cache_BNSH, borrowed_value.cache_BNSH)
        windowed = mask_form.local_window_size is not None
        decision = self._form(attention, dtype, head_size, windowed)
        if decision.form is None:
            raise MatchFailureError(
                f"no GroupQueryAttention form qualifies: {decision.reason}", attention
            )
        speed = SpeedChoice()
        export_is_correct = not attention.attributes.get_int("is_causal", 0)
        speed_chosen = self.decisions.speed_chosen
        if speed_chosen and decision.form == "past":
            kind = layer_kind_of(
                dtype, heads, head_size, mask_form, export_correct=export_is_correct
            )
            speed = self.decisions.speed(kind, attention)
            if not export_is_correct and not speed.export_free:
                # A defective export is never kept, in any phase, whatever was measured.
                speed = SpeedChoice(reason=DEFECTIVE_EXPORT_REASON)
            if speed.decode == speed.prefill == "export":
                raise MatchFailureError(speed.reason, attention)
        elif speed_chosen and not export_is_correct:
            speed = SpeedChoice(reason=DEFECTIVE_EXPORT_REASON)
        return _Plan(
            borrowed_key,
            borrowed_value,
            mask_form,
            heads,
            head_size,
            dtype,
            decision.form,
            context.graph_or_function,
            speed,
            attention,
        )

    def rewrite(self, op, query_BSD, key_BSD, value_BSD, output, **_):
        plan: _Plan = self._take_plan()
        attention = output.producer()
        speed = plan.speed
        window_slice = False
        gqa_call: tuple[list[ir.Value | None], dict[str, object]] | None = None
        if {"gqa", "fold"} & {speed.decode, speed.prefill}:
            # The fold reads what GQA reads: the (window-sliced) cache and its lengths.
            gqa_inputs, attributes, window_slice = self._gqa_call(
                op, plan, query_BSD, key_BSD, value_BSD
            )
            gqa_call = (gqa_inputs, attributes)
        # Only `past` and `split-nopresent` omit the (unused) present outputs: ORT 1.31.1
        # needs them for the others (SPEC.md section 3; the probe decides what qualifies).
        num_outputs = 1 if plan.form in ("past", "split-nopresent") else 3
        caches = (plan.key.cache_BNSH, plan.value.cache_BNSH)

        def build(form: str, builder) -> ir.Value:
            if form == "gqa":
                assert gqa_call is not None
                return self._gqa_node(builder, *gqa_call, num_outputs)[0]
            if form == "attention-bnsh":
                scale = plan.heads.explicit_scale(plan.head_size)
                return attention_bnsh(
                    builder,
                    attention,
                    query_BSD,
                    caches,
                    plan.heads.num_heads,
                    plan.head_size,
                    scale,
                )
            if form == "fold":
                assert gqa_call is not None
                return self._fold(op, builder, plan, query_BSD, gqa_call[0])
            return export_attention(builder, attention)

        if speed.decode == speed.prefill:
            result = build(speed.decode, op)
        else:
            result = phase_if(
                op,
                query_BSD,
                decode=lambda builder: build(speed.decode, builder),
                prefill=lambda builder: build(speed.prefill, builder),
                output_type=output.type,
                name=output.name or node_label(attention),
            )
        record = LayerRewrite(
            node=node_label(attention),
            rule=f"{self.name}/{plan.mask.style}-{layer_kind(plan.mask)}",
            form=plan.form,
            local_window_size=plan.mask.local_window_size,
            mask_style=plan.mask.style,
            source=plan.key.cache_BNSH.name or "",
            dtype=dtype_name(plan.dtype),
            head_size=plan.head_size,
            window_slice=window_slice,
            speed_form=speed.label,
            speed_reason=speed.reason,
            decode_convention=_decode_convention(speed.decode, plan),
        )
        if speed.label != "gqa":
            # The verifier's graph diff finds the layer's replacement by this.
            result.producer().metadata_props[SPEED_LAYER_KEY] = speed.label
        (result,) = self._finish(op, attention, [result], [output], record)
        return result

    def _fold(
        self, op, builder, plan: _Plan, query_BSD: ir.Value, gqa_inputs: list[ir.Value | None]
    ) -> ir.Value:
        """The fold (rules._speed_choice.fold) over the cache GQA's `past` form reads.

        Over a cache written as the export writes it (`_appends_after_padding`: a right-padded
        row's new key after its padding), a correct export's own bias (P2, is_causal=0) is the
        fold's mask, sliced from the window slice's first key where the cache is and repeated
        over the folded axis: the layer decodes exactly as exported, whatever the padding.
        Otherwise (a cache GroupQueryAttention writes, the new key right after a row's valid
        keys, or a defective export) the mask is built once per graph (with `op`, outside any
        If branch) from the lengths GQA reads: seqlens_k over the window-sliced cache, so it
        means what GQA means (right padding, holes in the mask ignored, as onnxruntime-genai's
        batched decode needs); with --exact-padding, GQA's finite bias from the export's mask
        (every key slot valid, the query at slot T - 1). One row [B, 1, 1, T] for the G
        folded heads of the token (rules._speed_choice.fold_product repeats it where needed).
        """
        assert plan.form == "past", "the fold reads the past form's cache"
        heads = plan.heads
        inputs = self.inputs.of(plan.graph)
        past_key, past_value, seqlens_k, total_length = gqa_inputs[3:7]
        assert None not in (past_key, past_value, seqlens_k, total_length)
        attention = plan.attention
        if _decodes_as_exported(plan):
            bias = attention.inputs[3]
            assert bias is not None
            window = plan.mask.local_window_size
            if past_key is not plan.key.cache_BNSH and window is not None:
                # The cache GQA reads is the window slice: the bias loses the same keys.
                start = inputs.window_start(op, plan.mask.attention_mask, query_BSD, window)
                end = builder.Constant(value_ints=[np.iinfo(np.int64).max])
                bias = builder.Slice(bias, start, end, builder.Constant(value_ints=[3]))
        elif self.inputs.exact_padding:
            # GQA's [B, 1, S, T], which is [B, 1, 1, T] in decode, where the fold runs.
            bias = gqa_inputs[10]
            assert bias is not None
        else:
            bias = inputs.fold_bias(
                op, (seqlens_k, total_length), plan.mask.local_window_size, plan.dtype
            )
        return fold(
            builder,
            query_BSD,
            (past_key, past_value),
            bias,
            **heads.fold_options(plan.head_size, plan.dtype),
        )

    def _gqa_call(
        self, op, plan: _Plan, query_BSD: ir.Value, key_BSD: ir.Value, value_BSD: ir.Value
    ) -> tuple[list[ir.Value | None], dict[str, object], bool]:
        """GQA's inputs (built in the enclosing graph), attributes, and whether the borrowed
        cache is cut to the window."""
        inputs = self.inputs.of(plan.graph)
        seqlens_k, total_length = inputs.sequence_lengths(op, plan.mask.attention_mask)
        key_value_past = self._key_value_past(op, plan, query_BSD, key_BSD, value_BSD)
        window = plan.mask.local_window_size
        # The bias of --exact-padding spans all T keys; the split/kv forms have no past to cut.
        window_slice = (
            self.window_slice
            and window is not None
            and not self.inputs.exact_padding
            and plan.form in ("past", "past-present")
        )
        if window_slice:
            assert window is not None
            caches = (plan.key.cache_BNSH, plan.value.cache_BNSH)
            *key_value_past[2:4], seqlens_k, total_length = inputs.window_slice(
                op, plan.mask.attention_mask, query_BSD, window, caches
            )
        gqa_inputs: list[ir.Value | None] = [query_BSD, *key_value_past, seqlens_k, total_length]
        if inputs.exact_padding:
            # cos_cache, sin_cache, position_ids unused; attention_bias is input 10.
            gqa_inputs += [None, None, None, inputs.finite_bias(op, plan.mask, plan.dtype)]
        attributes = gqa_attributes(
            plan.heads, plan.head_size, plan.mask, self.inputs.exact_padding
        )
        return gqa_inputs, attributes, window_slice

    def _key_value_past(
        self, op, plan: _Plan, query_BSD: ir.Value, key_BSD: ir.Value, value_BSD: ir.Value
    ) -> list[ir.Value | None]:
        """GQA's key, value, past_key, past_value for the chosen form (SPEC.md section 3)."""
        key_BNSH, value_BNSH = plan.key.cache_BNSH, plan.value.cache_BNSH
        hidden = plan.heads.kv_num_heads * plan.head_size
        if plan.form in ("past", "past-present"):
            empty = self.inputs.of(plan.graph).empty_kv(
                op, plan.mask.attention_mask, hidden, plan.dtype
            )
            return [empty, empty, key_BNSH, value_BNSH]
        if plan.form == "kv":
            # The export's own 3-D K/V (Transpose+Reshape kept), no past.
            return [key_BSD, value_BSD, None, None]
        if plan.form in ("split", "split-nopresent"):
            # past = cache[:, :, :T-S]; this call's keys = cache[:, :, T-S:] made 3-D.
            query_length = op.Shape(query_BSD, start=1, end=2)
            cache_length = op.Shape(key_BNSH, start=2, end=3)
            past_length = op.Sub(cache_length, query_length)
            time_axis = op.Constant(value_ints=[2])
            start = op.Constant(value_ints=[0])
            merged = op.Constant(value_ints=[0, 0, hidden])
            new_BSD: list[ir.Value | None] = []
            past_BNSH: list[ir.Value | None] = []
            for cache in (key_BNSH, value_BNSH):
                past_BNSH.append(op.Slice(cache, start, past_length, time_axis))
                new = op.Slice(cache, past_length, cache_length, time_axis)
                new_BSD.append(op.Reshape(op.Transpose(new, perm=[0, 2, 1, 3]), merged))
            return new_BSD + past_BNSH
        raise ValueError(f"unknown GroupQueryAttention form {plan.form!r}")


@dataclasses.dataclass(frozen=True)
class _UnmaskedPlan:
    key: BorrowedCache
    value: BorrowedCache
    heads: AttentionHeads
    head_size: int
    dtype: ir.DataType


# Why the fold and not GQA: measured on onnxruntime 1.32.0 CPU, GQA with causal=0 in the
# past form is exact for such a layer but refuses a batch of several tokens after a past.
UNMASKED_FOLD_REASON = (
    "no mask and is_causal=0 (every query sees every key): the fold reads the borrowed cache "
    "in place and is exact for every S and B; GroupQueryAttention (causal=0) refuses a batch "
    "of several tokens after a past"
)


# Why a layer without mask and causal flag that the fold's rule never saw is left: its
# pattern is Attention(q, k, v) with exactly three inputs.
NON_CAUSAL_REASON = (
    "no mask and is_causal=0: every query sees every key; the fold takes such a layer only "
    "as Attention(q, k, v) with three inputs over a borrowed cache, which this is not"
)


def unmasked_non_causal(attention: ir.Node) -> bool:
    """The kind of layer UnmaskedSharedAttentionToFold owns: no mask and is_causal=0."""
    no_mask = len(attention.inputs) < 4 or attention.inputs[3] is None
    return no_mask and attention.attributes.get_int("is_causal", 0) == 0


class UnmaskedSharedAttentionToFold(AttentionToGQARule):
    """A KV-shared Attention without mask and with is_causal=0 (mobius's speculative-decoding
    drafter: its full layer reads the target's cache, a graph input, and every query sees
    every key) -> the fold at any S (rules._speed_choice.fold_unmasked), no If: it computes
    what the export computes for every query length and batch."""

    def pattern(self, op, query_BSD, key_BSD, value_BSD):
        # Exactly three inputs: no mask, no past (a fourth input fails the match).
        return op.Attention(query_BSD, key_BSD, value_BSD, _outputs=["output"])

    def _plan_for(self, context, attention, *, query_BSD, key_BSD, value_BSD, **_) -> _UnmaskedPlan:
        if attention.attributes.get_int("is_causal", 0):
            raise MatchFailureError(
                "no mask and is_causal=1: upper-left causal, not a layer the fold computes",
                attention,
            )
        if any(out.uses() or out.is_graph_output() for out in attention.outputs[1:]):
            raise MatchFailureError("present or qk outputs are used", attention)
        facts = self.facts(context)
        check_3d(facts, query_BSD, key_BSD, value_BSD)
        heads = read_heads(context, attention)
        borrowed_key, borrowed_value, head_size = _borrowed_kv(
            context, facts, query_BSD, key_BSD, value_BSD, heads
        )
        dtype = check_dtype(facts, query_BSD, borrowed_key.cache_BNSH, borrowed_value.cache_BNSH)
        return _UnmaskedPlan(borrowed_key, borrowed_value, heads, head_size, dtype)

    def rewrite(self, op, query_BSD, key_BSD, value_BSD, output, **_):
        plan: _UnmaskedPlan = self._take_plan()
        attention = output.producer()
        return _emit_fold(
            self,
            op,
            attention,
            output,
            query_BSD,
            plan,
            None,
            "unmasked-full",
            "none",
            UNMASKED_FOLD_REASON,
        )


@dataclasses.dataclass(frozen=True)
class _BiasPlan:
    key: BorrowedCache
    value: BorrowedCache
    heads: AttentionHeads
    head_size: int
    dtype: ir.DataType
    mask_dtype: ir.DataType | None = None  # the export's mask: a float bias or a bool mask


DRAFTER_BIAS_FOLD_REASON = (
    "a drafter's is_causal=0 layer over the target's cache (a graph input) with a bias shared "
    "by all heads: the fold repeats the export's own bias over the folded heads and reads the "
    "cache in place, exact for every S and B; GroupQueryAttention refuses a batch of several "
    "tokens after a past"
)


class DrafterBiasAttentionToFold(AttentionToGQARule):
    """A speculative-decoding drafter's masked layer -> the fold at any S with the export's
    own bias (rules._speed_choice.fold_unmasked with `bias_B1ST`), no If.

    It takes what the KV-shared rule cannot read: an Attention with is_causal=0 whose
    borrowed K/V are graph inputs (the target's cache handed to the drafter: mobius's
    ``shared_kv.sliding_attention.key``) and whose mask, one [B, 1, S, T] for all heads, no
    P1/P2 pattern matches (mobius's sliding bias over ``Slice(attention_mask, 0,
    T_sliding)``); a layer with a P1/P2 mask, or whose cache another layer of the same graph
    writes, is the KV-shared rule's, rewritten or left. The export's bias is read as it is,
    so the layer computes what the export computes, padding and all."""

    def pattern(self, op, query_BSD, key_BSD, value_BSD, mask):
        # Exactly four inputs: a mask, no past (a fifth input fails the match).
        return op.Attention(query_BSD, key_BSD, value_BSD, mask, _outputs=["output"])

    def _plan_for(
        self, context, attention, *, query_BSD, key_BSD, value_BSD, mask, **_
    ) -> _BiasPlan:
        if attention.attributes.get_int("is_causal", 0):
            raise MatchFailureError("is_causal=1: not a layer whose bias says it all", attention)
        if any(out.uses() or out.is_graph_output() for out in attention.outputs[1:]):
            raise MatchFailureError("present or qk outputs are used", attention)
        facts = self.facts(context)
        check_3d(facts, query_BSD, key_BSD, value_BSD)
        heads = read_heads(context, attention)
        borrowed_key = match_borrowed_cache(context, key_BSD)
        borrowed_value = match_borrowed_cache(context, value_BSD)
        for cache in (borrowed_key.cache_BNSH, borrowed_value.cache_BNSH):
            if not cache.is_graph_input():
                raise MatchFailureError(
                    f"{cache.name} is not a graph input: not a drafter's borrowed cache", cache
                )
        if not _same_source(borrowed_key.cache_BNSH, borrowed_value.cache_BNSH):
            raise MatchFailureError("K and V are not one cache's key and value", value_BSD)
        try:
            match_mask(context, mask)
        except MatchFailureError:
            pass  # what the KV-shared rule cannot read: this rule's to take
        else:
            # A P1/P2 mask is the KV-shared rule's: it left the layer for its own reason
            # (a head size GQA refuses, a speed choice that keeps the export, ...).
            raise MatchFailureError("the mask is a P1/P2 mask: the KV-shared rule's layer", mask)
        head_size = _head_size(facts, borrowed_key, borrowed_value, query_BSD, heads)
        dtype = check_dtype(facts, query_BSD, borrowed_key.cache_BNSH, borrowed_value.cache_BNSH)
        mask_dtype = facts.dtype(mask)
        if mask_dtype not in (dtype, ir.DataType.BOOL):
            raise MatchFailureError(
                f"mask dtype {mask_dtype} is neither bool nor the query's {dtype}", mask
            )
        if facts.rank(mask) != 4 or facts.static_dims(mask, 1) != {1}:
            raise MatchFailureError(
                "mask is not [B, 1, S, T] (one for all heads, as the fold repeats it)", mask
            )
        return _BiasPlan(borrowed_key, borrowed_value, heads, head_size, dtype, mask_dtype)

    def rewrite(self, op, query_BSD, key_BSD, value_BSD, mask, output, **_):
        plan: _BiasPlan = self._take_plan()
        attention = output.producer()
        return _emit_fold(
            self,
            op,
            attention,
            output,
            query_BSD,
            plan,
            mask,
            "export-bias",
            "export",
            DRAFTER_BIAS_FOLD_REASON,
            bias_is_bool=plan.mask_dtype == ir.DataType.BOOL,
        )


def _decode_convention(form: str, plan: _Plan) -> str:
    """rules._log.LayerRewrite.decode_convention of a KV-shared layer decoding with `form`."""
    if form in ("export", "attention-bnsh") or (form == "fold" and _decodes_as_exported(plan)):
        return "export"  # the export's own mask
    return "gqa"


def _decodes_as_exported(plan: _Plan) -> bool:
    """Whether the fold reads the export's own bias (KVSharedAttentionToGQA._fold): a correct
    export (P2, is_causal=0) over a cache written after the padding."""
    correct = plan.mask.style == "p2" and not plan.attention.attributes.get_int("is_causal", 0)
    return correct and _appends_after_padding(plan.key.cache_BNSH)


def _appends_after_padding(cache_BNSH: ir.Value) -> bool:
    """Whether the borrowed cache's writer puts a right-padded row's new key after the padding
    in decode: the export's Attention with past, or the own-cache fold (rules._speed_choice
    .own_cache_fold, an If already written in place of an earlier layer, whose decode appends
    with Concat). GroupQueryAttention writes it right after the row's valid keys; a graph
    input's writer is unknown."""
    producer = cache_BNSH.producer()
    if producer is not None and is_own_cache_fold(producer):
        return True  # its decode appends with Concat, whatever its prefill branch runs
    writer = cache_writer(cache_BNSH)
    return writer is not None and writer.op_type == "Attention"


def _same_source(key_BNSH: ir.Value, value_BNSH: ir.Value) -> bool:
    key_producer, value_producer = key_BNSH.producer(), value_BNSH.producer()
    if key_producer is not None or value_producer is not None:
        return (
            key_producer is value_producer
            and key_BNSH.index() is not None
            and key_BNSH.index() != value_BNSH.index()
        )
    # Caches that are graph inputs: pair them by name (past_key_values.3.key / .value). Only
    # the last "key" names the kind: "past_key_values" itself contains one.
    key_name, value_name = key_BNSH.name or "", value_BNSH.name or ""
    head, found, tail = key_name.rpartition("key")
    return bool(found) and f"{head}value{tail}" == value_name


def _head_size(
    facts: ShapeFacts,
    key: BorrowedCache,
    value: BorrowedCache,
    query: ir.Value,
    heads: AttentionHeads,
) -> int:
    reshaped = []
    for cache in (key, value):
        if cache.hidden_size is not None:
            if cache.hidden_size % heads.kv_num_heads:
                raise MatchFailureError(
                    "Reshape size is not a multiple of kv_num_heads", cache.cache_BNSH
                )
            reshaped.append(
                HeadSizeEvidence(
                    cache.hidden_size // heads.kv_num_heads,
                    f"Reshape of {cache.cache_BNSH.name} to {cache.hidden_size}",
                )
            )
    return infer_head_size(
        facts,
        (key.cache_BNSH, value.cache_BNSH),
        query,
        heads.num_heads,
        heads,
        cache_kind="borrowed cache",
        projection_kind="query",
        more_evidence=tuple(reshaped),
    )


def _borrowed_kv(context, facts, query: ir.Value, key: ir.Value, value: ir.Value, heads):
    """The borrowed BNSH key and value behind a KV-shared layer's 3-D K/V, one source's pair,
    and the head size everything the export states agrees on."""
    borrowed_key = match_borrowed_cache(context, key)
    borrowed_value = match_borrowed_cache(context, value)
    if not _same_source(borrowed_key.cache_BNSH, borrowed_value.cache_BNSH):
        raise MatchFailureError(
            "K and V do not come from the same source layer's present outputs", value
        )
    return (
        borrowed_key,
        borrowed_value,
        _head_size(facts, borrowed_key, borrowed_value, query, heads),
    )


def _emit_fold(
    rule,
    op,
    attention: ir.Node,
    output: ir.Value,
    query_BSD: ir.Value,
    plan,
    bias_B1ST: ir.Value | None,
    variant: str,
    mask_style: str,
    reason: str,
    *,
    bias_is_bool: bool = False,
) -> ir.Value:
    """The fold at any S for a layer whose attention is not causal across its query (the
    drafters' layers), recorded and named after the Attention it replaces. `bias_is_bool`:
    `bias_B1ST` is the export's boolean mask rather than an additive bias."""
    result = fold_unmasked(
        op,
        query_BSD,
        (plan.key.cache_BNSH, plan.value.cache_BNSH),
        **plan.heads.fold_options(plan.head_size, plan.dtype),
        bias_B1ST=bias_B1ST,
        bias_is_bool=bias_is_bool,
    )
    record = LayerRewrite(
        node=node_label(attention),
        rule=f"{rule.name}/{variant}",
        form="fold",
        local_window_size=None,
        mask_style=mask_style,
        source=plan.key.cache_BNSH.name or "",
        dtype=dtype_name(plan.dtype),
        head_size=plan.head_size,
        speed_form="fold",
        speed_reason=reason,
    )
    # The verifier's graph diff finds the layer's replacement by this.
    result.producer().metadata_props[SPEED_LAYER_KEY] = "fold"
    (result,) = rule._finish(op, attention, [result], [output], record)
    return result
