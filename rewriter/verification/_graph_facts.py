"""Facts read from a model's graph that its input/output signature does not carry.

The verifier needs a few numbers to pick meaningful inputs (vocabulary size, sliding window,
how many positions the rotary cache covers) and a few structural facts to explain defects of
an original model. All are read without loading weights: shapes of external tensors are
metadata.

Like the layer cuts (``_layer_extract``), these are read from the graph on purpose, not
taken from the rules or the report: which node writes each present cache in particular
(``_cache_writer``), looking through the If and Concat a speed choice writes, where the
rules' schema table (``rules._cache_writers``) names only a direct writer. Where both name
one they must agree (``tests/test_layer_readings.py``).
"""

from __future__ import annotations

import dataclasses
import logging

import onnx
import onnx_ir as ir

from rewriter.metadata import PADDING_CONTRACT_KEY
from rewriter.rules import node_label

__all__ = [
    "GraphFacts",
    "attention_nodes_with_3d_mask",
    "read_graph_facts",
]

logger = logging.getLogger(__name__)

_MS = "com.microsoft"
_PASS_THROUGH = frozenset({"Identity", "Cast", "CastLike"})


@dataclasses.dataclass(frozen=True)
class GraphFacts:
    # Positive local_window_size of every GroupQueryAttention node.
    gqa_windows: tuple[int, ...]
    # Rows of the embedding table gathered by input_ids, when it is a plain initializer.
    embedding_rows: int | None
    # Fewest rows among rotary cos caches: positions beyond it are out of the model's range.
    rotary_rows: int | None
    # ai.onnx Attention nodes with is_causal=1 and no past inputs: ONNX aligns their causal
    # mask to the upper left, which is wrong whenever the query is shorter than the keys.
    upper_left_causal_nodes: tuple[str, ...]
    # op_type of the node producing each present.* graph output, by output name.
    cache_writers: dict[str, str]
    # Padding contract a rewritten model declares in its metadata (None for an original).
    declared_padding_contract: str | None = None


def read_graph_facts(model: ir.Model) -> GraphFacts:
    windows: list[int] = []
    rotary_rows: list[int] = []
    upper_left: list[str] = []
    embedding_rows: int | None = None
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "GroupQueryAttention" and node.domain == _MS:
            window = node.attributes.get_int("local_window_size", -1)
            if window > 0:
                windows.append(window)
            if node.attributes.get_int("do_rotary", 0) and len(node.inputs) > 7:
                _append_rows(rotary_rows, node.inputs[7])
        elif node.op_type == "RotaryEmbedding" and node.domain in ("", _MS):
            # ai.onnx: (X, cos_cache, sin_cache, position_ids); com.microsoft: (X, position_ids,
            # cos_cache, sin_cache).
            _append_rows(rotary_rows, node.inputs[1] if node.domain == "" else node.inputs[2])
        elif node.op_type == "Attention" and node.domain == "":
            has_past = len(node.inputs) > 4 and node.inputs[4] is not None
            if node.attributes.get_int("is_causal", 0) == 1 and not has_past:
                upper_left.append(node_label(node))
        elif node.op_type == "Gather" and node.domain == "" and embedding_rows is None:
            indices = node.inputs[1]
            if indices is not None and indices.name == "input_ids" and indices.is_graph_input():
                embedding_rows = _first_dim(node.inputs[0])
    writers = {
        output.name: _cache_writer(output)
        for output in model.graph.outputs
        if output.name and output.name.startswith("present")
    }
    return GraphFacts(
        gqa_windows=tuple(windows),
        embedding_rows=embedding_rows,
        rotary_rows=min(rotary_rows) if rotary_rows else None,
        upper_left_causal_nodes=tuple(upper_left),
        cache_writers=writers,
        declared_padding_contract=model.metadata_props.get(PADDING_CONTRACT_KEY),
    )


def attention_nodes_without_mask(model: ir.Model) -> list[str]:
    """ai.onnx Attention nodes with neither a mask nor is_causal=1 (a speculative-decoding
    drafter's full layer): every query reads every key of its cache, so keys at a padded
    row's padding positions count too, and a padded row differs from the row run alone."""
    return [
        node_label(node)
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.op_type == "Attention"
        and node.domain == ""
        and (len(node.inputs) < 4 or node.inputs[3] is None)
        and node.attributes.get_int("is_causal", 0) == 0
    ]


def attention_nodes_with_3d_mask(model: ir.Model) -> list[str]:
    """ai.onnx Attention nodes whose attn_mask is 3-D. ONNX reads a 3-D mask as
    [q_num_heads, S, T], so an exporter's [B, S, T] mask breaks at batch > 1.

    Only called to explain a failure, since it may run ONNX shape inference.
    """
    nodes = [
        node
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.op_type == "Attention"
        and node.domain == ""
        and len(node.inputs) > 3
        and node.inputs[3] is not None
    ]
    ranks = {node.inputs[3].name: _rank(node.inputs[3]) for node in nodes}  # type: ignore[union-attr]
    if any(rank is None for rank in ranks.values()):
        ranks.update({name: rank for name, rank in _inferred_ranks(model).items() if name in ranks})
    return [
        node_label(node)
        for node in nodes
        if ranks.get(node.inputs[3].name) == 3  # type: ignore[union-attr]
    ]


def _cache_writer(value: ir.Value) -> str:
    """op_type of the node that writes a cache output in decode (which convention a decode
    step's mask must follow), looking through dtype/identity hops and into the decode
    branch of an If on S == 1 (rules._speed_choice.own_cache_fold: Concat in decode, GQA or
    the export's Attention in prefill). A Concat of past and new appends after a row's
    padding, as Attention with past does, so it counts as an Attention writer."""
    producer = value.producer()
    while producer is not None and producer.op_type in _PASS_THROUGH and producer.inputs:
        source = producer.inputs[0]
        producer = source.producer() if source is not None else None
    if producer is None:
        return "graph input"
    if producer.op_type == "Concat":
        return "Attention"
    decode = producer.attributes.get("then_branch") if producer.op_type == "If" else None
    if decode is not None and value in producer.outputs:
        return _cache_writer(decode.as_graph().outputs[list(producer.outputs).index(value)])
    return producer.op_type


def _append_rows(rows: list[int], value: ir.Value | None) -> None:
    first = _first_dim(value)
    if first is not None:
        rows.append(first)


def _first_dim(value: ir.Value | None) -> int | None:
    if value is None:
        return None
    shape = value.shape
    if shape is None:
        tensor = ir.convenience.get_const_tensor(value)
        shape = tensor.shape if tensor is not None else None
    if shape is None or len(shape) == 0 or not isinstance(shape[0], int):
        return None
    return shape[0]


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _inferred_ranks(model: ir.Model) -> dict[str, int]:
    try:
        # onnx_ir's helper strips large initializers before calling the C API (protobuf
        # limit) and restores the model afterwards; the result is not merged into the model.
        from onnx_ir.passes.common._c_api_utils import call_onnx_api

        inferred = call_onnx_api(onnx.shape_inference.infer_shapes, model)
    except Exception as error:  # a missing helper or a failed inference: rank stays unknown
        logger.debug("shape inference failed: %s", error)
        return {}
    return {
        info.name: len(info.type.tensor_type.shape.dim)
        for info in inferred.graph.value_info
        if info.type.tensor_type.HasField("shape")
    }
