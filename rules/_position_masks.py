"""Recognise the attention masks Hugging Face exports build from positions (no CumSum).

Dimension letters: B batch, S query length, P past length, T = P + S keys.

transformers' ``sdpa_mask`` compares key positions with query positions, both from
``Range`` (not from ``attention_mask``)::

    key_positions_111T   = Unsqueeze(Unsqueeze(Range(0, T, 1), [0, 1]), [2])
    query_positions_11S1 = Unsqueeze(Unsqueeze(Range(0, S, 1) [+ P], [0, 1]), [3])

In a prefill graph the two Ranges are one value (T = S); in a decode graph the queries are
``Add(Range(0, S, 1), P)`` and the keys ``Range(0, Add(P, S), 1)`` with the same P and S, so
the queries are the last S keys: GroupQueryAttention's bottom-right alignment. The allowed
keys are an ``And`` of terms (torch writes ``And(True, ...)`` around some of them):

- causal:  ``LessOrEqual(key_positions, query_positions)``;
- window:  ``Greater(key_positions, Sub(query_positions, W))``: key j is visible to query i
  iff ``i - j < W``, which with the causal term is ``local_window_size = W`` (SPEC.md 4);
- padding (torch.onnx with attention_mask): ``GatherND(Cast(attention_mask, bool),
  [batch_index, key_positions])`` = ``attention_mask[b, j]``, [B, 1, 1, T].

Over a cache trimmed to its last ``keep`` past entries (transformers'
DynamicSlidingWindowLayer in torch.onnx decode graphs) the keys are numbered from the first
position the cache still holds: ``Add(Range(0, P + S, 1), Max(0, P - keep))`` (``KeyShift``;
the Max spelled ``Max(0, Add(P, -keep))``, ``Add(-keep, P)`` or ``Sub(P, keep)``, either
operand order), with the queries' P. The mask alone does not prove the alignment; the rule
checks that the cache is ``Concat(Slice(past, -keep), new)`` (``match_trimmed_cache``).

The boolean mask is optionally ``Expand``-ed to [B, 1, S, T] and then either passed as is
(torch.onnx) or turned into a float bias ``Mul(Cast(Not(allowed)), -3.4e38)`` (transformers
exporter). Terms, operand orders and nesting of the And are read in any order.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnxscript.rewriter import pattern

from rewriter.rules import _values
from rewriter.rules._failure import MatchFailureError
from rewriter.rules._submatch import SubPattern

__all__ = ["KeyShift", "PositionMask", "allowed_keys", "match_position_mask"]

_LARGE_NEGATIVE = -1.0e4


@dataclasses.dataclass(frozen=True)
class KeyShift:
    """Key positions ``Add(Range(0, P + S, 1), Max(0, P - keep))``: the mask numbers its key
    columns from the first position a cache trimmed to its last ``keep`` past entries still
    holds. Only half a proof: the rule must find that cache (``match_trimmed_cache``)."""

    keep: int
    past_length: ir.Value  # the scalar P of the shift (and of the query positions)


@dataclasses.dataclass(frozen=True)
class PositionMask:
    style: str  # "hf-bias" (float from Not/Cast/Mul) or "hf-bool"
    local_window_size: int | None
    allowed: ir.Value  # the boolean And of the terms, before any Expand
    attention_mask: ir.Value | None  # the graph's [B, T] padding mask, when a term reads it
    causal_in_mask: bool = True  # always: the causal term is required
    key_shift: KeyShift | None = None  # keys numbered from a trimmed cache's first entry


# --- the float bias around the boolean mask ------------------------------------------------


class _BiasFromNot(pattern.PatternBase):
    def pattern(self, op, allowed, large_negative):
        return op.Mul(op.Cast(op.Not(allowed)), large_negative)

    def check(self, context, large_negative: ir.Value, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        value = _values.scalar_float(large_negative)
        if value is None or value > _LARGE_NEGATIVE:
            return result.fail("bias for masked keys is not a large negative constant", None)
        return result


class _BiasFromWhere(pattern.PatternBase):
    def pattern(self, op, allowed, zero, large_negative):
        return op.Where(allowed, zero, large_negative)

    def check(self, context, zero: ir.Value, large_negative: ir.Value, **_):
        result = pattern.MatchResult()
        if _values.scalar_float(zero) != 0.0:
            return result.fail("bias for visible keys is not the constant 0", zero)
        value = _values.scalar_float(large_negative)
        if value is None or value > _LARGE_NEGATIVE:
            return result.fail("bias for masked keys is not a large negative constant", None)
        return result


_BIASES = (SubPattern(_BiasFromNot(), commute=True), SubPattern(_BiasFromWhere()))


# --- the terms of the And --------------------------------------------------------------


class _Causal(pattern.PatternBase):
    """key <= query, in one of two spellings (a pattern has one root op)."""

    def __init__(self, spelling: int) -> None:
        super().__init__(name=f"Causal{spelling}")
        self.spelling = spelling

    def pattern(self, op, key_positions, query_positions):
        if self.spelling:
            return op.GreaterOrEqual(query_positions, key_positions)
        return op.LessOrEqual(key_positions, query_positions)


class _Window(pattern.PatternBase):
    """query - key < W, in one of four spellings."""

    def __init__(self, spelling: int) -> None:
        super().__init__(name=f"Window{spelling}")
        self.spelling = spelling

    def pattern(self, op, key_positions, query_positions, window):
        if self.spelling == 0:
            return op.Greater(key_positions, op.Sub(query_positions, window))
        if self.spelling == 1:
            return op.Less(op.Sub(query_positions, window), key_positions)
        if self.spelling == 2:
            return op.Less(op.Sub(query_positions, key_positions), window)
        return op.Greater(window, op.Sub(query_positions, key_positions))


class _Padding(pattern.PatternBase):
    def pattern(self, op, attention_mask, indices):
        return op.GatherND(op.Cast(attention_mask, to=ir.DataType.BOOL), indices, batch_dims=0)

    def check(self, context, attention_mask: ir.Value, indices: ir.Value, **_):
        result = pattern.MatchResult()
        if not _values.is_graph_input(attention_mask):
            return result.fail("padding is not gathered from a graph input", attention_mask)
        return result


class _PaddingIndices(pattern.PatternBase):
    """[batch_index, key_position] pairs: Concat of the two broadcast coordinates."""

    def pattern(self, op, batch_index, key_positions, shape_b, shape_k):
        return op.Concat(
            op.Unsqueeze(op.Expand(batch_index, shape_b), [-1]),
            op.Unsqueeze(op.Expand(key_positions, shape_k), [-1]),
            axis=-1,
        )


_CAUSAL = tuple(SubPattern(_Causal(spelling)) for spelling in range(2))
_WINDOW = tuple(SubPattern(_Window(spelling)) for spelling in range(4))
_PADDING = (SubPattern(_Padding()),)
_PADDING_INDICES = SubPattern(_PaddingIndices())


def _and_terms(value: ir.Value, terms: list[ir.Value]) -> None:
    producer = value.producer()
    if producer is not None and producer.op_type == "And" and producer.domain in ("", "ai.onnx"):
        for operand in producer.inputs:
            assert operand is not None
            _and_terms(operand, terms)
        return
    array = _values.constant_array(value)
    if array is not None and array.dtype == bool and bool(array.all()):
        return  # And(True, x) is x
    terms.append(value)


def allowed_keys(value: ir.Value) -> ir.Value:
    """The boolean mask below any broadcasting Expand (which only replicates it)."""
    producer = value.producer()
    while producer is not None and producer.op_type == "Expand":
        assert producer.inputs[0] is not None
        value = producer.inputs[0]
        producer = value.producer()
    return value


def match_position_mask(context, mask: ir.Value) -> PositionMask:
    """Classify an Attention mask built from positions (MatchFailureError: why it is not one)."""
    if mask.producer() is None:
        raise MatchFailureError("mask is not built in the graph (graph input or initializer)", mask)
    if mask.dtype == ir.DataType.BOOL:
        style, boolean = "hf-bool", mask
    else:
        style, boolean = "hf-bias", None
        for bias in _BIASES:
            found = bias.match(context, mask)
            if found.bindings is not None:
                boolean = found.bindings["allowed"]
                break
        if boolean is None:
            raise MatchFailureError(
                "float mask is not Mul(Cast(Not(allowed)), large negative) or a Where bias", mask
            )
    allowed = allowed_keys(boolean)
    terms: list[ir.Value] = []
    _and_terms(allowed, terms)
    causal, windows, paddings = [], [], []
    for term in terms:
        bindings = _first_match(
            context, term, (_CAUSAL, causal), (_WINDOW, windows), (_PADDING, paddings)
        )
        if bindings is None:
            producer = term.producer()
            op_type = producer.op_type if producer is not None else "a graph value"
            raise MatchFailureError(
                f"mask term {term.name} ({op_type}) is not a causal, window or padding term", mask
            )
    if len(causal) != 1:
        raise MatchFailureError(
            f"mask has {len(causal)} causal terms (LessOrEqual(keys, queries)); needs one", mask
        )
    if len(windows) > 1 or len(paddings) > 1:
        raise MatchFailureError("mask has more than one window or padding term", mask)
    key_positions = causal[0]["key_positions"]
    query_positions = causal[0]["query_positions"]
    if any(
        w["key_positions"] is not key_positions or w["query_positions"] is not query_positions
        for w in windows
    ):
        raise MatchFailureError("window and causal terms compare different positions", mask)
    shift = _check_positions(context, key_positions, query_positions)
    window = None
    if windows:
        window = _values.scalar_int(windows[0]["window"])
        if window is None:
            raise MatchFailureError("window is not a constant", mask)
        if window < 1:
            raise MatchFailureError(f"window {window} is not positive", mask)
    attention_mask = None
    if paddings:
        _check_padding_indices(context, paddings[0]["indices"], key_positions)
        attention_mask = paddings[0]["attention_mask"]
    return PositionMask(style, window, allowed, attention_mask, key_shift=shift)


def _first_match(context, term: ir.Value, *kinds) -> dict | None:
    """Bindings of the first sub-pattern matching `term`, appended to its kind's list."""
    for subpatterns, found in kinds:
        for subpattern in subpatterns:
            match = subpattern.match(context, term)
            if match.bindings is not None:
                found.append(match.bindings)
                return match.bindings
    return None


# --- positions ---------------------------------------------------------------------------


def _unsqueezed(value: ir.Value) -> tuple[ir.Value, int, int]:
    """(1-D base, rank, the axis the base's data ends on) through a chain of Unsqueezes."""
    chain: list[list[int]] = []
    producer = value.producer()
    while producer is not None and producer.op_type == "Unsqueeze":
        axes = _values.constant_array(producer.inputs[1])
        if axes is None:
            break
        chain.append([int(a) for a in axes.reshape(-1)])
        assert producer.inputs[0] is not None
        value = producer.inputs[0]
        producer = value.producer()
    rank, axis = 1, 0
    for axes in reversed(chain):
        rank += len(axes)
        inserted = {a % rank for a in axes}
        axis = [i for i in range(rank) if i not in inserted][axis]
    return value, rank, axis


def _arange_length(value: ir.Value) -> ir.Value | None:
    """T for Range(0, T, 1)."""
    producer = value.producer()
    if producer is None or producer.op_type != "Range":
        return None
    start, limit, delta = producer.inputs
    if _values.scalar_int(start) != 0 or _values.scalar_int(delta) != 1:
        return None
    return limit


def _add_operands(value: ir.Value | None) -> tuple[ir.Value, ir.Value] | None:
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Add":
        return None
    a, b = producer.inputs
    assert a is not None and b is not None
    return a, b


class _ShiftedRange(pattern.PatternBase):
    """Range(0, T, 1) + shift: key positions numbered from `shift` on."""

    def pattern(self, op, start, total, delta, shift):
        return op.Add(op.Range(start, total, delta), shift)

    def check(self, context, start: ir.Value, delta: ir.Value, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if _values.scalar_int(start) != 0 or _values.scalar_int(delta) != 1:
            return result.fail("shifted key positions are not Range(0, T, 1) + shift", None)
        return result


class _DroppedEntries(pattern.PatternBase):
    """Max(0, P - keep): how many past entries a cache keeping the last `keep` dropped.

    Spelled Max(0, Add(P, -keep)) (torch.onnx), Add(-keep, P) or Sub(P, keep), the Max's
    operands in either order: six explicit spellings rather than commuted ones, so that a
    binding with the operands swapped fails its own check without hiding the others."""

    def __init__(self, spelling: int, zero_first: bool) -> None:
        super().__init__(name=f"DroppedEntries{spelling}{'z' if zero_first else ''}")
        self.spelling = spelling
        self.zero_first = zero_first

    def pattern(self, op, zero, past, keep):
        if self.spelling == 0:
            dropped = op.Add(past, keep)  # keep is the constant -keep
        elif self.spelling == 1:
            dropped = op.Add(keep, past)
        else:
            dropped = op.Sub(past, keep)
        return op.Max(zero, dropped) if self.zero_first else op.Max(dropped, zero)

    def kept(self, keep: ir.Value) -> int | None:
        constant = _values.scalar_int(keep)
        if constant is None:
            return None
        return constant if self.spelling == 2 else -constant

    def check(self, context, zero: ir.Value, past: ir.Value, keep: ir.Value, **_):
        result = pattern.MatchResult()
        if _values.scalar_int(zero) != 0:
            return result.fail("key shift is not Max(0, P - keep)", zero)
        kept = self.kept(keep)
        if kept is None or _values.constant_array(past) is not None:
            return result.fail("key shift Max(0, P - keep) has no constant keep", keep)
        if kept < 1:
            return result.fail(f"key shift Max(0, P - {kept}) keeps no past entry", keep)
        return result


_SHIFTED_RANGE = SubPattern(_ShiftedRange(), commute=True)
_DROPPED = tuple(
    SubPattern(_DroppedEntries(spelling, zero_first))
    for spelling in range(3)
    for zero_first in (True, False)
)


def _key_shift(context, keys: ir.Value) -> tuple[ir.Value, ir.Value, int]:
    """(T, P, keep) for key positions Add(Range(0, T, 1), Max(0, P - keep))."""
    found = _SHIFTED_RANGE.match(context, keys)
    if found.bindings is None:
        raise MatchFailureError("key positions are not Range(0, T, 1)", keys)
    shift = found.bindings["shift"]
    closest = (-1, "")
    for dropped in _DROPPED:
        match = dropped.match(context, shift)
        if match.bindings is not None:
            definition = dropped.definition
            assert isinstance(definition, _DroppedEntries)
            keep = definition.kept(match.bindings["keep"])
            assert keep is not None  # check() established it
            return found.bindings["total"], match.bindings["past"], keep
        closest = max(closest, (match.depth, match.reason))
    raise MatchFailureError(
        "key positions are Range(0, T, 1) shifted by something other than Max(0, P - keep) "
        f"(a trimmed cache's dropped entries): {closest[1]}",
        keys,
    )


def _check_positions(
    context, key_positions: ir.Value, query_positions: ir.Value
) -> KeyShift | None:
    """None: keys Range(0, T, 1), queries the last S of them. A KeyShift: keys numbered
    from Max(0, P - keep), queries P + [0, S), T = P + S (the caller proves the cache).
    MatchFailureError: why the positions are neither."""
    keys, key_rank, key_axis = _unsqueezed(key_positions)
    queries, query_rank, query_axis = _unsqueezed(query_positions)
    if (key_rank, key_axis) != (4, 3) or (query_rank, query_axis) != (4, 2):
        raise MatchFailureError(
            "positions are not broadcast as keys [1,1,1,T] against queries [1,1,S,1]", key_positions
        )
    total = _arange_length(keys)
    shift = None
    if total is None:
        total, shift_past, keep = _key_shift(context, keys)
        shift = KeyShift(keep, shift_past)
    if queries is keys:
        if shift is not None:
            raise MatchFailureError(
                "shifted key positions without query positions P + [0, S): not a decode step",
                key_positions,
            )
        return None  # prefill: the queries are all the keys
    offset = _add_operands(queries)
    if offset is None:
        raise MatchFailureError(
            "query positions are neither the key Range nor Add(Range(0, S, 1), P)", key_positions
        )
    total_terms = _add_operands(total)
    for query_range, past in (offset, offset[::-1]):
        if total_terms is None:
            continue
        if shift is not None and past is not shift.past_length:
            continue
        length = _arange_length(query_range)
        if length is not None and {id(length), id(past)} == {id(t) for t in total_terms}:
            return shift  # queries P + [0, S) are the last S of the keys [0, P + S)
        if _is_single_position(query_range) and _is_one_past(total_terms, past):
            return shift  # single-token decode: Range(0, 1) folded to [0], T = P + 1
    if shift is not None:
        raise MatchFailureError(
            "shifted key positions: the shift's P is not the query positions' P, or the "
            "keys are not Range(0, P + S, 1)",
            key_positions,
        )
    raise MatchFailureError(
        "query positions are not the last S key positions (T = P + S)", key_positions
    )


def _is_single_position(value: ir.Value) -> bool:
    array = _values.constant_array(value)
    return array is not None and array.reshape(-1).tolist() == [0]


def _is_one_past(total_terms: tuple[ir.Value, ir.Value], past: ir.Value) -> bool:
    a, b = total_terms
    return (a is past and _values.scalar_int(b) == 1) or (b is past and _values.scalar_int(a) == 1)


def _check_padding_indices(context, indices: ir.Value, key_positions: ir.Value) -> None:
    found = _PADDING_INDICES.match(context, indices)
    if found.bindings is None:
        raise MatchFailureError(
            f"padding term is not gathered at [batch, key position]: {found.reason}", indices
        )
    if found.bindings["key_positions"] is not key_positions:
        raise MatchFailureError(
            "padding term is gathered at other positions than the causal term's keys", indices
        )
    batch, rank, axis = _unsqueezed(found.bindings["batch_index"])
    if (rank, axis) != (4, 0) or _arange_length(batch) is None:
        raise MatchFailureError(
            "padding term's batch index is not Range(0, B, 1) on axis 0", indices
        )
