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
from rewriter.rules._submatch import SubPattern

__all__ = ["RepeatedCache", "match_repeated_cache", "shape_elements"]


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


def match_repeated_cache(context, value: ir.Value) -> RepeatedCache | str:
    """The cache behind an Attention's 4-D K/V input; a string is why there is none."""
    found = _PATTERN.match(context, value)
    if found.bindings is None:
        return (
            f"{value.name} is not Reshape(Expand(Unsqueeze(cache, [2]))) (repeat_kv): "
            f"{found.reason}"
        )
    cache = found.bindings["cache_BNSH"]
    if cache.shape is not None and cache.shape.rank() != 4:
        return f"repeated cache {cache.name} is not 4-D BNSH"
    repeated = shape_elements(found.bindings["repeated_shape"])
    merged = shape_elements(found.bindings["heads_shape"])
    assert repeated is not None and merged is not None  # check() established them
    kv_heads = _kv_heads(cache, repeated[1])
    assert kv_heads is not None and merged[1] is not None
    sizes = [d for d in (repeated[4], merged[3], _static_dim(cache, 3)) if d is not None]
    return RepeatedCache(cache, kv_heads, merged[1], sizes[0] if sizes else None)
