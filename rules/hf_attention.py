"""Hugging Face exports' ``Attention`` layers (4-D, repeated cache) -> ``GroupQueryAttention``.

Dimension letters: B batch, S query length, P past length, T = P + S, N query heads, Nkv KV
heads, g = N / Nkv, D head size, W sliding window.

Both kinds of layer the exporters write: KV-shared layers (a later reader of another layer's
repeated cache) become GQA's ``past`` form over the borrowed cache; with ``layers="all"`` the
source layers, which own their cache (``Concat(past, new)``, a trimmed sliding cache), become
GQA's native form and ``redirect_caches`` hands their presents to every reader. What the
exports contain, the masks, the trimmed sliding caches and why each replacement computes what
the export computes: ``docs/hf_exporter_layers.md``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from rewriter.rules import _values
from rewriter.rules._attention_rule import (
    AttentionHeads,
    AttentionToGQARule,
    FormChooser,
    LayerRewrite,
    always_past,
    check_dtype,
    check_opset,
    dtype_name,
    gqa_attributes,
    node_label,
)
from rewriter.rules._batched_chunks import (
    OWN_CHUNKS,
    SHARED_CHUNKS,
    query_seqlens,
    shared_if,
    with_query_seqlens,
)
from rewriter.rules._decisions import NATIVE_FORM, LayerDecisions
from rewriter.rules._failure import MatchFailureError
from rewriter.rules._gqa_inputs import GQAInputs
from rewriter.rules._log import PaddingRequirement, RewriteLog
from rewriter.rules._padding_contract import PaddingContract
from rewriter.rules._position_masks import (
    KeyShift,
    PositionMask,
    allowed_keys,
    match_position_mask,
)
from rewriter.rules._repeated_cache import (
    AppendedCache,
    RepeatedCache,
    TrimmedCache,
    match_appended_cache,
    match_repeated_cache,
    match_trimmed_cache,
    shape_elements,
)
from rewriter.rules._shape_evidence import ShapeFacts

__all__ = ["NO_ATTENTION_MASK_STYLE_SUFFIX", "HFAttentionToGQA", "hf_rules"]

# mask_style suffix of layers whose graph has no attention_mask: lengths from the cache.
NO_ATTENTION_MASK_STYLE_SUFFIX = "-no-attention-mask"

_FORMS = ("past", "past-present")


@dataclasses.dataclass(frozen=True)
class _Plan:
    attention: ir.Node
    key: RepeatedCache
    value: RepeatedCache
    mask: PositionMask
    heads: AttentionHeads
    head_size: int
    dtype: ir.DataType
    form: str
    shared: bool
    graph: ir.Graph | ir.Function
    # Own-cache layers whose cache is Concat(past, new): GQA's native form appends instead.
    appended: tuple[AppendedCache, AppendedCache] | None = None
    # The key cache when the mask's key positions are shifted (a trimmed sliding cache).
    trimmed: TrimmedCache | None = None
    # The graph takes B > 1 and S > 1 after a past (rules._batched_chunks).
    batched_chunks: bool = False


class HFAttentionToGQA(AttentionToGQARule):
    """One HF Attention layer (with or without the row-zeroing Where) -> one GQA node.

    ``layers="shared"`` rewrites only layers that read another layer's cache.
    """

    def __init__(
        self,
        choose_form: FormChooser = always_past,
        *,
        zeroes_masked_rows: bool,
        single_query_reshape: bool = False,
        layers: str = "all",
        exact_padding: bool = False,
        inputs: GQAInputs | None = None,
        facts: ShapeFacts | None = None,
        log: RewriteLog | None = None,
        decisions: LayerDecisions | None = None,
    ) -> None:
        super().__init__(
            choose_form,
            name="HFAttentionToGQA"
            + ("/where" if zeroes_masked_rows else "")
            + ("/s1" if single_query_reshape else ""),
            exact_padding=exact_padding,
            inputs=inputs,
            facts=facts,
            log=log,
            decisions=decisions,
        )
        self.zeroes_masked_rows = zeroes_masked_rows
        # Single-token decode graphs (S fixed at 1): the exporter writes a Reshape to the
        # same [B, N, 1, D] between the Attention and its output Transpose.
        self.single_query_reshape = single_query_reshape
        self._steps = ("Where",) * zeroes_masked_rows + ("Reshape",) * single_query_reshape
        self.layers = layers
        # Per graph being visited (onnxscript visits subgraphs mid-parent): (export's cache,
        # GQA present replacing it, the node that built the cache).
        self._cache_redirects: list[list[tuple[ir.Value, ir.Value, ir.Node]]] = []

    def pattern(
        self, op, query_BNSD, key_BNTD, value_BNTD, mask, row_has_keys, zero, same_shape, shape
    ):
        attention = op.Attention(
            query_BNSD, key_BNTD, value_BNTD, mask, _allow_other_inputs=True, _outputs=["output"]
        )
        if self.zeroes_masked_rows:
            attention = op.Where(row_has_keys, zero, attention)
        if self.single_query_reshape:
            attention = op.Reshape(attention, same_shape)
        return op.Reshape(op.Transpose(attention, perm=[0, 2, 1, 3]), shape)

    def check(self, context, **bindings):
        # Skips are keyed by the Attention node (the pattern's root is the output Reshape).
        attention = bindings["output"].producer()
        inputs = (bindings["query_BNSD"], bindings["key_BNTD"], bindings["value_BNTD"])
        if any(v.shape is not None and v.shape.rank() != 4 for v in inputs):
            # Not this export style: the 3-D rules own the skip reason.
            return pattern.MatchResult().fail("query/key/value are not 4-D", attention)
        # The pattern's root is what follows the Attention, not the Attention itself.
        return self._record(
            context, attention, lambda: self._plan_for(context, attention, **bindings)
        )

    def _plan_for(
        self,
        context,
        attention: ir.Node,
        *,
        query_BNSD,
        key_BNTD,
        value_BNTD,
        mask,
        shape,
        row_has_keys=None,
        zero=None,
        same_shape=None,
        **_,
    ) -> _Plan:
        check_opset(context, attention)
        if any(v is not None for v in attention.inputs[4:]):
            raise MatchFailureError(
                "has past_key/past_value/nonpad_kv_seqlen inputs: not an HF repeat_kv layer",
                attention,
            )
        if any(out.uses() or out.is_graph_output() for out in attention.outputs[1:]):
            raise MatchFailureError("present or qk_matmul outputs are used", attention)
        if mask is None:
            raise MatchFailureError("has no mask input", attention)
        attrs = attention.attributes
        if attrs.get_int("is_causal", 0):
            raise MatchFailureError(
                "is_causal=1 with 4-D HF inputs: not the exported pattern (mask carries it)",
                attention,
            )
        _single_reader_chain(attention, self._steps)
        if self.single_query_reshape and not _is_identity_reshape(attention.outputs[0], same_shape):
            raise MatchFailureError(
                "Reshape after the Attention changes its [B, N, S, D] shape", attention
            )
        key = match_repeated_cache(context, key_BNTD)
        value = match_repeated_cache(context, value_BNTD)
        if (key.kv_num_heads, key.num_heads) != (value.kv_num_heads, value.num_heads):
            raise MatchFailureError("K and V are repeated differently", attention)
        num_heads = _static_dim(query_BNSD, 1)
        if num_heads is not None and num_heads != key.num_heads:
            raise MatchFailureError(
                f"query has {num_heads} heads, the repeated K has {key.num_heads}", attention
            )
        head_size = _head_size(query_BNSD, key, value)
        mask_form = match_position_mask(context, mask)
        trimmed = None
        if mask_form.key_shift is not None:
            trimmed = _check_trimmed_caches(mask_form.key_shift, key, value, query_BNSD)
        if self.zeroes_masked_rows:
            _check_row_zeroing(row_has_keys, zero, mask_form)
        _check_output_shape(shape, key.num_heads * head_size, query_BNSD)
        if self.inputs.exact_padding and mask_form.attention_mask is not None:
            raise MatchFailureError(
                "--exact-padding is not implemented for HF position masks", attention
            )
        dtype = check_dtype(self.facts(context), query_BNSD, key.cache_BNSH, value.cache_BNSH)
        shared = not _is_first_reader(attention, key.cache_BNSH)
        if not shared and self.layers != "all":
            raise MatchFailureError(
                "a layer with its own cache (source of its repeat_kv); --layers shared leaves it",
                attention,
            )
        appended = None
        if not shared and trimmed is not None:
            appended = (trimmed[0].appended(), trimmed[1].appended())
        elif not shared:
            found = [match_appended_cache(c.cache_BNSH) for c in (key, value)]
            if all(isinstance(f, AppendedCache) for f in found):
                appended = (found[0], found[1])
                if (appended[0].past_BNPD is None) != (appended[1].past_BNPD is None):
                    raise MatchFailureError(
                        "one of K/V appends to a past, the other does not", attention
                    )
        windowed = mask_form.local_window_size is not None
        decision = self._form(attention, dtype, head_size, windowed)
        if decision.form is None:
            raise MatchFailureError(
                f"no GroupQueryAttention form qualifies: {decision.reason}", attention
            )
        if decision.form not in _FORMS:
            raise MatchFailureError(
                f"form {decision.form} is not built for HF exports (only {', '.join(_FORMS)})",
                attention,
            )
        heads = AttentionHeads(
            key.num_heads,
            key.kv_num_heads,
            attrs["scale"].as_float() if "scale" in attrs else None,
            attrs.get_float("softcap", 0.0),
        )
        # Without attention_mask every row holds T keys, so the split form's cut at T - S
        # is every row's; with one (padding) or a trimmed cache it is not, and GQA keeps
        # refusing those calls there (the warning says so).
        batched_chunks = (
            mask_form.attention_mask is None
            and trimmed is None
            and _takes_batched_chunks(query_BNSD, key, appended, shared)
        )
        if batched_chunks and shared and decision.form != "past":
            raise MatchFailureError(
                f"form {decision.form} refuses batched calls of several tokens after a past, "
                "which this graph takes; only the past form has a split fallback",
                attention,
            )
        return _Plan(
            attention,
            key,
            value,
            mask_form,
            heads,
            head_size,
            dtype,
            decision.form,
            shared,
            context.graph_or_function,
            appended,
            trimmed[0] if trimmed is not None else None,
            batched_chunks,
        )

    def rewrite(self, op, query_BNSD, output, **bindings):
        plan: _Plan = self._take_plan()
        reshape_output = _root_output(output, self._steps)
        query_BSH = _merged_query(
            op, query_BNSD, self._merged_shape(op, plan.heads.num_heads, plan)
        )
        if plan.appended is not None:
            inputs = self._native_inputs(op, plan)
            form, num_outputs = NATIVE_FORM, 3
        else:
            inputs = self._past_inputs(op, plan)
            form = plan.form
            num_outputs = 1 if plan.form == "past" else 3
        style = plan.mask.style
        if plan.mask.attention_mask is None:
            style += NO_ATTENTION_MASK_STYLE_SUFFIX
        record = LayerRewrite(
            node=node_label(plan.attention),
            rule=f"{self.name}/{'shared' if plan.shared else 'own-cache'}-"
            f"{'sliding' if plan.mask.local_window_size else 'full'}",
            form=form,
            local_window_size=plan.mask.local_window_size,
            mask_style=style,
            source=(plan.key.cache_BNSH.name or ""),
            dtype=dtype_name(plan.dtype),
            head_size=plan.head_size,
            batched_chunks=(
                (OWN_CHUNKS if plan.appended is not None else SHARED_CHUNKS)
                if plan.batched_chunks
                else ""
            ),
        )
        _record_padding_contract(self.log, record)
        attributes = gqa_attributes(plan.heads, plan.head_size, plan.mask, exact_padding=False)
        if plan.batched_chunks and plan.appended is None:
            (result,) = self._finish(
                op,
                plan.attention,
                [self._shared_if(op, plan, query_BSH, attributes, reshape_output)],
                [reshape_output],
                record,
            )
            self.record.replaced_nodes.append(reshape_output.producer())
            return result
        results = (
            self._emit(
                op, plan.attention, [query_BSH, *inputs], attributes, [reshape_output], record, 1
            )
            if num_outputs == 1
            else self._emit_with_presents(
                op, plan, [query_BSH, *inputs], attributes, reshape_output, record
            )
        )
        # The dead-code sweep starts from the output Reshape: it walks up through the
        # Transpose (and Where) to the Attention and its mask and repeat chains.
        reshape = reshape_output.producer()
        assert reshape is not None
        self.record.replaced_nodes.append(reshape)
        return results[0]

    def _shared_if(
        self, op, plan: _Plan, query_BSH: ir.Value, attributes: dict, output: ir.Value
    ) -> ir.Value:
        """The past form where GQA takes it, the split form with query_seqlens otherwise."""
        empty, _, _, _, seqlens_k, total = self._past_inputs(op, plan)
        assert empty is not None and seqlens_k is not None and total is not None

        def gqa(builder, inputs: list[ir.Value | None], num_outputs: int) -> ir.Value:
            return self._gqa_node(builder, inputs, attributes, num_outputs)[0]

        return shared_if(
            op,
            query_BSH,
            (plan.key.cache_BNSH, plan.value.cache_BNSH),
            seqlens_k,
            total,
            empty,
            plan.heads.kv_num_heads * plan.head_size,
            gqa,
            output_type=output.type,
            name=output.name or node_label(plan.attention),
        )

    def _merged_shape(self, op, heads: int, plan: _Plan) -> ir.Value:
        hidden = heads * plan.head_size
        return self.inputs.of(plan.graph).cached(
            op,
            ("merged_heads", hidden),
            lambda: op.Constant(value=ir.tensor(np.array([0, 0, hidden], dtype=np.int64))),
        )

    def _lengths(self, op, plan: _Plan, cache: ir.Value) -> tuple[ir.Value, ir.Value]:
        inputs = self.inputs.of(plan.graph)
        if plan.mask.attention_mask is not None:
            if plan.trimmed is not None:
                return inputs.trimmed_lengths(
                    op, plan.mask.attention_mask, plan.trimmed.kept_BNKD, plan.trimmed.new_BSND
                )
            return inputs.sequence_lengths(op, plan.mask.attention_mask)
        # Without padding every one of the cache's T_c entries is valid, trimmed or not.
        return inputs.lengths_from_cache(op, cache)

    def _past_inputs(self, op, plan: _Plan) -> list[ir.Value | None]:
        """`past` form: empty new K/V, the cache as past_key/past_value."""
        key_BNTD, value_BNTD = plan.key.cache_BNSH, plan.value.cache_BNSH
        hidden = plan.heads.kv_num_heads * plan.head_size
        batch_source = plan.mask.attention_mask or key_BNTD
        empty = self.inputs.of(plan.graph).empty_kv(op, batch_source, hidden, plan.dtype)
        return [empty, empty, key_BNTD, value_BNTD, *self._lengths(op, plan, key_BNTD)]

    def _native_inputs(self, op, plan: _Plan) -> list[ir.Value | None]:
        """Native form: this call's K/V as [B, S, Nkv*D], the graph's past (if any); GQA
        appends and its presents replace the export's Concat (redirect_caches())."""
        assert plan.appended is not None
        key, value = plan.appended
        merged = self._merged_shape(op, plan.heads.kv_num_heads, plan)
        new_key = op.Reshape(key.new_BSND, merged)
        new_value = op.Reshape(value.new_BSND, merged)
        if plan.mask.attention_mask is not None:
            lengths = self._lengths(op, plan, key.cache_BNTD)
        else:
            lengths = self.inputs.of(plan.graph).appended_lengths(op, key.past_BNPD, key.new_BSND)
        inputs = [new_key, new_value, key.past_BNPD, value.past_BNPD, *lengths]
        if plan.batched_chunks:
            # The query input is prepended by the caller: index 0 is GQA's query.
            full = with_query_seqlens([None, *inputs], query_seqlens(op, lengths[0], new_key))
            return full[1:]
        return inputs

    def _emit_with_presents(self, op, plan, inputs, attributes, reshape_output, record):
        results = self._emit(op, plan.attention, inputs, attributes, [reshape_output], record, 3)
        # _emit returns only the replaced outputs; the presents are the GQA node's others.
        gqa = results[0].producer()
        assert gqa is not None
        if plan.appended is not None:
            for appended, present in zip(plan.appended, gqa.outputs[1:3], strict=True):
                self._cache_redirects[-1].append((appended.cache_BNTD, present, appended.node))
        return results

    def setup(self) -> None:
        super().setup()
        self._cache_redirects.append([])

    def cleanup(self) -> None:
        """Once a graph is rewritten: readers of each replaced cache (graph outputs, the
        shared layers matched later in the graph) read the GQA present instead, under the
        cache's name."""
        super().cleanup()
        for cache, present, node in self._cache_redirects.pop():
            # A graph output needs its type (the ONNX checker refuses one without); the
            # present holds exactly the cache's entries.
            present.dtype = cache.dtype
            present.shape = cache.shape.copy() if cache.shape is not None else None
            cache.replace_all_uses_with(present, replace_graph_outputs=True)
            if cache.name:
                self.record.renames.append((present, cache.name))
            self.record.replaced_nodes.append(node)


def _check_trimmed_caches(
    shift: KeyShift, key: RepeatedCache, value: RepeatedCache, query_BNSD: ir.Value
) -> tuple[TrimmedCache, TrimmedCache]:
    """The mask numbers its key columns from Max(0, P - keep); GQA numbers the cache's
    slots from 0 and puts the S queries on its last S slots. Both agree when the cache is
    Concat(Slice(past, -keep), new) with len(past) = P and S new entries: slot j then
    holds position P - min(P, keep) + j = Max(0, P - keep) + j, and the queries P + [0, S)
    are its last S slots. P and S are proven as the graph declares them (the same
    symbolic dims on the past, the shift's Shape source, the new entries and the query)."""
    past_source = _past_length_source(shift.past_length)
    if past_source is None:
        raise MatchFailureError(
            "key shift's P is not Squeeze(Shape(past, start=2, end=3)) of a graph input", query_BNSD
        )
    found = []
    for cache in (key, value):
        try:
            trimmed = match_trimmed_cache(cache.cache_BNSH, shift.keep)
        except MatchFailureError as failure:
            raise MatchFailureError(
                f"key positions are shifted by Max(0, P - {shift.keep}): {failure.reason}",
                *failure.failure_sources,
            ) from None
        past_dim = trimmed.past_BNPD.shape[2] if trimmed.past_BNPD.shape is not None else None
        source_dim = past_source.shape[2] if past_source.shape is not None else None
        declared = isinstance(past_dim, int) or (
            isinstance(past_dim, ir.SymbolicDim) and past_dim.value is not None
        )
        if past_source is not trimmed.past_BNPD and (not declared or past_dim != source_dim):
            raise MatchFailureError(
                f"key shift's P is the length of {past_source.name}, not declared equal to "
                f"that of {trimmed.past_BNPD.name} (the past the cache trims)",
                query_BNSD,
            )
        new_dim = _static_or_symbolic(trimmed.new_BSND, 1)
        if new_dim is None or new_dim != _static_or_symbolic(query_BNSD, 2):
            raise MatchFailureError(
                f"cache {cache.cache_BNSH.name} appends entries not declared as many as "
                "the queries (S)",
                query_BNSD,
            )
        found.append(trimmed)
    return found[0], found[1]


def _static_or_symbolic(value: ir.Value, axis: int) -> int | ir.SymbolicDim | None:
    shape = value.shape
    if shape is None or shape.rank() <= axis:
        return None
    dim = shape[axis]
    if isinstance(dim, ir.SymbolicDim) and dim.value is None:
        return None
    return dim


def _past_length_source(length: ir.Value) -> ir.Value | None:
    """X for Squeeze(Shape(X, start=2, end=3)), X a 4-D graph input."""
    squeeze = length.producer()
    if squeeze is None or squeeze.op_type != "Squeeze" or squeeze.inputs[0] is None:
        return None
    shape = squeeze.inputs[0].producer()
    if shape is None or shape.op_type != "Shape" or shape.inputs[0] is None:
        return None
    attrs = shape.attributes
    if attrs.get_int("start", 0) != 2 or attrs.get_int("end", -100) != 3:
        return None
    source = shape.inputs[0]
    if not _values.is_graph_input(source) or source.shape is None or source.shape.rank() != 4:
        return None
    return source


def _takes_batched_chunks(
    query_BNSD: ir.Value,
    key: RepeatedCache,
    appended: tuple[AppendedCache, AppendedCache] | None,
    shared: bool,
) -> bool:
    """Whether the graph's declared shapes let a call have B > 1 and S > 1 after a past: a
    static batch or S of 1 (transformers' default export) or no past rules it out."""
    if any(_static_dim(query_BNSD, axis) == 1 for axis in (0, 2)):
        return False
    if not shared:
        return appended is not None and appended[0].past_BNPD is not None
    found = match_appended_cache(key.cache_BNSH)
    return isinstance(found, AppendedCache) and found.past_BNPD is not None


def _static_dim(value: ir.Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or shape.rank() <= axis or not isinstance(shape[axis], int):
        return None
    return shape[axis]


def _head_size(query: ir.Value, key: RepeatedCache, value: RepeatedCache) -> int:
    sizes = {s for s in (key.head_size, value.head_size, _static_dim(query, 3)) if s is not None}
    if not sizes:
        raise MatchFailureError(
            "head size unknown (no static D on the query, the cache or the repeat shapes)", query
        )
    if len(sizes) > 1:
        raise MatchFailureError(
            f"inconsistent head sizes {sorted(sizes)} between query, K and V", query
        )
    return sizes.pop()


def _single_reader_chain(attention: ir.Node, steps: tuple[str, ...]) -> None:
    """The values between the Attention and the output Reshape must have no other reader."""
    value = attention.outputs[0]
    for step in (*steps, "Transpose"):
        if len(value.uses()) != 1 or value.is_graph_output():
            raise MatchFailureError(
                f"Attention output is read by more than the {step} it flows into", attention
            )
        (use,) = value.uses()
        value = use.node.outputs[0]
    if len(value.uses()) != 1 or value.is_graph_output():
        raise MatchFailureError(
            "the transposed Attention output is read by more than the output Reshape", attention
        )


def _is_identity_reshape(attention_BNSD: ir.Value, same_shape: ir.Value) -> bool:
    """Reshape(x, [1, -1, 1, D]) of a static [1, N, 1, D] x gives x's own shape."""
    shape = attention_BNSD.shape
    target = shape_elements(same_shape)
    if shape is None or target is None or not all(isinstance(d, int) for d in shape):
        return False
    dims = list(shape)
    if len(target) != len(dims) or target.count(-1) > 1 or None in target:
        return False
    known = int(np.prod([d for d in target if d != -1]))
    resolved = [d if d != -1 else int(np.prod(dims)) // max(known, 1) for d in target]
    return resolved == dims


def _root_output(output: ir.Value, steps: tuple[str, ...]) -> ir.Value:
    value = output
    for _ in range(len(steps) + 2):
        (use,) = value.uses()
        value = use.node.outputs[0]
    return value


def _check_row_zeroing(row_has_keys: ir.Value, zero: ir.Value, mask: PositionMask) -> None:
    """Where(Less(ReduceSum(Cast(allowed), [-1]), 1), 0, attention) is the identity when no
    row is fully masked: true for a causal mask whose queries are the last S keys, without
    padding (check_positions established the alignment)."""
    if _values.scalar_float(zero) != 0.0:
        raise MatchFailureError("output Where does not write 0 for masked rows", row_has_keys)
    less = row_has_keys.producer()
    if less is None or less.op_type != "Less" or _values.scalar_float(less.inputs[1]) != 1.0:
        raise MatchFailureError("output Where's condition is not Less(row sum, 1)", row_has_keys)
    reduce = less.inputs[0].producer() if less.inputs[0] is not None else None
    if reduce is None or reduce.op_type != "ReduceSum":
        raise MatchFailureError(
            "output Where's condition is not a row sum of the mask", row_has_keys
        )
    axes = _values.constant_array(reduce.inputs[1]) if len(reduce.inputs) > 1 else None
    if axes is None or axes.reshape(-1).tolist() not in ([-1], [3]):
        raise MatchFailureError("output Where's row sum is not over the key axis", row_has_keys)
    cast = reduce.inputs[0].producer() if reduce.inputs[0] is not None else None
    if cast is None or cast.op_type != "Cast" or cast.inputs[0] is None:
        raise MatchFailureError("output Where's row sum does not count the mask", row_has_keys)
    if allowed_keys(cast.inputs[0]) is not mask.allowed:
        raise MatchFailureError(
            "output Where's row sum counts another mask than the Attention's", row_has_keys
        )
    if mask.attention_mask is not None:
        raise MatchFailureError(
            "output Where zeroes fully masked rows and the mask has padding (rows can be empty)",
            row_has_keys,
        )


def _check_output_shape(shape: ir.Value, hidden: int, query_BNSD: ir.Value) -> None:
    """Reshape(Transpose(attention_BNSD)) must be the [B, S, N*D] GQA writes: N*D spelled
    out (or -1 once B and S are), B and S as 0 (copy), their static size, -1, or read off
    dims 0 and 1 of a [B, S] graph input (input_ids, attention_mask)."""
    dims = shape_elements(shape)
    if dims is None or len(dims) != 3:
        raise MatchFailureError(f"output Reshape is not to a 3-D [B, S, {hidden}]", shape)
    reshape = shape.uses()[0].node if shape.uses() else None
    copies = reshape is not None and not reshape.attributes.get_int("allowzero", 0)
    producer = shape.producer()
    parts = list(producer.inputs) if producer is not None else [None, None, None]
    static = (_static_dim(query_BNSD, 0), _static_dim(query_BNSD, 2))  # B, S
    proven = [
        (copies and dims[i] == 0)
        or _is_graph_input_dim(parts[i], i, query_BNSD)
        or (static[i] is not None and dims[i] == static[i])
        for i in (0, 1)
    ]
    if dims[2] == hidden:
        if (proven[0] and (proven[1] or dims[1] == -1)) or (proven[1] and dims[0] == -1):
            return
    elif dims[2] == -1 and all(proven):
        return
    raise MatchFailureError(f"output Reshape {dims} is not provably [B, S, {hidden}]", shape)


def _is_graph_input_dim(part: ir.Value | None, axis: int, query_BNSD: ir.Value) -> bool:
    """Dim `axis` (0: B, 1: S) read off a [B, S] graph input (input_ids, attention_mask), or
    B read off a 4-D graph input (a past cache) whose declared batch dim is the query's."""
    producer = part.producer() if part is not None else None
    if producer is None or producer.op_type != "Shape":
        return False
    source = producer.inputs[0]
    attrs = producer.attributes
    if (
        source is None
        or not _values.is_graph_input(source)
        or source.shape is None
        or attrs.get_int("start", 0) != axis
        or attrs.get_int("end", -100) != axis + 1
    ):
        return False
    if source.shape.rank() == 2:
        return True
    query = query_BNSD.shape
    return (
        axis == 0
        and source.shape.rank() == 4
        and query is not None
        and isinstance(source.shape[0], ir.SymbolicDim)
        and source.shape[0] == query[0]
    )


def _is_first_reader(attention: ir.Node, cache: ir.Value) -> bool:
    """Whether `attention` is the first Attention, in graph order, reading `cache` through a
    repeat: the source layer, whose K projection produced it."""
    graph = attention.graph
    if graph is None:
        return True
    readers = set()
    frontier = [cache]
    for _ in range(3):  # Unsqueeze -> Expand -> Reshape
        frontier = [u.node.outputs[0] for v in frontier for u in v.uses()]
    for value in frontier:
        readers.update(u.node for u in value.uses() if u.node.op_type == "Attention")
    for node in graph:
        if node in readers:
            return node is attention
    return True


def _merged_query(op, query_BNSD: ir.Value, merged: ir.Value) -> ir.Value:
    """[B, N, S, D] -> [B, S, N*D]; from the BSND value when the query is its Transpose."""
    producer = query_BNSD.producer()
    if (
        producer is not None
        and producer.op_type == "Transpose"
        and list(producer.attributes.get_ints("perm", [])) == [0, 2, 1, 3]
    ):
        assert producer.inputs[0] is not None
        return op.Reshape(producer.inputs[0], merged)
    return op.Reshape(op.Transpose(query_BNSD, perm=[0, 2, 1, 3]), merged)


def hf_rules(
    choose_form: FormChooser = always_past,
    *,
    layers: str,
    exact_padding: bool = False,
    inputs: GQAInputs | None = None,
    facts: ShapeFacts | None = None,
    log: RewriteLog | None = None,
    decisions: LayerDecisions | None = None,
) -> list[pattern.RewriteRule]:
    """Every variant (with or without the row-zeroing Where, the single-token Reshape),
    sharing one GQAInputs, one log and one table of decisions."""
    inputs = inputs or GQAInputs(exact_padding=exact_padding)
    decisions = decisions or LayerDecisions.asking(choose_form)
    return [
        HFAttentionToGQA.rule(
            choose_form,
            zeroes_masked_rows=where,
            single_query_reshape=single,
            layers=layers,
            inputs=inputs,
            facts=facts,
            log=log,
            decisions=decisions,
        )
        for where in (True, False)
        for single in (False, True)
    ]


BATCH_1_ONLY = PaddingContract.BATCH_1_ONLY

_NO_MASK_WARNING = (
    "the graph has no attention_mask input (Hugging Face exporter): the rewritten layers "
    "take seqlens_k/total_sequence_length from the cache length, which is exact for calls "
    "without padding, the only ones the graph can express (padding contract batch-1-only: "
    "several rows run only if none is padded); "
)
_CHUNKS_KEPT = (
    "batched calls of several tokens after a past, which this graph's shapes allow, run as "
    "in the original: GroupQueryAttention gets query_seqlens (onnxruntime >= 1.32.0 loads "
    "it) and KV-shared layers take the split form for those calls only"
)
_CHUNKS_RULED_OUT = (
    "GroupQueryAttention's limit (several tokens after a past need batch 1) costs nothing "
    "here: this graph's declared shapes fix batch or S at 1, or it has no past"
)


def _record_padding_contract(log: RewriteLog, rewrite: LayerRewrite) -> None:
    """A layer rewritten without an attention_mask to read holds the model to batch-1-only
    (rows of one length); the warning says whether batched chunks still run as exported."""
    if not rewrite.mask_style.endswith(NO_ATTENTION_MASK_STYLE_SUFFIX):
        return
    earlier = log.padding_contract
    kept = bool(rewrite.batched_chunks) or (earlier is not None and earlier.chunks_kept)
    log.padding_contract = PaddingRequirement(
        BATCH_1_ONLY, _NO_MASK_WARNING + (_CHUNKS_KEPT if kept else _CHUNKS_RULED_OUT), kept
    )
