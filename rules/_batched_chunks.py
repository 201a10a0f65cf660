"""Batched calls of several tokens after a past, which GroupQueryAttention refuses by default.

Dimension letters: B batch, S query length of the call, P past length, T = P + S, Nkv KV
heads, D head size.

GQA without ``query_seqlens`` refuses ``B > 1`` with ``S > 1`` after a past ("batch_size must
be 1 when sequence_length > 1 and past context is given"), a call an export with a dynamic
batch and a dynamic S runs (speculative verification, chunked prefill). Measured on
onnxruntime 1.32.0 CPU (N=4, Nkv=2, D=32, B=2, S=3, P=5, against a float64 reference):

- native form (this call's K/V appended to a past) with ``query_seqlens`` (input 16): runs,
  4.8e-7; without it the error above;
- ``past`` form (empty K/V, the borrowed cache as past): refused with or without
  ``query_seqlens`` ("query_seqlens requires new key/value with kv_sequence_length ==
  sequence_length");
- ``split`` form (past = the borrowed cache's first T - S keys, key/value = its last S as
  [B, S, Nkv*D]) with ``query_seqlens`` and the presents kept: runs, 4.8e-7 full and 6.0e-7
  with a window of 4 ("query_seqlens requires the present_key and present_value outputs"
  without them).

``query_seqlens[b] = min(S, seqlens_k[b] + 1)`` is what GQA assumes when it is omitted, so
passing it changes nothing else. A KV-shared layer keeps the copy-free ``past`` form where GQA
takes it (B == 1, S == 1 or S == T) and runs the ``split`` form only for the rest, behind one
``If``: the split copies the borrowed cache, which a decode step must not pay.
``query_seqlens`` is an input of onnxruntime >= 1.32.0: an older runtime does not load it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter._context import TapeBuilder

from rewriter.rules._naming import name_after

__all__ = ["OWN_CHUNKS", "QUERY_SEQLENS_INDEX", "SHARED_CHUNKS", "query_seqlens", "shared_if"]

QUERY_SEQLENS_INDEX = 16
# On the If that replaces a layer (metadata_props), so the verifier lists it as a layer.
BATCHED_CHUNKS_KEY = "kvshare_gqa_rewriter.batched_chunks"
# LayerRewrite.batched_chunks: how the layer keeps batched multi-token calls after a past.
OWN_CHUNKS = "query_seqlens"
SHARED_CHUNKS = "if(B==1 or S==1 or S==T: past, else: split with query_seqlens)"


def query_seqlens(op, seqlens_k: ir.Value, query_BSH: ir.Value) -> ir.Value:
    """``min(S, seqlens_k + 1)`` per row: GQA's own default, stated so that it lifts the limit."""
    one = op.Constant(value=ir.tensor(np.array([1], dtype=np.int32)))
    length = op.Cast(op.Shape(query_BSH, start=1, end=2), to=ir.DataType.INT32)
    return op.Min(op.Add(seqlens_k, one), length)


def with_query_seqlens(inputs: list[ir.Value | None], seqlens: ir.Value) -> list[ir.Value | None]:
    """GQA's inputs up to total_sequence_length, then ``query_seqlens`` at input 16."""
    padding = [None] * (QUERY_SEQLENS_INDEX - len(inputs))
    return [*inputs, *padding, seqlens]


GQABuilder = Callable[[object, list[ir.Value | None], int], ir.Value]


def shared_if(
    op,
    query_BSH: ir.Value,
    caches_BNSH: tuple[ir.Value, ir.Value],
    seqlens_k: ir.Value,
    total_length: ir.Value,
    empty_kv: ir.Value,
    kv_hidden: int,
    gqa: GQABuilder,
    *,
    output_type: ir.TypeProtocol | None,
    name: str,
) -> ir.Value:
    """``If(B == 1 or S == 1 or S == T)``: the ``past`` form, else the ``split`` form with
    ``query_seqlens``. ``gqa(builder, inputs, num_outputs)`` builds one GQA node and
    returns its output; the branches read the rest from the enclosing graph."""
    key_BNSH, value_BNSH = caches_BNSH

    def past(builder) -> ir.Value:
        inputs = [query_BSH, empty_kv, empty_kv, key_BNSH, value_BNSH, seqlens_k, total_length]
        return gqa(builder, inputs, 1)

    def split(builder) -> ir.Value:
        total = builder.Reshape(
            builder.Cast(total_length, to=ir.DataType.INT64), builder.Constant(value_ints=[-1])
        )
        past_length = builder.Sub(total, builder.Shape(query_BSH, start=1, end=2))
        start, axis = builder.Constant(value_ints=[0]), builder.Constant(value_ints=[2])
        to_BSH = builder.Constant(value_ints=[0, 0, kv_hidden])

        def new(cache: ir.Value) -> ir.Value:
            last = builder.Slice(cache, past_length, total, axis)
            return builder.Reshape(builder.Transpose(last, perm=[0, 2, 1, 3]), to_BSH)

        def old(cache: ir.Value) -> ir.Value:
            return builder.Slice(cache, start, past_length, axis)

        inputs = [
            query_BSH,
            new(key_BNSH),
            new(value_BNSH),
            old(key_BNSH),
            old(value_BNSH),
            seqlens_k,
            total_length,
        ]
        # GQA's CPU kernel needs the presents with query_seqlens; they are not used.
        chunk = query_seqlens(builder, seqlens_k, query_BSH)
        return gqa(builder, with_query_seqlens(inputs, chunk), 3)

    branches: dict[str, ir.Graph] = {}
    for label, build in (("past", past), ("split", split)):
        tape = TapeBuilder()
        output = build(tape)
        if output_type is not None and output.type is None:
            output.type = output_type
        name_after(tape.nodes, f"{name}/{label}")
        branches[label] = ir.Graph((), (output,), nodes=tape.nodes, name=f"{name}/{label}")
    one = op.Constant(value_ints=[1])
    batch = op.Shape(query_BSH, start=0, end=1)
    length = op.Shape(query_BSH, start=1, end=2)
    total = op.Reshape(op.Cast(total_length, to=ir.DataType.INT64), op.Constant(value_ints=[-1]))
    takes_past = op.Or(op.Or(op.Equal(batch, one), op.Equal(length, one)), op.Equal(length, total))
    result = op.If(takes_past, then_branch=branches["past"], else_branch=branches["split"])
    result.producer().metadata_props[BATCHED_CHUNKS_KEY] = SHARED_CHUNKS
    if output_type is not None:
        result.type = output_type
    return result
