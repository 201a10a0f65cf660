"""Hugging Face exports' ``Attention`` layers (4-D, repeated cache) -> ``GroupQueryAttention``.

Dimension letters: B batch, S query length, P past length, T = P + S, N query heads, Nkv KV
heads, g = N / Nkv, D head size, W sliding window.

What the exports contain (read with onnx-ir from ``../shared/corpus/hf-exporter-opset23/``,
transformers 5.24 ``export_for_generation``, torch 2.13, opset 23, 8 layers, N=4, Nkv=1,
D=32 sliding / 64 full, W=8; and from torch.onnx dynamo opset 24 exports of the same config,
``fixtures/hf_export.py``)::

    query_BNSD = Transpose(rotated_BSND, perm=[0, 2, 1, 3])
    key_BNTD   = Reshape(Expand(Unsqueeze(cache_BNTD, [2]), Concat(B, Nkv, g, T, D)),
                         [B, N, -1, D])                       # repeat_kv (_repeated_cache)
    attention  = Attention(query_BNSD, key_BNTD, value_BNTD, mask)   # is_causal=0, scale=1.0,
                                                # softcap=0, no q_num_heads/kv_num_heads
    [zeroed    = Where(Less(ReduceSum(Cast(allowed), [-1]), 1), 0.0, attention)]
    output_BSH = Reshape(Transpose(zeroed | attention, perm=[0, 2, 1, 3]), [B, -1, N*D])

- The cache is the layer's present: ``Concat(input.cache.layers.i.keys, new_BNSD, axis=-2)``
  in the decode graph (a graph output ``output.cache.layers.i.keys``), the Transpose of the
  new keys itself in the prefill graph (graph output ``cache.layers.i.keys``).
- KV-shared layers (4-7) read the *same* repeated value as their source layer (the
  exporters de-duplicate ``repeat_kv``): layers 4 and 6 read layer 3's ``view_26/view_27``,
  layers 5 and 7 read layer 2's ``view_19/view_20``. The first reader of a cache in graph
  order is its source (its own K projection feeds the cache); every later reader is shared.
- Masks (``_position_masks``): sliding ``Mul(Cast(Not(And(And(True, Greater(k_pos,
  Sub(q_pos, 8))), LessOrEqual(k_pos, q_pos)))), -3.4028235e38)``, full the same with
  ``LessOrEqual`` alone; one mask value per layer type, shared by 6 resp. 2 layers; decode
  wraps the boolean in ``Expand(.., Concat([1], [1], S, T))``. No attention_mask input in
  the transformers export (batch fixed at 1); torch.onnx adds a padding term gathered from
  attention_mask and passes the boolean mask directly.
- The transformers export zeroes fully masked query rows after the Attention (the ``Where``
  above, from SDPA's math fallback). With a causal term and queries that are the last S key
  positions, every row sees its own key, so the row sum is >= 1 and the Where is the
  identity; it is fused away only then (no padding term).
- ``input.cache.layers.{0,1,3}._sliding_window_tensor`` (int64 scalars) only pass through
  ``Identity`` to ``output.cache.layers.*._sliding_window_tensor``; the rule leaves them.

The replacement is the ``past`` form (SPEC.md section 3): ``GroupQueryAttention(query_BSH,
empty, empty, cache_BNTD (key), cache_BNTD (value), seqlens_k, total_sequence_length)`` with
an in-graph empty [B, 0, Nkv*D] key/value, ``num_heads = N`` and ``kv_num_heads = Nkv`` from
the repeat, ``scale`` copied, ``local_window_size = W``, no presents. Its [B, S, N*D] output
replaces ``output_BSH``; the query is merged to [B, S, N*D] from its BSND input. Lengths come
from attention_mask when the mask reads it (``GQAInputs``), else from the cache: every row
then has T valid keys, ``total_sequence_length = T = Shape(cache)[2]``, ``seqlens_k = T - 1``
(no padding exists without attention_mask: "batch-1-only", rows of one length). Where the
graph's shapes take several rows of several tokens after a past, which GQA refuses by
default, ``rules._batched_chunks`` keeps them: ``query_seqlens`` for the native form, an
``If`` to the split form for shared layers.

Source layers (``--layers all``) whose cache is ``Concat(past, Transpose(new_BSND), axis=2)``
(prefill: ``Transpose(new_BSND)``) become GQA's native form instead: this call's K/V merged to
[B, S, Nkv*D], the graph's past input, ``T = P + S``; after the rule set ran,
``redirect_caches()`` makes every reader of the export's cache (graph outputs, the shared
layers' past) read GQA's present under the same name, and the Concat dies. A cache built
otherwise is read as a past (``past`` form); a Concat on another axis is refused.

torch.onnx decode graphs of transformers' DynamicSlidingWindowLayer
(``fixtures/hf_torch_decode_opset24.onnx``, traced at B=2, P=6, S=3; read with onnx-ir).
P is ``Squeeze(Shape(past_key_values.1.key, start=2, end=3))`` (one past stands for all:
they are declared with the same symbolic dim ``past``), S ``Squeeze(Shape(input_ids)[1])``.
A sliding layer's cache and mask are (W = 8, keep = W - 1 = 7)::

    cache_BNTD = Concat(Slice(past_key_values.i.key, [-7], [INT64_MAX], [2], [1]),
                        Transpose(new_BSND, [0, 2, 1, 3]), axis=-2)     # T_c = min(P, 7) + S
    present.i.key = Slice(cache_BNTD, [-7], [INT64_MAX], [2], [1])        # graph output
    dropped    = Max(0, Add(-7, P))                             # entries the Slice dropped
    key_pos    = Add(Range(0, Add(P, S), 1), dropped)                      # [P + S]
    query_pos  = Add(Range(0, S, 1), P)
    allowed    = And(And(True, And(And(True, Greater(key_pos, Sub(query_pos, 8))),
                     LessOrEqual(key_pos, query_pos))),
                     GatherND(Cast(attention_mask, bool), [b, key_pos]))
    mask       = Expand(allowed, Concat(B, [1], S, Add(P, S)))

The repeat (``Expand`` to ``[B, 1, 4, Add(P + S, -Max(0, P - 7)), 16]``) and the shared
layers 4 and 5 read ``cache_BNTD`` of layer 3. Cache slot j holds position
``P - min(P, 7) + j = dropped + j``, so mask column j is slot j and the queries P + [0, S) are
the cache's last S slots: GQA over ``cache_BNTD`` with ``local_window_size = W`` sees what
the mask allows. The mask is traced at P < W, though: it keeps P + S columns where the cache
has min(P, 7) + S, and from P = W on the GatherND reads attention_mask out of bounds
(*measured*: ``invalid index found``) -- the original runs only for P <= W - 1, where nothing
is dropped. ``_position_masks`` reads the shift (``KeyShift``: keep and the P value, which must
be the query positions' P); ``_check_trimmed_caches`` then proves that K and V are
``Concat(Slice(past, -keep), Transpose(new))`` with the same keep, the past declared as long
as the shift's P source, the new entries as many as the queries. A wrong shift constant, a
Slice keeping another count, a shift without the Max or a past declared with another length
are refused with their reason. Lengths (``GQAInputs.trimmed_lengths``): the cache holds the
last T_c of the attention_mask's T positions, so ``total_sequence_length = T_c =
Shape(kept)[2] + S`` (kept = the Slice; read off the Concat's inputs, so the native form
below can replace the Concat) and ``seqlens_k = ReduceSum(attention_mask) - 1 - (T - T_c)``,
T = Shape(attention_mask)[1]; below W this
is the untrimmed T, and fed its own trimmed presents back the rewritten pair stays
cache-consistent beyond W, where the original fails.

Own-cache sliding layers (``--layers all``) use GQA's native form too: this call's K/V, the
kept entries ``Slice(past, -keep)`` as past_key/past_value, the same lengths. GQA's present
then has exactly the T_c slots of the export's Concat (*measured*: equal presents), so
``redirect_caches()`` puts it in the Concat's place and the export's own trimming
``Slice(.., -keep)`` still writes ``present.i.key``: the trimmed present is reproduced, not
re-derived. GQA writes row b's new entries after its valid ones (seqlens_k), so with right
padding every layer follows GQA's prefix convention (the full layers already did); reading
the export's Concat as a past instead would give the shared layers padding where the new key
is (*measured*: a right-padded decode step of 2 then differs by 0.43-0.68 from each row
alone).

Single-token decode graphs (transformers' default decode component, S fixed at 1) fold the
query Range to ``[0]`` (T = P + 1) and write ``Reshape(x, [1, -1, 1, D])`` before the output
Transpose: a rule variant accepts that Reshape when it provably keeps [1, N, 1, D].
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
    LayerSkip,
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
from rewriter.rules._failure import MatchFailureError
from rewriter.rules._gqa_inputs import GQAInputs
from rewriter.rules._log import RewriteLog, RuleLog
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
from rewriter.rules.nonshared_attention import NATIVE_FORM

__all__ = [
    "NO_ATTENTION_MASK_STYLE_SUFFIX",
    "HFAttentionToGQA",
    "hf_padding_contract",
    "hf_rules",
    "refine_skips",
]

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
    ) -> None:
        super().__init__(
            "HFAttentionToGQA"
            + ("/where" if zeroes_masked_rows else "")
            + ("/s1" if single_query_reshape else ""),
            choose_form,
            exact_padding=exact_padding,
            inputs=inputs,
            facts=facts,
            log=log,
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
        decision = self.choose_form(dtype_name(dtype), head_size, windowed)
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
    choose_form: FormChooser,
    *,
    layers: str,
    exact_padding: bool = False,
    inputs: GQAInputs | None = None,
    facts: ShapeFacts | None = None,
    log: RewriteLog | None = None,
) -> list[pattern.RewriteRule]:
    """Every variant (with or without the row-zeroing Where, the single-token Reshape),
    sharing one GQAInputs and one log."""
    inputs = inputs or GQAInputs(exact_padding=exact_padding)
    return [
        HFAttentionToGQA.rule(
            choose_form,
            zeroes_masked_rows=where,
            single_query_reshape=single,
            layers=layers,
            inputs=inputs,
            facts=facts,
            log=log,
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


def hf_padding_contract(rewrites: list[LayerRewrite]) -> tuple[str, str] | None:
    """("batch-1-only", warning) when a rewritten layer had no attention_mask to read."""
    if any(r.mask_style.endswith(NO_ATTENTION_MASK_STYLE_SUFFIX) for r in rewrites):
        kept = any(r.batched_chunks for r in rewrites)
        return BATCH_1_ONLY, _NO_MASK_WARNING + (_CHUNKS_KEPT if kept else _CHUNKS_RULED_OUT)
    return None


def refine_skips(skipped: list[LayerSkip], hf_logs: list[RuleLog]) -> list[LayerSkip]:
    """The HF rules' reason for a skipped Attention they examined: their pattern (4-D
    inputs, output Reshape) matched, so their reason says more than the 3-D rules'."""
    reasons = {label: skip.reason for log in hf_logs for label, skip in log.skips.items()}
    return [LayerSkip(s.node, reasons.get(s.node, s.reason)) for s in skipped]
