"""rules/_batched_chunks.py on its own (no corpus): GroupQueryAttention built the way the HF
rule builds it for a graph that takes batched calls of several tokens after a past, run on
ONNX Runtime against a float64 reference for every kind of call (prefill, decode, batch-1
and batch-2 chunks after a past), with and without a window."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnxscript.rewriter._context import TapeBuilder

from rewriter.rules._batched_chunks import query_seqlens, shared_if, with_query_seqlens

N, NKV, D = 4, 2, 8
HIDDEN, KV_HIDDEN = N * D, NKV * D


def _reference(query, key_BNTD, value_BNTD, window):
    """Causal attention of the last S positions over T keys, scale 1, float64."""
    batch, length, _ = query.shape
    total = key_BNTD.shape[2]
    q = query.reshape(batch, length, N, D).astype(np.float64)
    out = np.zeros((batch, length, N, D))
    for b in range(batch):
        for n in range(N):
            g = n // (N // NKV)
            for s in range(length):
                position = total - length + s
                keys = [
                    j
                    for j in range(total)
                    if j <= position and (window is None or position - j < window)
                ]
                scores = np.array([q[b, s, n] @ key_BNTD[b, g, j] for j in keys])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[b, s, n] = weights @ value_BNTD[b, g, keys].astype(np.float64)
    return out.reshape(batch, length, HIDDEN)


def _value(name: str, dtype: ir.DataType, shape: list) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


def _session(shared: bool, window: int | None) -> ort.InferenceSession:
    f32, i32 = ir.DataType.FLOAT, ir.DataType.INT32
    query = _value("query", f32, ["B", "S", HIDDEN])
    inputs = [query]
    attributes: dict[str, object] = {"num_heads": N, "kv_num_heads": NKV, "scale": 1.0}
    if window is not None:
        attributes["local_window_size"] = window
    op = TapeBuilder()

    def gqa(builder, gqa_inputs, outputs):
        results = builder.GroupQueryAttention(
            *gqa_inputs, _domain="com.microsoft", _outputs=outputs, **attributes
        )
        return results[0] if outputs > 1 else results

    if shared:
        # The borrowed cache [B, Nkv, T, D] (T = P + S), every row of length T.
        key, value = (
            _value("key", f32, ["B", NKV, "T", D]),
            _value("value", f32, ["B", NKV, "T", D]),
        )
        inputs += [key, value]
        total = op.Cast(op.Shape(key, start=2, end=3), to=i32)
        one = op.Constant(value=ir.tensor(np.array([1], dtype=np.int32)))
        seqlens = op.Expand(op.Sub(total, one), op.Shape(key, start=0, end=1))
        shape = op.Concat(
            op.Shape(query, start=0, end=1), op.Constant(value_ints=[0, KV_HIDDEN]), axis=0
        )
        empty = op.ConstantOfShape(shape, value=ir.tensor(np.zeros(1, dtype=np.float32)))
        output = shared_if(
            op,
            query,
            (key, value),
            seqlens,
            total,
            empty,
            KV_HIDDEN,
            gqa,
            output_type=ir.TensorType(f32),
            name="layer",
        )
    else:
        # Own cache: this call's K/V [B, S, Nkv*D] appended to a past [B, Nkv, P, D].
        new_key, new_value = (
            _value("new_key", f32, ["B", "S", KV_HIDDEN]),
            _value("new_value", f32, ["B", "S", KV_HIDDEN]),
        )
        past_key, past_value = (
            _value("past_key", f32, ["B", NKV, "P", D]),
            _value("past_value", f32, ["B", NKV, "P", D]),
        )
        inputs += [new_key, new_value, past_key, past_value]
        total = op.Cast(
            op.Add(op.Shape(past_key, start=2, end=3), op.Shape(new_key, start=1, end=2)), to=i32
        )
        seqlens = op.Expand(
            op.Sub(total, op.Constant(value=ir.tensor(np.array([1], dtype=np.int32)))),
            op.Shape(new_key, start=0, end=1),
        )
        gqa_inputs = [query, new_key, new_value, past_key, past_value, seqlens, total]
        gqa_inputs = with_query_seqlens(gqa_inputs, query_seqlens(op, seqlens, new_key))
        output = gqa(op, gqa_inputs, 3)
    output.name = "output"
    graph = ir.Graph(inputs, [output], nodes=op.nodes, opset_imports={"": 21, "com.microsoft": 1})
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


# (B, P, S): a prefill (P = 0, S = T), decode steps, and chunks after a past at batch 1 and 2;
# P = 9 with S = 3 crosses a window of 4 in the chunk.
CALLS = [(2, 0, 5), (2, 5, 1), (1, 5, 3), (2, 5, 3), (2, 9, 3), (2, 1, 4)]


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-if", "own-query-seqlens"])
def test_every_call_the_graph_takes_runs_and_is_exact(shared: bool, window: int | None) -> None:
    session = _session(shared, window)
    rng = np.random.default_rng(0)
    for batch, past, length in CALLS:
        total = past + length
        query = (rng.standard_normal((batch, length, HIDDEN)) * 0.5).astype(np.float32)
        key = rng.standard_normal((batch, NKV, total, D)).astype(np.float32)
        value = rng.standard_normal((batch, NKV, total, D)).astype(np.float32)
        if shared:
            feeds = {"query": query, "key": key, "value": value}
        else:
            new_key, new_value = (
                cache[:, :, past:].transpose(0, 2, 1, 3).reshape(batch, length, KV_HIDDEN)
                for cache in (key, value)
            )
            feeds = {
                "query": query,
                "new_key": new_key,
                "new_value": new_value,
                "past_key": key[:, :, :past],
                "past_value": value[:, :, :past],
            }
        (actual,) = session.run(["output"], feeds)
        expected = _reference(query, key, value, window)
        assert np.abs(actual - expected).max() < 1e-5, (batch, past, length)


def test_without_query_seqlens_ort_refuses_the_batched_chunk() -> None:
    """What the limit is: the past form alone refuses B=2, S=3 after a past of 5."""
    session = _session(True, None)
    rng = np.random.default_rng(1)
    feeds = {
        "query": rng.standard_normal((2, 3, HIDDEN)).astype(np.float32),
        "key": rng.standard_normal((2, NKV, 8, D)).astype(np.float32),
        "value": rng.standard_normal((2, NKV, 8, D)).astype(np.float32),
    }
    (taken,) = session.run(["output"], feeds)  # the If's split branch takes it
    expected = _reference(feeds["query"], feeds["key"], feeds["value"], None)
    assert np.abs(taken - expected).max() < 1e-5
    f32 = ir.DataType.FLOAT
    op = TapeBuilder()
    query = _value("query", f32, ["B", "S", HIDDEN])
    key, value = _value("key", f32, ["B", NKV, "T", D]), _value("value", f32, ["B", NKV, "T", D])
    total = op.Cast(op.Shape(key, start=2, end=3), to=ir.DataType.INT32)
    one = op.Constant(value=ir.tensor(np.array([1], dtype=np.int32)))
    seqlens = op.Expand(op.Sub(total, one), op.Shape(key, start=0, end=1))
    shape = op.Concat(
        op.Shape(query, start=0, end=1), op.Constant(value_ints=[0, KV_HIDDEN]), axis=0
    )
    empty = op.ConstantOfShape(shape, value=ir.tensor(np.zeros(1, dtype=np.float32)))
    output = op.GroupQueryAttention(
        query,
        empty,
        empty,
        key,
        value,
        seqlens,
        total,
        _domain="com.microsoft",
        num_heads=N,
        kv_num_heads=NKV,
        scale=1.0,
    )
    output.name = "output"
    graph = ir.Graph(
        [query, key, value], [output], nodes=op.nodes, opset_imports={"": 21, "com.microsoft": 1}
    )
    past_only = ort.InferenceSession(
        ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    with pytest.raises(Exception, match="batch_size must be 1"):
        past_only.run(["output"], feeds)
