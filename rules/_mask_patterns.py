"""Recognise the attention masks that KV-shared layers of real exports build (SPEC.md section 2).

Dimension letters: B batch, S query length of this call, T total length (past + S).

All masks start from the same positions: ``cs = CumSum(attention_mask, 1)`` gives each key
its position, ``key_positions_B1T = Unsqueeze(cs, [1])`` and
``query_positions_BS1 = Unsqueeze(Slice(cs, T - S, T, axes=[1]), [2])`` (the last S keys are
this call's queries). The masks then combine three terms:

- padding: ``Cast(Unsqueeze(attention_mask, [1]), bool)`` (either nesting order);
- causal:  ``GreaterOrEqual(query_positions, key_positions)``;
- window:  ``Less(Sub(query_positions, key_positions), W)`` -- key j is visible to query i iff
  ``0 <= i - j < W``, which is GroupQueryAttention's ``local_window_size = W``.

P1 (boolean, causality left to ``is_causal=1``): sliding ``And(window, padding)``; full
``Expand(padding, Concat(B, S, T))``. P2 (float additive bias, ``is_causal`` 0 or 1):
``Unsqueeze(Where(And(padding, causal [, window]), 0, large_negative), [1])``. A P2 bias may
pass through a Cast to a float type anywhere after its Where (mobius builds fp16 biases in
fp32 and casts them: ``Unsqueeze(Cast(to=FLOAT16)(Where(...)), [1])``); a Cast changes only the
bias's dtype, and the rewrite rebuilds the bias from the boolean condition in the query's dtype.

Each mask shape is an onnxscript pattern; operand order of the commutative And is covered by
matching every commuted variant, and spelled-out alternatives (Greater(W, d) for Less(d, W),
both nestings of the padding term, both groupings of a three-term And) are OrValue branches.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnxscript.rewriter import pattern

from rewriter.rules import _values
from rewriter.rules._failure import MatchFailureError
from rewriter.rules._submatch import SubPattern

__all__ = ["MaskForm", "match_mask"]

# Anything at or below this is "minus infinity" for a softmax bias in fp16 and fp32.
_LARGE_NEGATIVE = -1.0e4
_INT64_MAX_ISH = 2**31 - 1  # Slice ends at or beyond this mean "to the end"
# A Cast to one of these keeps 0 as 0 and a large negative large and negative (or -inf).
_FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


@dataclasses.dataclass(frozen=True)
class MaskForm:
    """What a recognised mask means."""

    style: str  # "p1" (boolean, causal via is_causal) or "p2" (float bias, causal in mask)
    attention_mask: ir.Value  # the graph's 2-D [B, T] padding mask it is derived from
    local_window_size: int | None  # W for sliding masks, None for full attention
    causal_in_mask: bool
    mask_value: ir.Value  # the Attention node's mask input
    boolean_mask: ir.Value  # the boolean mask before Where (P1: mask_value itself)
    boolean_mask_has_head_axis: bool  # [B,1,S,T] rather than [B,S,T]


# Every OrValue used under commute() carries a tag_var: onnxscript 0.7.2 cannot clone an
# untagged backtracking OrValue (BacktrackingOr.clone passes tag_values without tag_var).


def _padding(op, attention_mask):
    return pattern.OrValue(
        [
            op.Cast(op.Unsqueeze(attention_mask, [1]), to=ir.DataType.BOOL),
            op.Unsqueeze(op.Cast(attention_mask, to=ir.DataType.BOOL), [1]),
        ],
        tag_var="padding_spelling",
    )


def _positions(op, counted_mask, cumsum_axis, query_start, query_end, slice_axes):
    # counted_mask is attention_mask or a Cast of it, decided in check(): a pattern
    # alternative here could not match an outer-scope attention_mask inside an If branch.
    positions = op.CumSum(counted_mask, cumsum_axis)
    key_positions = op.Unsqueeze(positions, [1])
    query_positions = op.Unsqueeze(
        op.Slice(positions, query_start, query_end, slice_axes, _allow_other_inputs=True), [2]
    )
    return query_positions, key_positions


def _window(op, query_positions, key_positions, window):
    distance = op.Sub(query_positions, key_positions)
    return pattern.OrValue(
        [op.Less(distance, window), op.Greater(window, distance)], tag_var="window_spelling"
    )


def _causal(op, query_positions, key_positions):
    return pattern.OrValue(
        [
            op.GreaterOrEqual(query_positions, key_positions),
            op.LessOrEqual(key_positions, query_positions),
        ],
        tag_var="causal_spelling",
    )


def _optional_cast(op, value, to, tag: str):
    # A Cast between the Where and the Attention changes only the bias's dtype (check()
    # accepts float targets only). The matcher cannot put an OrValue at a pattern's root, so
    # a Cast as the last op is _P2Mask.cast_last instead.
    return pattern.OrValue([op.Cast(value, to=to), value], tag_var=tag)


def _bias(op, allowed, zero, large_negative, unsqueeze_last: bool, cast_to, cast_last: bool):
    if unsqueeze_last:
        where = _optional_cast(
            op, op.Where(allowed, zero, large_negative), cast_to, "cast_before_unsqueeze"
        )
        bias = op.Unsqueeze(where, [1])
    else:
        bias = op.Where(op.Unsqueeze(allowed, [1]), zero, large_negative)
    if cast_last:
        return op.Cast(bias, to=cast_to)
    return bias


class _MaskPattern(pattern.PatternBase):
    """Base: shared check of the position chain and the constants."""

    style: str
    windowed: bool
    causal_in_mask: bool

    def check(
        self,
        context,
        attention_mask: ir.Value,
        counted_mask: ir.Value | None = None,
        cumsum_axis: ir.Value | None = None,
        query_start: ir.Value | None = None,
        query_end: ir.Value | None = None,
        slice_axes: ir.Value | None = None,
        window: ir.Value | None = None,
        zero: ir.Value | None = None,
        large_negative: ir.Value | None = None,
        cast_to: ir.Attr | None = None,
        **_,
    ) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not _values.is_graph_input(attention_mask):
            return result.fail(
                "mask is not derived from a graph input attention_mask", attention_mask
            )
        if counted_mask is not None and not _is_mask_or_its_cast(counted_mask, attention_mask):
            return result.fail("positions are not counted from attention_mask", counted_mask)
        if cumsum_axis is not None and _values.scalar_int(cumsum_axis) not in (1, -1):
            return result.fail("CumSum is not over the sequence axis", cumsum_axis)
        if slice_axes is not None and _values.scalar_int(slice_axes) not in (1, -1):
            return result.fail("query positions are not sliced on the sequence axis", slice_axes)
        if query_start is not None and not _is_total_minus_query_length(
            context, query_start, attention_mask
        ):
            return result.fail("query positions do not start at T - S", query_start)
        if query_end is not None and not _is_total_length(context, query_end, attention_mask):
            return result.fail("query positions do not end at T", query_end)
        if self.windowed:
            w = _values.scalar_int(window)
            if w is None:
                return result.fail("window is not a constant", window)
            if w < 1:
                return result.fail(f"window {w} is not positive", window)
        if zero is not None and _values.scalar_float(zero) != 0.0:
            return result.fail("bias for visible keys is not the constant 0", zero)
        if large_negative is not None:
            value = _values.scalar_float(large_negative)
            if value is None or value > _LARGE_NEGATIVE:
                return result.fail(
                    "bias for masked keys is not a large negative constant", large_negative
                )
        if cast_to is not None and ir.DataType(cast_to.as_int()) not in _FLOAT_TYPES:
            return result.fail(
                f"bias is cast to {ir.DataType(cast_to.as_int()).name}, not a float type", None
            )
        return result


def _is_mask_or_its_cast(counted: ir.Value, attention_mask: ir.Value) -> bool:
    if counted is attention_mask:
        return True
    producer = counted.producer()
    return (
        producer is not None
        and producer.op_type == "Cast"
        and producer.domain in ("", "ai.onnx")
        and producer.inputs[0] is attention_mask
    )


class _P1Sliding(_MaskPattern):
    style, windowed, causal_in_mask = "p1", True, False

    def pattern(
        self,
        op,
        attention_mask,
        counted_mask,
        cumsum_axis,
        query_start,
        query_end,
        slice_axes,
        window,
    ):
        q, k = _positions(op, counted_mask, cumsum_axis, query_start, query_end, slice_axes)
        return op.And(_window(op, q, k, window), _padding(op, attention_mask))


class _P1Full(_MaskPattern):
    style, windowed, causal_in_mask = "p1", False, False

    def pattern(self, op, attention_mask, expand_shape):
        return op.Expand(_padding(op, attention_mask), expand_shape)


class _P2Mask(_MaskPattern):
    """P2 biases come as Unsqueeze(Where(m)) or Where(Unsqueeze(m)), either one optionally
    cast last; a pattern has one root, so each root is its own instance."""

    def __init__(self, unsqueeze_last: bool, cast_last: bool = False) -> None:
        super().__init__()
        self.unsqueeze_last = unsqueeze_last
        self.cast_last = cast_last


class _P2Sliding(_P2Mask):
    style, windowed, causal_in_mask = "p2", True, True

    def pattern(
        self,
        op,
        attention_mask,
        counted_mask,
        cumsum_axis,
        query_start,
        query_end,
        slice_axes,
        window,
        zero,
        large_negative,
        cast_to,
    ):
        q, k = _positions(op, counted_mask, cumsum_axis, query_start, query_end, slice_axes)
        padding = _padding(op, attention_mask)
        causal = _causal(op, q, k)
        in_window = _window(op, q, k, window)
        allowed = pattern.OrValue(
            [
                op.And(padding, op.And(causal, in_window)),
                op.And(op.And(padding, causal), in_window),
                op.And(op.And(padding, in_window), causal),
            ],
            tag_var="and_grouping",
        )
        return _bias(
            op, allowed, zero, large_negative, self.unsqueeze_last, cast_to, self.cast_last
        )


class _P2Full(_P2Mask):
    style, windowed, causal_in_mask = "p2", False, True

    def pattern(
        self,
        op,
        attention_mask,
        counted_mask,
        cumsum_axis,
        query_start,
        query_end,
        slice_axes,
        zero,
        large_negative,
        cast_to,
    ):
        q, k = _positions(op, counted_mask, cumsum_axis, query_start, query_end, slice_axes)
        allowed = op.And(_padding(op, attention_mask), _causal(op, q, k))
        return _bias(
            op, allowed, zero, large_negative, self.unsqueeze_last, cast_to, self.cast_last
        )


# --- T and S as the exports compute them -------------------------------------------------


def _dim1(op, x):
    """Dimension 1 of x's shape, as a 1-D or 0-D int64 value."""
    return pattern.OrValue(
        [
            op.Shape(x, start=1, end=2),
            op.Slice(
                op.Shape(x, _allow_other_attributes=False), [1], [2], _allow_other_inputs=True
            ),
            op.Gather(op.Shape(x, _allow_other_attributes=False), 1),
            op.Gather(op.Shape(x, _allow_other_attributes=False), [1]),
        ]
    )


class _Dim1(pattern.PatternBase):
    """T = dim 1 of attention_mask, in one of _dim1's spellings (a pattern has one root)."""

    def __init__(self, spelling: int) -> None:
        super().__init__(name=f"TotalLength{spelling}")
        self.spelling = spelling

    def pattern(self, op, attention_mask):
        shape = op.Shape(attention_mask, _allow_other_attributes=False) if self.spelling else None
        if self.spelling == 1:
            return op.Slice(shape, [1], [2], _allow_other_inputs=True)
        if self.spelling == 2:
            return op.Gather(shape, 1)
        if self.spelling == 3:
            return op.Gather(shape, [1])
        return op.Shape(attention_mask, start=1, end=2)


class _TotalLength(pattern.PatternBase):
    """T = dim 1 of attention_mask, made 1-D by `wrap` ("", "Unsqueeze" or "Reshape")."""

    def __init__(self, wrap: str) -> None:
        super().__init__(name=f"TotalLength{wrap}")
        self.wrap = wrap

    def pattern(self, op, attention_mask):
        return _wrapped(op, self.wrap, _dim1(op, attention_mask))


class _TotalMinusQueryLength(pattern.PatternBase):
    """T - S, where S is dim 1 of another graph input (input_ids, position_ids, ...)."""

    def __init__(self, wrap: str) -> None:
        super().__init__(name=f"TotalMinusQueryLength{wrap}")
        self.wrap = wrap

    def pattern(self, op, attention_mask, query_source):
        return _wrapped(op, self.wrap, op.Sub(_dim1(op, attention_mask), _dim1(op, query_source)))

    def check(self, context, attention_mask, query_source, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if query_source is attention_mask or not _values.is_graph_input(query_source):
            return result.fail("S is not dim 1 of a graph input", query_source)
        return result


def _wrapped(op, wrap: str, value):
    # A single pattern has one root op, so each way of making the value 1-D is its own pattern.
    if wrap == "Unsqueeze":
        return op.Unsqueeze(value, [0])
    if wrap == "Reshape":
        return op.Reshape(value, [-1])
    return value


_WRAPS = ("Unsqueeze", "Reshape")
_TOTAL_LENGTH = tuple(SubPattern(_TotalLength(w)) for w in _WRAPS) + tuple(
    SubPattern(_Dim1(spelling)) for spelling in range(4)
)
_TOTAL_MINUS_QUERY_LENGTH = tuple(SubPattern(_TotalMinusQueryLength(w)) for w in ("", *_WRAPS))


def _matches_from(subpatterns, context, value: ir.Value, **bound) -> bool:
    for subpattern in subpatterns:
        found = subpattern.match(context, value)
        if found.bindings is not None and all(
            found.bindings.get(name) is expected for name, expected in bound.items()
        ):
            return True
    return False


def _is_total_length(context, value: ir.Value, attention_mask: ir.Value) -> bool:
    end = _values.scalar_int(value)
    if end is not None:
        return end >= _INT64_MAX_ISH
    return _matches_from(_TOTAL_LENGTH, context, value, attention_mask=attention_mask)


def _is_total_minus_query_length(context, value: ir.Value, attention_mask: ir.Value) -> bool:
    return _matches_from(_TOTAL_MINUS_QUERY_LENGTH, context, value, attention_mask=attention_mask)


# --- entry point ----------------------------------------------------------------------------


_MASK_PATTERNS: tuple[tuple[_MaskPattern, SubPattern], ...] = tuple(
    (p, SubPattern(p, commute=True))
    for p in (
        _P1Sliding(),
        _P1Full(),
        *(
            p2(unsqueeze_last=unsqueeze_last, cast_last=cast_last)
            for p2 in (_P2Sliding, _P2Full)
            for cast_last in (False, True)
            for unsqueeze_last in (True, False)
        ),
    )
)


def match_mask(context, mask: ir.Value) -> MaskForm:
    """Classify an Attention mask input; MatchFailureError says why it is not recognised."""
    if mask.producer() is None:
        raise MatchFailureError("mask is not built in the graph (graph input or initializer)", mask)
    closest: tuple[int, str] = (-2, "")
    for mask_pattern, subpattern in _MASK_PATTERNS:
        found = subpattern.match(context, mask)
        if found.bindings is not None:
            return _mask_form(mask_pattern, found.bindings, mask)
        if found.depth > closest[0]:
            closest = (found.depth, f"closest is {subpattern.name}: {found.reason}")
    raise MatchFailureError(f"mask is not a recognised P1/P2 mask ({closest[1]})", mask)


def _mask_form(mask_pattern: _MaskPattern, bindings: dict, mask: ir.Value) -> MaskForm:
    window = bindings.get("window") if mask_pattern.windowed else None
    return MaskForm(
        style=mask_pattern.style,
        attention_mask=bindings["attention_mask"],
        local_window_size=_values.scalar_int(window) if window is not None else None,
        causal_in_mask=mask_pattern.causal_in_mask,
        mask_value=mask,
        boolean_mask=mask if mask_pattern.style == "p1" else _where_condition(mask),
        boolean_mask_has_head_axis=isinstance(mask_pattern, _P2Mask)
        and not mask_pattern.unsqueeze_last,
    )


def _where_condition(bias: ir.Value) -> ir.Value:
    """The boolean input of the Where that builds a P2 bias (through its Unsqueeze and Casts)."""
    node = bias.producer()
    assert node is not None
    while node.op_type in ("Unsqueeze", "Cast"):
        node = node.inputs[0].producer()
        assert node is not None
    assert node.op_type == "Where"
    return node.inputs[0]
