"""One KV-shared layer as the exporters write it, its feeds and its float64 reference.

Shared by the property test (tests/test_properties_reference.py) and the window-slice tests
(tests/test_window_slice.py): the smallest model the rule rewrites, so a failure points at
the GroupQueryAttention the rule builds, not at a model.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from strategies import SingleLayerCase

from rewriter.probe._reference import attention_reference
from rewriter.verification._tolerance import RELATIVE_TOLERANCE

CHUNK_NEEDS_BATCH_1 = "batch_size must be 1 when sequence_length > 1 and past context is given"
_KEY, _VALUE = "past_key_values.0.key", "past_key_values.0.value"


def shared_layer_model(case: SingleLayerCase) -> ir.Model:
    """One KV-shared Attention as the exporters write it (SPEC.md section 2)."""
    dtype = ir.DataType.FLOAT16 if case.dtype == "float16" else ir.DataType.FLOAT
    nodes: list[ir.Node] = []
    initializers: list[ir.Value] = []

    def const(name: str, array: np.ndarray) -> ir.Value:
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype))
        value.const_value = tensor
        initializers.append(value)
        return value

    def node(op_type: str, *inputs: ir.Value, **attributes: object) -> ir.Value:
        nodes.append(ir.node(op_type, list(inputs), attributes))
        return nodes[-1].outputs[0]

    d, n, nkv = case.head_size, case.num_heads, case.kv_num_heads
    query = ir.Value(
        name="query", type=ir.TensorType(dtype), shape=ir.Shape(["batch", "seq", n * d])
    )
    attention_mask = ir.Value(
        name="attention_mask",
        type=ir.TensorType(ir.DataType.INT64),
        shape=ir.Shape(["batch", "total"]),
    )
    caches = [
        ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(["batch", nkv, "total", d]))
        for name in (_KEY, _VALUE)
    ]
    merge_heads = const("shape_0_0_-1", np.array([0, 0, -1], dtype=np.int64))
    key_BSD, value_BSD = (
        node("Reshape", node("Transpose", cache, perm=[0, 2, 1, 3]), merge_heads)
        for cache in caches
    )

    axes_1 = const("axes_1", np.array([1], dtype=np.int64))
    positions = node("CumSum", attention_mask, const("axis_1", np.array(1, dtype=np.int64)))
    key_positions = node("Unsqueeze", positions, axes_1)
    total = node("Shape", attention_mask, start=1, end=2)
    query_length = node("Shape", query, start=1, end=2)
    first_query = node("Sub", total, query_length)
    query_positions = node(
        "Unsqueeze",
        node("Slice", positions, first_query, total, axes_1),
        const("axes_2", np.array([2], dtype=np.int64)),
    )
    padding = node("Cast", node("Unsqueeze", attention_mask, axes_1), to=int(ir.DataType.BOOL))
    in_window = None
    if case.window is not None:
        window = const("window", np.array(case.window, dtype=np.int64))
        in_window = node("Less", node("Sub", query_positions, key_positions), window)
    if case.mask_style == "p1":
        is_causal = 1
        if in_window is not None:
            mask = node("And", in_window, padding)
        else:
            batch = node("Shape", query, start=0, end=1)
            shape = node("Concat", batch, query_length, total, axis=0)
            mask = node("Expand", padding, shape)
    else:
        is_causal = 0
        allowed = node("GreaterOrEqual", query_positions, key_positions)
        if in_window is not None:
            allowed = node("And", allowed, in_window)
        np_dtype = dtype.numpy()
        zero = const("zero", np.array(0, dtype=np_dtype))
        negative = const("negative", np.array(np.finfo(np_dtype).min, dtype=np_dtype))
        bias = node("Where", node("And", padding, allowed), zero, negative)
        mask = node("Unsqueeze", bias, axes_1)

    attributes: dict[str, object] = {
        "q_num_heads": n,
        "kv_num_heads": nkv,
        "is_causal": is_causal,
        "softcap": float(case.softcap),
    }
    if case.scale is not None:
        attributes["scale"] = float(case.scale)
    output = node("Attention", query, key_BSD, value_BSD, mask, **attributes)
    output.name = "output"
    output.type = ir.TensorType(dtype)
    output.shape = ir.Shape(["batch", "seq", n * d])
    graph = ir.Graph(
        [query, attention_mask, *caches],
        [output],
        nodes=nodes,
        initializers=initializers,
        opset_imports={"": 23},
        name="one_kv_shared_layer",
    )
    return ir.Model(graph, ir_version=11)


def feeds(case: SingleLayerCase) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(case.seed)
    dtype = np.dtype(case.dtype)
    b, s, t = case.batch, case.query_length, case.total_length
    mask = np.zeros((b, t), dtype=np.int64)
    for row, length in enumerate(case.valid_lengths):
        mask[row, :length] = 1
    cache_shape = (b, case.kv_num_heads, t, case.head_size)
    return {
        "query": rng.standard_normal((b, s, case.num_heads * case.head_size)).astype(dtype),
        "attention_mask": mask,
        _KEY: rng.standard_normal(cache_shape).astype(dtype),
        _VALUE: rng.standard_normal(cache_shape).astype(dtype),
    }


def reference(case: SingleLayerCase, inputs: dict[str, np.ndarray], rows: slice) -> np.ndarray:
    """The float64 output for `rows`; in a padded prefill, row by row over its valid prefix."""
    scale = case.scale if case.scale is not None else 1.0 / np.sqrt(case.head_size)
    options = {
        "num_heads": case.num_heads,
        "kv_num_heads": case.kv_num_heads,
        "scale": scale,
        "local_window_size": case.window,
        "softcap": case.softcap,
    }
    lengths = np.asarray(case.valid_lengths)[rows]
    if not case.is_prefill:
        return attention_reference(
            inputs["query"][rows], inputs[_KEY][rows], inputs[_VALUE][rows], lengths, **options
        )
    out = np.zeros(inputs["query"][rows].shape)
    for index, length in enumerate(lengths):
        row = rows.start + index
        out[index, :length] = attention_reference(
            inputs["query"][row : row + 1, :length],
            inputs[_KEY][row : row + 1, :, :length],
            inputs[_VALUE][row : row + 1, :, :length],
            [length],
            **options,
        )[0]
    return out


def assert_close(case: SingleLayerCase, actual: np.ndarray, expected: np.ndarray, rows) -> None:
    """Compare valid query positions, tolerance as the verifier fixes it for the dtype."""
    tolerance = RELATIVE_TOLERANCE[np.dtype(case.dtype)]
    for index, length in enumerate(np.asarray(case.valid_lengths)[rows]):
        valid = slice(0, length) if case.is_prefill else slice(None)
        got = actual[index, valid].astype(np.float64)
        want = expected[index, valid]
        assert np.all(np.isfinite(got)), f"row {index}: non-finite output"
        error = float(np.max(np.abs(got - want))) if want.size else 0.0
        bound = tolerance * max(1.0, float(np.max(np.abs(want))) if want.size else 0.0)
        assert error <= bound, f"row {index}: max |GQA - reference| {error:.3g} > {bound:.3g}"
