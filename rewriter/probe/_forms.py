"""Single-node GroupQueryAttention models, one per way of feeding a borrowed KV cache.

Letters: B batch, S query length, T borrowed cache length, N query heads, Nkv KV heads,
D head size. The borrowed cache arrives as BNSH [B, Nkv, T, D], the layout of the source
layer's present output, and the query as [B, S, N*D].

Every model has float32 graph inputs and output; the requested dtype lives between two Casts.
That keeps the feeding code dtype-agnostic (onnxruntime's Python API has no bfloat16 NumPy
type) and matches the reference, which rounds its inputs to the same dtype.

The plumbing around GQA (empty key/value, slices) is derived from shapes in-graph, as the real
rewrite must do, so one model serves every probe shape.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

__all__ = ["DTYPES", "FORMS", "GQA_NODE_NAME", "build_form_model"]

FORMS: tuple[str, ...] = ("past", "past-present", "kv", "split", "split-nopresent")

DTYPES: dict[str, int] = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
}

GQA_NODE_NAME = "gqa"

# Opset 21 has ConstantOfShape/Cast for bfloat16 and Shape with start/end.
_OPSET = 21
# Pinned so that a newer onnx package cannot write a model the installed runtime refuses.
_IR_VERSION = 10


def build_form_model(
    form: str,
    dtype: str,
    *,
    num_heads: int,
    kv_num_heads: int,
    head_size: int,
    scale: float,
    local_window_size: int | None,
    softcap: float = 0.0,
) -> onnx.ModelProto:
    """Build the model for ``form``.

    Inputs: ``query`` [B, S, N*D], ``borrowed_key_BNSH`` / ``borrowed_value_BNSH``
    [B, Nkv, T, D] (float32), ``seqlens_k`` int32 [B], ``total_sequence_length`` int32 [1].
    Output: ``output`` [B, S, N*D] float32.
    """
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    kv_hidden = kv_num_heads * head_size
    elem_type = DTYPES[dtype]
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []

    def cast(name: str) -> str:
        if elem_type == TensorProto.FLOAT:
            return name
        nodes.append(helper.make_node("Cast", [name], [f"{name}_{dtype}"], to=elem_type))
        return f"{name}_{dtype}"

    def constant(name: str, values: list[int]) -> str:
        initializers.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return name

    def to_BSH(name_BNSH: str, suffix: str) -> str:
        # The exporters' own BNSH -> [B, T, Nkv*D] conversion: the copy the `past` form avoids.
        nodes.append(
            helper.make_node("Transpose", [name_BNSH], [f"{name_BNSH}_BSNH"], perm=[0, 2, 1, 3])
        )
        nodes.append(
            helper.make_node("Reshape", [f"{name_BNSH}_BSNH", "kv_3d_shape"], [f"{suffix}_3d"])
        )
        return f"{suffix}_3d"

    query = cast("query")
    key_BNSH = cast("borrowed_key_BNSH")
    value_BNSH = cast("borrowed_value_BNSH")

    if form in ("past", "past-present"):
        # Empty key/value with the real batch size: GQA reads empty input *names* as packed
        # QKV (SPEC section 3), so the tensors must exist with zero length.
        nodes.append(helper.make_node("Shape", [query], ["batch"], start=0, end=1))
        nodes.append(
            helper.make_node(
                "Concat", ["batch", constant("empty_tail", [0, kv_hidden])], ["empty_shape"], axis=0
            )
        )
        zero = helper.make_tensor("zero", elem_type, [1], [0.0])
        nodes.append(helper.make_node("ConstantOfShape", ["empty_shape"], ["empty_kv"], value=zero))
        gqa_kv = ["empty_kv", "empty_kv", key_BNSH, value_BNSH]
    elif form == "kv":
        constant("kv_3d_shape", [0, 0, kv_hidden])
        gqa_kv = [to_BSH(key_BNSH, "key"), to_BSH(value_BNSH, "value"), "", ""]
    else:  # split, split-nopresent: past = cache[:, :, :T-S], new = cache[:, :, T-S:]
        constant("kv_3d_shape", [0, 0, kv_hidden])
        nodes.append(helper.make_node("Shape", [query], ["query_len"], start=1, end=2))
        nodes.append(helper.make_node("Shape", [key_BNSH], ["cache_len"], start=2, end=3))
        nodes.append(helper.make_node("Sub", ["cache_len", "query_len"], ["past_len"]))
        axis = constant("time_axis", [2])
        start = constant("time_start", [0])
        inputs = []
        for name, kind in ((key_BNSH, "key"), (value_BNSH, "value")):
            nodes.append(
                helper.make_node("Slice", [name, start, "past_len", axis], [f"past_{kind}"])
            )
            nodes.append(
                helper.make_node("Slice", [name, "past_len", "cache_len", axis], [f"new_{kind}"])
            )
            inputs.append((f"past_{kind}", to_BSH(f"new_{kind}", kind)))
        gqa_kv = [inputs[0][1], inputs[1][1], inputs[0][0], inputs[1][0]]

    keep_present = form in ("past-present", "kv", "split")
    output = "output" if elem_type == TensorProto.FLOAT else f"output_{dtype}"
    outputs = [output]
    if keep_present:
        # Present outputs exist but nothing reads them, as in a rewritten shared layer.
        outputs += ["present_key", "present_value"]
    attributes: dict[str, float | int] = {
        "num_heads": num_heads,
        "kv_num_heads": kv_num_heads,
        "scale": scale,
        "local_window_size": -1 if local_window_size is None else local_window_size,
        "do_rotary": 0,
    }
    if softcap > 0.0:
        attributes["softcap"] = softcap
    nodes.append(
        helper.make_node(
            "GroupQueryAttention",
            [query, *gqa_kv, "seqlens_k", "total_sequence_length"],
            outputs,
            name=GQA_NODE_NAME,
            domain="com.microsoft",
            **attributes,
        )
    )
    if output != "output":
        nodes.append(helper.make_node("Cast", [output], ["output"], to=TensorProto.FLOAT))

    hidden = num_heads * head_size
    graph = helper.make_graph(
        nodes,
        f"gqa_{form.replace('-', '_')}_{dtype}",
        [
            helper.make_tensor_value_info("query", TensorProto.FLOAT, ["B", "S", hidden]),
            helper.make_tensor_value_info(
                "borrowed_key_BNSH", TensorProto.FLOAT, ["B", kv_num_heads, "T", head_size]
            ),
            helper.make_tensor_value_info(
                "borrowed_value_BNSH", TensorProto.FLOAT, ["B", kv_num_heads, "T", head_size]
            ),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [1]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", "S", hidden])],
        initializer=initializers,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _OPSET), helper.make_opsetid("com.microsoft", 1)],
        ir_version=_IR_VERSION,
    )
