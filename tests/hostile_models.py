"""Models a hostile user would hand the rewriter (issue 23), built from the generator's decoder.

Each is the tiny P2 decoder with one defect: a cycle, a mistyped or negative head count, a
value name that is not valid UTF-8. (The 2^62 sliding window needs no helper:
``tiny_config(sliding_window=2**62)`` builds it.)
"""

from __future__ import annotations

import onnx
from onnx import helper

from rewriter.fixtures.gemma4_like import build_decoder, tiny_config

__all__ = ["decoder", "first_attention", "with_bad_utf8_name", "with_cycle", "with_head_count"]


def decoder(**overrides: object) -> onnx.ModelProto:
    return build_decoder(tiny_config(mask_style="p2", **overrides))


def first_attention(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.op_type == "Attention")


def with_cycle(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Layer 0's first node reads a value layer 1 computes from it; returns the node's name."""
    first = next(node for node in model.graph.node if node.name.startswith("/model/layers.0/"))
    later = next(node for node in model.graph.node if node.name.startswith("/model/layers.1/"))
    first.input[0] = later.output[0]
    return model, first.name


def with_head_count(model: onnx.ModelProto, value: object) -> tuple[onnx.ModelProto, str]:
    """The first Attention's q_num_heads replaced by `value` (any attribute type)."""
    node = first_attention(model)
    kept = [attribute for attribute in node.attribute if attribute.name != "q_num_heads"]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("q_num_heads", value)])
    return model, node.name


def with_bad_utf8_name(model: onnx.ModelProto) -> bytes:
    """The serialized model with the first Attention's query value renamed to bytes that are
    not UTF-8 (protobuf's Python API cannot set such a name: the bytes are patched)."""
    node = first_attention(model)
    old = node.input[0]
    placeholder = "Q" * len(old.encode())
    assert placeholder.encode() not in model.SerializeToString()
    for other in model.graph.node:
        other.input[:] = [placeholder if name == old else name for name in other.input]
        other.output[:] = [placeholder if name == old else name for name in other.output]
    for info in model.graph.value_info:
        if info.name == old:
            info.name = placeholder
    invalid = b"\xff" + placeholder[1:].encode()
    return model.SerializeToString().replace(placeholder.encode(), invalid)
