"""One KV-shared layer as the exporters write it: a query, a borrowed BNSH cache made 3-D by
Transpose+Reshape, the P1 or P2 mask chain over ``attention_mask``, and one ``Attention``.

The smallest model the KV-shared rule rewrites, so what the rule writes for it is the real
construction, not a copy: the form probe (``_forms``) runs what the rule writes for it in each
GQA form, the speed probe (``rewriter.speed``) times it before and after the rewrite, and the
tests compare it with the float64 reference.

Inputs: ``query`` [B, S, N*D], ``attention_mask`` [B, T], ``past_key_values.0.key|value``
[B, Nkv, T, D]; output ``output`` [B, S, N*D].
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir

from rewriter._rewrite_steps import rewrite_layers
from rewriter.rules import FormDecision, LayerDecisions

__all__ = [
    "CACHE_KEY",
    "CACHE_VALUE",
    "NEW_KEY",
    "NEW_VALUE",
    "OneLayer",
    "kv_shared_layer",
    "own_cache_layer",
    "rewritten_layer",
]

CACHE_KEY, CACHE_VALUE = "past_key_values.0.key", "past_key_values.0.value"
# A layer with its own cache also takes this call's key/value [B, S, Nkv*D].
NEW_KEY, NEW_VALUE = "key", "value"


@dataclasses.dataclass(frozen=True)
class OneLayer:
    num_heads: int
    kv_num_heads: int
    head_size: int
    window: int | None  # None: full attention
    mask_style: str = "p2"  # "p1" (bool mask, is_causal=1) or "p2" (float bias, is_causal=0)
    scale: float | None = 1.0  # None: no scale attribute (op default 1/sqrt(D))
    softcap: float = 0.0
    dtype: str = "float32"  # "float32", "float16" or "bfloat16": inputs, caches and output


_DTYPES = {
    "float32": ir.DataType.FLOAT,
    "float16": ir.DataType.FLOAT16,
    "bfloat16": ir.DataType.BFLOAT16,
}


def kv_shared_layer(layer: OneLayer) -> ir.Model:
    """One KV-shared Attention as the exporters write it (SPEC.md section 2)."""
    return _layer_model(layer, own_cache=False)


def own_cache_layer(layer: OneLayer) -> ir.Model:
    """One layer with its own cache as the exporters write it: the same mask chain over
    ``attention_mask`` [B, T], ``Attention(query, key, value, mask, past_key, past_value)``
    with the past caches [B, Nkv, T - S, D] as inputs ``past_key_values.0.key|value`` and
    the presents as outputs ``present_key``/``present_value``."""
    return _layer_model(layer, own_cache=True)


def _layer_model(layer: OneLayer, *, own_cache: bool) -> ir.Model:
    case = layer
    dtype = _DTYPES[case.dtype]
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
        for name in (CACHE_KEY, CACHE_VALUE)
    ]
    if own_cache:
        for cache in caches:
            cache.shape = ir.Shape(["batch", nkv, "past", d])
        new_key_value = [
            ir.Value(
                name=name, type=ir.TensorType(dtype), shape=ir.Shape(["batch", "seq", nkv * d])
            )
            for name in (NEW_KEY, NEW_VALUE)
        ]
        key_BSD, value_BSD = new_key_value
    else:
        new_key_value = []
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
        # ml_dtypes.finfo also knows bfloat16, which NumPy does not.
        negative = const("negative", np.array(ml_dtypes.finfo(np_dtype).min, dtype=np_dtype))
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
    past = caches if own_cache else []
    nodes.append(
        ir.node(
            "Attention",
            [query, key_BSD, value_BSD, mask, *past],
            attributes,
            num_outputs=3 if own_cache else 1,
        )
    )
    output, *presents = nodes[-1].outputs
    output.name = "output"
    output.type = ir.TensorType(dtype)
    output.shape = ir.Shape(["batch", "seq", n * d])
    for present, name in zip(presents, ("present_key", "present_value"), strict=False):
        present.name = name
        present.type = ir.TensorType(dtype)
        present.shape = ir.Shape(["batch", nkv, "total", d])
    graph = ir.Graph(
        [query, *new_key_value, attention_mask, *caches],
        [output, *presents],
        nodes=nodes,
        initializers=initializers,
        opset_imports={"": 23},
        name="one_own_cache_layer" if own_cache else "one_kv_shared_layer",
    )
    return ir.Model(graph, ir_version=11)


def rewritten_layer(export: ir.Model, form: str, *, window_slice: bool) -> tuple[ir.Model, ir.Node]:
    """What the KV-shared rule writes for the one-layer `export` in `form`: the model (the
    export, rewritten in place) and its GroupQueryAttention node.

    Raises unless the rule replaced the Attention by exactly one GQA node: timing or probing
    a model the rule left alone would measure or certify nothing.
    """
    log = rewrite_layers(
        export,
        LayerDecisions.asking(lambda *_: FormDecision(form)),
        layers="shared",
        window_slice=window_slice,
    )
    gqa = [
        node
        for node in export.graph
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft"
    ]
    if len(gqa) != 1 or any(node.op_type == "Attention" for node in export.graph):
        skipped = "; ".join(log.skip_reasons()) or "no reason given"
        raise RuntimeError(
            f"the KV-shared rule wrote {len(gqa)} GroupQueryAttention nodes for the {form} "
            f"one-layer export, expected exactly one: {skipped}"
        )
    return export, gqa[0]
