"""GroupQueryAttention inputs that every rewritten layer of a graph shares.

seqlens_k, total_sequence_length, the empty [B, 0, Nkv*D] key/value of the `past` form and
the finite bias of --exact-padding are built once per graph (or taken from the model's own
GQA layers) and read by all rewritten layers, as an exporter would write them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from rewriter.rules._mask_patterns import MaskForm

__all__ = ["GQAInputs", "GraphInputs"]

# Fully masked rows must stay finite: -inf biases turn into NaN in fp16 GQA (SPEC.md 4).
_EXACT_PADDING_NEGATIVE = {
    ir.DataType.FLOAT: float(np.finfo(np.float32).min),
    ir.DataType.FLOAT16: float(np.finfo(np.float16).min),
    ir.DataType.BFLOAT16: -3.3895313892515355e38,
}


class GQAInputs:
    """The inputs every rewritten layer of one rewrite run shares, per graph."""

    def __init__(self, *, exact_padding: bool) -> None:
        self.exact_padding = exact_padding
        # GQA nodes the rewrite created: not "the model's own" when looking for seqlens_k.
        self.created: set[ir.Node] = set()
        # Nodes built for inputs all layers share: not named after the layer that built them.
        self.shared: set[ir.Node] = set()
        # onnxscript visits a subgraph in the middle of its parent: one set of values each.
        self._graphs: dict[ir.Graph | ir.Function, GraphInputs] = {}

    def of(self, graph: ir.Graph | ir.Function) -> GraphInputs:
        """The shared inputs of `graph`, the graph a rewrite is building nodes in."""
        if graph not in self._graphs:
            self._graphs[graph] = GraphInputs(graph, self)
        return self._graphs[graph]


class GraphInputs:
    """seqlens_k, lengths, empty K/V, window slices and biases of one graph, built once."""

    def __init__(self, graph: ir.Graph | ir.Function, run: GQAInputs) -> None:
        self.graph = graph
        self.exact_padding = run.exact_padding
        self._created = run.created
        self._shared = run.shared
        self._values: dict[tuple[object, ...], ir.Value] = {}
        self._model_lengths: tuple[ir.Value, ir.Value] | None = None
        self._model_lengths_read = False

    def cached(self, op, key: tuple[object, ...], build: Callable[[], ir.Value]) -> ir.Value:
        """A value built once per graph and key with `op` (rules that share more inputs use
        it too); the nodes `build` adds to `op` are recorded as shared."""
        if key not in self._values:
            first = len(op.nodes)
            self._values[key] = build()
            self._shared.update(op.nodes[first:])
        return self._values[key]

    def sequence_lengths(self, op, attention_mask: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(seqlens_k int32 [B], total_sequence_length int32 [1]) for this attention_mask."""

        def total_length() -> ir.Value:
            return op.Cast(op.Shape(attention_mask, start=1, end=2), to=ir.DataType.INT32)

        def total() -> ir.Value:
            return self.cached(op, ("total", attention_mask), total_length)

        def seqlens_k() -> ir.Value:
            if self.exact_padding:
                # Every key slot is "valid" to GQA (new keys are appended after the past,
                # as Attention does); the bias does all of the masking.
                batch = op.Shape(attention_mask, start=0, end=1)
                one = op.Constant(value=ir.tensor(np.array([1], dtype=np.int32)))
                return op.Expand(op.Sub(total(), one), batch)
            mask = attention_mask
            if mask.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
                mask = op.Cast(mask, to=ir.DataType.INT64)
            valid = op.ReduceSum(mask, op.Constant(value_ints=[1]), keepdims=0)
            one = op.CastLike(op.Constant(value_int=1), valid)
            return op.Cast(op.Sub(valid, one), to=ir.DataType.INT32)

        if not self.exact_padding:
            existing = self._model_sequence_lengths()
            if existing is not None:
                return existing
        return self.cached(
            op, ("seqlens_k", attention_mask, self.exact_padding), seqlens_k
        ), total()

    def trimmed_lengths(
        self, op, attention_mask: ir.Value, kept_BNKD: ir.Value, new_BSND: ir.Value
    ) -> tuple[ir.Value, ir.Value]:
        """(seqlens_k, total_sequence_length) over a cache that holds only the last T_c of
        the attention_mask's T positions (a sliding cache trimmed by the export to the kept
        past entries plus S new ones): slot j is position T - T_c + j, so total = T_c =
        Shape(kept)[2] + S and each row's valid count drops by the T - T_c positions the
        cache no longer holds. Read before the append (GQA's native form may do it)."""
        seqlens_k, total = self.sequence_lengths(op, attention_mask)

        def cache_total() -> ir.Value:
            length = op.Add(op.Shape(kept_BNKD, start=2, end=3), op.Shape(new_BSND, start=1, end=2))
            return op.Cast(length, to=ir.DataType.INT32)

        key = ("trimmed", attention_mask, kept_BNKD, new_BSND)
        trimmed_total = self.cached(op, (*key, "total"), cache_total)

        def trimmed_seqlens() -> ir.Value:
            return op.Sub(seqlens_k, op.Sub(total, trimmed_total))

        return self.cached(op, (*key, "seqlens_k"), trimmed_seqlens), trimmed_total

    def lengths_from_cache(self, op, cache_BNSH: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(seqlens_k, total_sequence_length) for a graph without attention_mask: no row
        is padded, so every row has T = Shape(cache)[2] valid keys."""

        def total() -> ir.Value:
            return op.Cast(op.Shape(cache_BNSH, start=2, end=3), to=ir.DataType.INT32)

        def seqlens_k() -> ir.Value:
            one = op.Constant(value=ir.tensor(np.array([1], dtype=np.int32)))
            last = op.Sub(self.cached(op, ("cache_total", cache_BNSH), total), one)
            shape = cache_BNSH.shape
            if shape is not None and shape.rank() == 4 and shape[0] == 1:
                return last  # [1] is already [B]
            return op.Expand(last, op.Shape(cache_BNSH, start=0, end=1))

        return (
            self.cached(op, ("cache_seqlens_k", cache_BNSH), seqlens_k),
            self.cached(op, ("cache_total", cache_BNSH), total),
        )

    def appended_lengths(
        self, op, past_BNPD: ir.Value | None, new_BSND: ir.Value
    ) -> tuple[ir.Value, ir.Value]:
        """Lengths without attention_mask for a layer that appends S new keys to a past of
        P: T = P + S (no padding; read before the append, which GQA now does)."""

        def total() -> ir.Value:
            length = op.Shape(new_BSND, start=1, end=2)
            if past_BNPD is not None:
                length = op.Add(op.Shape(past_BNPD, start=2, end=3), length)
            return op.Cast(length, to=ir.DataType.INT32)

        def seqlens_k() -> ir.Value:
            one = op.Constant(value=ir.tensor(np.array([1], dtype=np.int32)))
            last = op.Sub(self.cached(op, ("appended_total", past_BNPD, new_BSND), total), one)
            shape = new_BSND.shape
            if shape is not None and shape.rank() == 4 and shape[0] == 1:
                return last
            return op.Expand(last, op.Shape(new_BSND, start=0, end=1))

        return (
            self.cached(op, ("appended_seqlens_k", past_BNPD, new_BSND), seqlens_k),
            self.cached(op, ("appended_total", past_BNPD, new_BSND), total),
        )

    def _model_sequence_lengths(self) -> tuple[ir.Value, ir.Value] | None:
        """The seqlens_k/total_sequence_length the model's own GQA layers already use.

        Reused only when every pre-existing GQA node of this graph agrees on one pair, so the
        rewritten layers follow exactly the padding convention the model already has.
        """
        if not self._model_lengths_read:
            self._model_lengths_read = True
            pairs = {
                (node.inputs[5], node.inputs[6])
                for node in self.graph
                if node.op_type == "GroupQueryAttention"
                and node.domain == "com.microsoft"
                and node not in self._created
                and len(node.inputs) > 6
            }
            pair = pairs.pop() if len(pairs) == 1 else None
            self._model_lengths = pair if pair and None not in pair else None
        return self._model_lengths

    def appended_window_start(
        self, op, attention_mask: ir.Value, local_window_size: int
    ) -> ir.Value:
        """The first key slot [1] any row's decode query can see in a sliding layer whose
        cache appends after the padding (Attention with past; rules._speed_choice
        .own_cache_fold): max(0, min_b(L_b) - W), L_b the valid keys of row b.

        Row b's query has position L_b - 1 (positions count valid keys, the exports'
        CumSum) and sees keys at positions >= L_b - W; a key's slot is at least its position
        (padding only pushes keys later), so no row sees a slot before the start. Read off
        the mask itself, whatever --exact-padding makes of seqlens_k. One per mask and W.
        """

        def start() -> ir.Value:
            mask = attention_mask
            if mask.dtype != ir.DataType.INT64:
                mask = op.Cast(mask, to=ir.DataType.INT64)
            valid = op.ReduceSum(mask, op.Constant(value_ints=[1]), keepdims=0)
            shortest = op.ReduceMin(valid, keepdims=1)
            reach = op.Sub(shortest, op.Constant(value_ints=[local_window_size]))
            return op.Max(reach, op.Constant(value_ints=[0]))

        return self.cached(op, ("appended_window_start", attention_mask, local_window_size), start)

    def window_start(
        self, op, attention_mask: ir.Value, query_BSD: ir.Value, local_window_size: int
    ) -> ir.Value:
        """The first key slot [1] of the window slice (see window_slice), once per mask and W."""
        seqlens_k, total_length = self.sequence_lengths(op, attention_mask)

        def start() -> ir.Value:
            int64 = ir.DataType.INT64
            query_length = op.Shape(query_BSD, start=1, end=2)
            shortest = op.ReduceMin(op.Cast(seqlens_k, to=int64), keepdims=1)  # min L_b - 1
            # min L_b - S - W + 1 = (min L_b - 1) - S - (W - 2)
            reach = op.Sub(
                op.Sub(shortest, query_length),
                op.Constant(value_ints=[local_window_size - 2]),
            )
            # T - S - 1
            limit = op.Sub(
                op.Sub(op.Cast(total_length, to=int64), query_length),
                op.Constant(value_ints=[1]),
            )
            return op.Max(op.Min(reach, limit), op.Constant(value_ints=[0]))

        return self.cached(op, ("window_start", attention_mask, local_window_size), start)

    def window_slice(
        self,
        op,
        attention_mask: ir.Value,
        query_BSD: ir.Value,
        local_window_size: int,
        cache_BNSH: tuple[ir.Value, ir.Value],
    ) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value]:
        """(key, value, seqlens_k, total_sequence_length) for a sliding layer that reads only
        the keys its window can reach.

        ONNX Runtime's CPU GroupQueryAttention reads all T keys of its past per query head even
        with local_window_size (measured: decode cost grows with T at W=512), so a KV-shared
        sliding layer at T=4096 costs as much as a full one. Queries sit at [L_b - S, L_b)
        (L_b the valid keys of row b, right padding), so no key before
        min_b(L_b) - S - W + 1 is visible to any of them: the cache is sliced from

            start = max(0, min(min_b(L_b) - S - W + 1, T - S - 1))

        and seqlens_k and total_sequence_length are shifted by the same start. Capping start at
        T - S - 1 keeps the sliced total above S: with total == S GQA would take the call for a
        first prompt. Prefill (S == T) slices nothing. One start per attention_mask and window,
        one slice per borrowed cache, shared by every layer that borrows it; S is read off the
        first such layer's query (every layer's query has the same S).
        """
        seqlens_k, total_length = self.sequence_lengths(op, attention_mask)
        first = self.window_start(op, attention_mask, query_BSD, local_window_size)

        def shifted(lengths: ir.Value) -> Callable[[], ir.Value]:
            return lambda: op.Sub(lengths, op.Cast(first, to=ir.DataType.INT32))

        key = ("window", attention_mask, local_window_size)
        sliced_seqlens = self.cached(op, (*key, "seqlens_k"), shifted(seqlens_k))
        sliced_total = self.cached(op, (*key, "total"), shifted(total_length))

        def sliced(cache: ir.Value) -> Callable[[], ir.Value]:
            end = np.iinfo(np.int64).max  # Slice clamps it to T
            return lambda: op.Slice(
                cache, first, op.Constant(value_ints=[end]), op.Constant(value_ints=[2])
            )

        key_BNSH, value_BNSH = cache_BNSH
        return (
            self.cached(op, (*key, key_BNSH), sliced(key_BNSH)),
            self.cached(op, (*key, value_BNSH), sliced(value_BNSH)),
            sliced_seqlens,
            sliced_total,
        )

    def fold_bias(
        self,
        op,
        lengths: tuple[ir.Value, ir.Value],
        local_window_size: int | None,
        dtype: ir.DataType,
    ) -> ir.Value:
        """The additive mask [B, 1, 1, T] of a folded decode step (rules._speed_choice.fold)
        over a cache of T keys, from GQA's lengths over that cache (`lengths` = (seqlens_k,
        total_sequence_length), sliced by the window slice where it applies).

        GQA's right-padding convention: the one query of row b sits at key slot seqlens_k[b],
        so key j is visible iff 0 <= seqlens_k[b] - j (< W on a sliding layer). One row for
        the G folded query heads, which are heads of the same token (fold_product repeats it
        where its op needs that). A finite large negative, as for --exact-padding: -inf gives
        NaN in fp16 where a row has no visible key.
        """
        seqlens_k, total = lengths

        def build() -> ir.Value:
            int32 = ir.DataType.INT32
            zero = op.Constant(value=ir.tensor(np.array(0, dtype=np.int32)))
            one = op.Constant(value=ir.tensor(np.array(1, dtype=np.int32)))
            key_slots = op.Range(zero, op.Squeeze(op.Cast(total, to=int32)), one)  # [T]
            distance = op.Sub(
                op.Unsqueeze(op.Cast(seqlens_k, to=int32), op.Constant(value_ints=[1])),
                op.Unsqueeze(key_slots, op.Constant(value_ints=[0])),
            )  # [B, T]
            visible = op.GreaterOrEqual(distance, zero)
            if local_window_size is not None:
                window = op.Constant(value=ir.tensor(np.array(local_window_size, np.int32)))
                visible = op.And(visible, op.Less(distance, window))
            zero_bias = op.Constant(value=ir.tensor(np.zeros((), dtype=dtype.numpy())))
            negative = op.Constant(
                value=ir.tensor(np.array(_EXACT_PADDING_NEGATIVE[dtype], dtype=dtype.numpy()))
            )
            bias = op.Where(visible, zero_bias, negative)
            return op.Unsqueeze(bias, op.Constant(value_ints=[1, 2]))

        return self.cached(op, ("fold_bias", seqlens_k, total, local_window_size, dtype), build)

    def empty_kv(self, op, attention_mask: ir.Value, hidden: int, dtype: ir.DataType) -> ir.Value:
        # Empty key/value must carry the real batch size: ORT checks it against the query.
        def build() -> ir.Value:
            batch = op.Shape(attention_mask, start=0, end=1)
            shape = op.Concat(batch, op.Constant(value_ints=[0, hidden]), axis=0)
            return op.ConstantOfShape(shape, value=ir.tensor(np.zeros(1, dtype=dtype.numpy())))

        return self.cached(op, ("empty_kv", attention_mask, hidden, dtype), build)

    def finite_bias(self, op, mask: MaskForm, dtype: ir.DataType) -> ir.Value:
        """The mask as GQA's 4-D attention_bias, with a finite large negative."""

        def build() -> ir.Value:
            allowed = mask.boolean_mask
            if not mask.boolean_mask_has_head_axis:
                # GQA's attention_bias is 4-D [B or 1, N or 1, S, T].
                allowed = op.Unsqueeze(allowed, op.Constant(value_ints=[1]))
            zero = op.Constant(value=ir.tensor(np.zeros((), dtype=dtype.numpy())))
            negative = op.Constant(
                value=ir.tensor(np.array(_EXACT_PADDING_NEGATIVE[dtype], dtype=dtype.numpy()))
            )
            return op.Where(allowed, zero, negative)

        return self.cached(op, ("bias", mask.boolean_mask, dtype), build)
