"""Which attention node writes a present cache, and from which of its inputs.

A layer that owns its cache returns it as present outputs 1 (key) and 2 (value): its past
input with the new key/value appended. Which input feeds which present is the operators'
schema, not a reading of any model (com.microsoft GroupQueryAttention: past_key 3, past_value
4, key 1, value 2; ONNX Attention, opset 23: past_key 4, past_value 5, key 1, value 2). It is
stated once here, for the rules (head size and KV heads of a borrowed cache) and for the
verifier (head size of a cut-out layer's borrowed cache).

onnx-ir spells the ONNX domain ``""`` whether a model says ``""`` or ``"ai.onnx"``
(``ir.Node.domain`` normalizes it), so one entry covers both spellings.

Dimension letters: B batch, S new length, P past length, Nkv KV heads, D head size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import onnx_ir as ir

from rewriter.rules._speed_choice import SPEED_LAYER_KEY

__all__ = ["CacheWrite", "cache_write", "cache_writer", "is_own_cache_fold", "writer_kv_heads"]

# (domain, op_type) -> {present output index: (past input index, new key/value input index)}.
_CACHE_WRITERS: Mapping[tuple[str, str], Mapping[int, tuple[int, int]]] = {
    ("com.microsoft", "GroupQueryAttention"): {1: (3, 1), 2: (4, 2)},
    ("", "Attention"): {1: (4, 1), 2: (5, 2)},
}


@dataclasses.dataclass(frozen=True)
class CacheWrite:
    """The node writing a present cache, and the two inputs the present is made of."""

    writer: ir.Node
    past_BNPD: ir.Value | None  # [B, Nkv, P, D]; absent in a prefill-only graph
    new: ir.Value | None  # [B, S, Nkv*D], or [B, Nkv, S, D] (ONNX Attention's 4-D form)


def _written(cache: ir.Value) -> tuple[ir.Node, int | None] | None:
    """(the attention node that writes `cache`, which of its outputs it is). A layer with its
    own cache rewritten to ``If(S == 1: fold, else: GQA or the export's Attention)``
    (rules._speed_choice.own_cache_fold): its prefill branch's node stands for it (the
    decode branch appends with Concat; is_own_cache_fold says so)."""
    writer = cache.producer()
    if writer is None:
        return None
    if is_own_cache_fold(writer):
        index = cache.index()
        prefill = writer.attributes.get("else_branch")
        if index is None or prefill is None:
            return None
        return _written(prefill.as_graph().outputs[index])
    if (writer.domain, writer.op_type) not in _CACHE_WRITERS:
        return None
    return writer, cache.index()


def is_own_cache_fold(node: ir.Node) -> bool:
    """Whether `node` is a layer's ``If(S == 1: own-cache fold, else: ...)``: a speed choice's
    If that writes presents (the KV-shared ones have one output)."""
    return (
        node.op_type == "If" and SPEED_LAYER_KEY in node.metadata_props and len(node.outputs) == 3
    )


def cache_writer(cache: ir.Value) -> ir.Node | None:
    """The attention node producing `cache`, if a cache-writing op does (any of its outputs)."""
    written = _written(cache)
    return written[0] if written is not None else None


def cache_write(present_BNTD: ir.Value) -> CacheWrite | None:
    """How `present_BNTD` is written, when it is a present output of a cache-writing op."""
    written = _written(present_BNTD)
    if written is None:
        return None
    writer, index = written
    slots = (
        _CACHE_WRITERS[(writer.domain, writer.op_type)].get(index) if index is not None else None
    )
    if slots is None:
        return None
    past_index, new_index = slots
    return CacheWrite(writer, _input(writer, past_index), _input(writer, new_index))


def writer_kv_heads(writer: ir.Node) -> int | None:
    """kv_num_heads the writer states (both ops name the attribute alike)."""
    return writer.attributes.get_int("kv_num_heads", 0) or None


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None
