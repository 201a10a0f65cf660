"""Recognise Hugging Face's ``repeat_kv``: a BNSH cache repeated once per query head.

Dimension letters: B batch, Nkv KV heads, g = N / Nkv query heads per KV head, T cache
length, D head size.

``key_BNTD = Reshape(Expand(Unsqueeze(cache_BNSH, [2]), [B, Nkv, g, T, D]), [B, N, -1, D])``

(transformers 5.24 exporter: shapes ``Concat([1], [1], [g], T, [D])`` and a constant
``[1, N, -1, D]``; torch.onnx dynamo: ``Concat(Shape(x)[0:1], [1], [g], T, [D])`` and
``Concat(Shape(x)[0:1], [N], T, [D])``). Repeated head r is cache head r // g, so an
Attention over the repeated K/V groups query heads exactly as GroupQueryAttention does with
``kv_num_heads = Nkv``: GQA reads the cache itself and the repeat (a copy of the whole cache
per layer per step) goes.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnxscript.rewriter import pattern

from rewriter.rules import _values
from rewriter.rules._failure import MatchFailureError
from rewriter.rules._submatch import SubPattern

__all__ = [
    "AppendedCache",
    "RepeatedCache",
    "TrimmedCache",
    "match_appended_cache",
    "match_repeated_cache",
    "match_trimmed_cache",
    "shape_elements",
]


@dataclasses.dataclass(frozen=True)
class RepeatedCache:
    cache_BNSH: ir.Value  # the cache before the repeat (a present output, or a Concat of it)
    kv_num_heads: int
    num_heads: int  # Nkv * g: one K/V head per query head after the repeat
    head_size: int | None


def shape_elements(value: ir.Value) -> list[int | None] | None:
    """The elements of a 1-D shape tensor: a constant, or a Concat of one-element parts
    (None for a part that is computed, e.g. Shape(x)[0:1])."""
    array = _values.constant_array(value)
    if array is not None:
        return [int(x) for x in array.reshape(-1)] if array.ndim == 1 else None
    producer = value.producer()
    if producer is None or producer.op_type != "Concat" or producer.domain not in ("", "ai.onnx"):
        return None
    elements: list[int | None] = []
    for part in producer.inputs:
        if part is None:
            return None
        array = _values.constant_array(part)
        if array is not None:
            elements.extend(int(x) for x in array.reshape(-1))
        elif part.shape is not None and part.shape.rank() == 1 and part.shape[0] == 1:
            elements.append(None)
        else:
            return None
    return elements


class _RepeatedCachePattern(pattern.PatternBase):
    def pattern(self, op, cache_BNSH, repeated_shape, heads_shape):
        return op.Reshape(op.Expand(op.Unsqueeze(cache_BNSH, [2]), repeated_shape), heads_shape)

    def check(
        self, context, cache_BNSH: ir.Value, repeated_shape: ir.Value, heads_shape: ir.Value, **_
    ) -> pattern.MatchResult:
        result = pattern.MatchResult()
        repeated = shape_elements(repeated_shape)
        if repeated is None or len(repeated) != 5:
            return result.fail("Expand shape is not a 5-D [B, Nkv, g, T, D]", repeated_shape)
        merged = shape_elements(heads_shape)
        if merged is None or len(merged) != 4:
            return result.fail("Reshape shape is not a 4-D [B, N, T, D]", heads_shape)
        group, heads = repeated[2], merged[1]
        if group is None or group < 1:
            return result.fail("repeat factor (Expand dim 2) is not a positive constant", None)
        if heads is None:
            return result.fail("Reshape does not spell out the head count N", heads_shape)
        kv_heads = _kv_heads(cache_BNSH, repeated[1])
        if kv_heads is None:
            return result.fail("KV head count unknown (cache dim 1 and Expand dim 1)", cache_BNSH)
        if kv_heads * group != heads:
            return result.fail(
                f"repeat factor {group} x {kv_heads} KV heads != {heads} heads after the "
                "Reshape: not one repeated head per query head",
                repeated_shape,
            )
        sizes = {d for d in (repeated[4], merged[3], _static_dim(cache_BNSH, 3)) if d is not None}
        if len(sizes) > 1:
            return result.fail(f"inconsistent head sizes {sorted(sizes)} in the repeat", None)
        return result


def _static_dim(value: ir.Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or shape.rank() <= axis or not isinstance(shape[axis], int):
        return None
    return shape[axis]


def _kv_heads(cache_BNSH: ir.Value, expand_dim: int | None) -> int | None:
    static = _static_dim(cache_BNSH, 1)
    if static is not None and expand_dim not in (None, 1, static):
        return None
    return static if static is not None else expand_dim


_PATTERN = SubPattern(_RepeatedCachePattern())


def match_repeated_cache(context, value: ir.Value) -> RepeatedCache:
    """The cache behind an Attention's 4-D K/V input; MatchFailureError says why there is none."""
    found = _PATTERN.match(context, value)
    if found.bindings is None:
        raise MatchFailureError(
            f"{value.name} is not Reshape(Expand(Unsqueeze(cache, [2]))) (repeat_kv): "
            f"{found.reason}",
            value,
        )
    cache = found.bindings["cache_BNSH"]
    if cache.shape is not None and cache.shape.rank() != 4:
        raise MatchFailureError(f"repeated cache {cache.name} is not 4-D BNSH", value)
    repeated = shape_elements(found.bindings["repeated_shape"])
    merged = shape_elements(found.bindings["heads_shape"])
    assert repeated is not None and merged is not None  # check() established them
    kv_heads = _kv_heads(cache, repeated[1])
    assert kv_heads is not None and merged[1] is not None
    sizes = [d for d in (repeated[4], merged[3], _static_dim(cache, 3)) if d is not None]
    return RepeatedCache(cache, kv_heads, merged[1], sizes[0] if sizes else None)


@dataclasses.dataclass(frozen=True)
class AppendedCache:
    """A layer's own cache as the export appends to it: what GQA's native form replaces."""

    cache_BNTD: ir.Value  # the present (Concat output, or the new keys' Transpose in prefill)
    # the graph's past input (or the entries a trimmed cache keeps of it); None in prefill
    past_BNPD: ir.Value | None
    new_BSND: ir.Value  # this call's keys/values before their Transpose to BNSD
    node: ir.Node  # the Concat (or Transpose) that GQA's present output replaces


def match_appended_cache(cache_BNTD: ir.Value) -> AppendedCache | None:
    """``Concat(past_BNPD, Transpose(new_BSND, [0,2,1,3]), axis=2)`` or, without a past,
    ``Transpose(new_BSND, [0,2,1,3])``; None when the cache is built some other way (then
    the layer reads it as a past instead), MatchFailureError for a near-miss."""
    producer = cache_BNTD.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return None
    if producer.op_type == "Transpose":
        return _new_entries(cache_BNTD, None, producer)
    if producer.op_type != "Concat" or len(producer.inputs) != 2:
        return None
    past, new = producer.inputs
    assert past is not None and new is not None
    if not _values.is_graph_input(past):
        return None
    axis = producer.attributes.get_int("axis", 0)
    rank = past.shape.rank() if past.shape is not None else 4
    if rank != 4 or axis % 4 != 2:
        raise MatchFailureError(
            f"cache {cache_BNTD.name} is Concat(past, new) on axis {axis}, not the sequence "
            "axis 2 of BNSH: not a KV-cache append",
            cache_BNTD,
        )
    if new.producer() is None or new.producer().op_type != "Transpose":
        return None
    return _new_entries(new, past, producer)


def _new_entries(new_BNSD: ir.Value, past: ir.Value | None, node: ir.Node) -> AppendedCache | None:
    transpose = new_BNSD.producer()
    assert transpose is not None
    if list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    assert transpose.inputs[0] is not None
    return AppendedCache(node.outputs[0], past, transpose.inputs[0], node)


@dataclasses.dataclass(frozen=True)
class TrimmedCache:
    """``Concat(Slice(past_BNPD, [-keep], [end], [2], [1]), Transpose(new_BSND), axis=2)``:
    transformers' DynamicSlidingWindowLayer appending S new entries to the last ``keep``
    entries of its past (torch.onnx decode graphs)."""

    cache_BNTD: ir.Value
    past_BNPD: ir.Value  # the graph's past input, before the Slice
    new_BSND: ir.Value
    kept_BNKD: ir.Value  # the Slice: the past entries the cache keeps
    node: ir.Node  # the Concat

    def appended(self) -> AppendedCache:
        """As GQA's native form appends: to the kept past entries, whose present then
        replaces the Concat (the export's trimming Slice of the present stays)."""
        return AppendedCache(self.cache_BNTD, self.kept_BNKD, self.new_BSND, self.node)


# Slice ends at least this large run to the end of any axis.
_TO_THE_END = 2**62


def match_trimmed_cache(cache_BNTD: ir.Value, keep: int) -> TrimmedCache:
    """The trimmed cache behind a layer's repeat (MatchFailureError: why it is not one that
    keeps the last ``keep`` past entries)."""
    name = cache_BNTD.name
    producer = cache_BNTD.producer()
    if producer is None or producer.op_type != "Concat" or len(producer.inputs) != 2:
        raise MatchFailureError(
            f"cache {name} is not a Concat(trimmed past, new entries)", cache_BNTD
        )
    if producer.attributes.get_int("axis", 0) % 4 != 2:
        raise MatchFailureError(
            f"cache {name} is not concatenated on the sequence axis 2 of BNSH", cache_BNTD
        )
    sliced, new = producer.inputs
    assert sliced is not None and new is not None
    trim = sliced.producer()
    if trim is None or trim.op_type != "Slice" or trim.domain not in ("", "ai.onnx"):
        raise MatchFailureError(f"cache {name} does not start with a Slice of the past", cache_BNTD)
    past = trim.inputs[0]
    if past is None or not _values.is_graph_input(past) or past.shape is None:
        raise MatchFailureError(
            f"cache {name} slices something other than a graph input past", cache_BNTD
        )
    if past.shape.rank() != 4:
        raise MatchFailureError(f"past {past.name} of cache {name} is not 4-D BNSH", cache_BNTD)
    starts, ends, axes = (_values.constant_array(v) for v in trim.inputs[1:4])
    steps = _values.constant_array(trim.inputs[4]) if len(trim.inputs) > 4 else None
    if axes is None or [int(a) % 4 for a in axes.reshape(-1)] != [2]:
        raise MatchFailureError(f"cache {name} slices its past on another axis than 2", cache_BNTD)
    if len(trim.inputs) > 4 and (steps is None or steps.reshape(-1).tolist() != [1]):
        raise MatchFailureError(
            f"cache {name} slices its past with a step other than 1", cache_BNTD
        )
    if ends is None or ends.reshape(-1).tolist()[0] < _TO_THE_END:
        raise MatchFailureError(f"cache {name} slices its past short of its end", cache_BNTD)
    if starts is None or starts.reshape(-1).tolist() != [-keep]:
        kept = "a computed start" if starts is None else f"start {starts.reshape(-1).tolist()}"
        raise MatchFailureError(
            f"cache {name} keeps its past from {kept}, the mask's key shift Max(0, P - {keep}) "
            f"assumes the last {keep} entries",
            cache_BNTD,
        )
    transpose = new.producer()
    if (
        transpose is None
        or transpose.op_type != "Transpose"
        or list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]
    ):
        raise MatchFailureError(
            f"cache {name} appends something other than Transpose(new, [0, 2, 1, 3])", cache_BNTD
        )
    assert transpose.inputs[0] is not None
    return TrimmedCache(cache_BNTD, past, transpose.inputs[0], sliced, producer)
