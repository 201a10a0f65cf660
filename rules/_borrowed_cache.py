"""Recognise a KV-shared layer's borrowed K or V: the source layer's BNSH cache made 3-D.

``key_BSD = Reshape(Transpose(key_BNSH, perm=[0, 2, 1, 3]), [0, 0, -1] or [0, 0, Nkv*D])``
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnxscript.rewriter import pattern

from rewriter.rules import _values
from rewriter.rules._failure import MatchFailureError
from rewriter.rules._submatch import SubPattern

__all__ = ["BorrowedCache", "match_borrowed_cache"]


@dataclasses.dataclass(frozen=True)
class BorrowedCache:
    cache_BNSH: ir.Value  # the source layer's present key or value (or a graph value)
    hidden_size: int | None  # Nkv*D when the Reshape spells it out


class _BorrowedCachePattern(pattern.PatternBase):
    def pattern(self, op, cache_BNSH, shape):
        return op.Reshape(op.Transpose(cache_BNSH, perm=[0, 2, 1, 3]), shape)

    def check(self, context, cache_BNSH: ir.Value, shape: ir.Value, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        reshape = context.root
        if reshape.attributes.get_int("allowzero", 0) != 0:
            # With allowzero=1 the 0s in the shape mean size 0, not "copy this dim".
            return result.fail("Reshape has allowzero=1", reshape)
        dims = _values.constant_array(shape)
        if dims is None or dims.shape != (3,) or list(dims[:2]) != [0, 0]:
            return result.fail("Reshape shape is not a constant [0, 0, -1 or Nkv*D]", shape)
        if int(dims[2]) == 0 or int(dims[2]) < -1:
            return result.fail(f"Reshape shape {dims.tolist()} does not merge the heads", shape)
        return result


_PATTERN = SubPattern(_BorrowedCachePattern())


def match_borrowed_cache(context, value: ir.Value) -> BorrowedCache:
    """The BNSH cache behind an Attention K/V input; MatchFailureError says why there is none."""
    found = _PATTERN.match(context, value)
    if found.bindings is None:
        raise MatchFailureError(
            f"{value.name} is not Reshape(Transpose(cache, perm=[0,2,1,3])): {found.reason}", value
        )
    dims = _values.constant_array(found.bindings["shape"])
    assert dims is not None  # check() established it
    hidden = int(dims[2])
    return BorrowedCache(found.bindings["cache_BNSH"], hidden if hidden > 0 else None)
