"""Structural proof that a rewrite changed nothing outside the layers it replaced.

The layer proofs show each replaced subgraph computes what the original one did; this check
shows everything else is the same graph: every node outside the layers' subgraphs exists on
the other side with the same op, domain, attributes and input/output names; graph inputs and
outputs have the same names, types and shapes; and every initializer read outside the layers
holds the same bytes (external data is compared in chunks, never loaded whole).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable

import onnx_ir as ir

from rewriter.rules import node_label
from rewriter.verification._result import CheckResult

__all__ = ["GRAPH_DIFF", "diff_outside_layers", "inputs_deep", "same_tensor"]

GRAPH_DIFF = "unchanged_outside_layers"
_CHUNK_BYTES = 64 << 20
_LISTED = 5  # differences named in the detail, per kind


def diff_outside_layers(
    original: ir.Model,
    candidate: ir.Model,
    original_layer_nodes: frozenset[ir.Node],
    candidate_layer_nodes: frozenset[ir.Node],
) -> CheckResult:
    differences: list[str] = []
    original_keys = collections.Counter(_node_key(n) for n in original.graph)
    candidate_keys = collections.Counter(_node_key(n) for n in candidate.graph)
    added = [
        node_label(n)
        for n in candidate.graph
        if n not in candidate_layer_nodes and original_keys[_node_key(n)] == 0
    ]
    removed = [
        node_label(n)
        for n in original.graph
        if n not in original_layer_nodes and candidate_keys[_node_key(n)] == 0
    ]
    _list(differences, "added or changed outside the layers", added)
    _list(differences, "removed or changed outside the layers", removed)
    for kind in ("inputs", "outputs"):
        before = [_value_key(v) for v in getattr(original.graph, kind)]
        after = [_value_key(v) for v in getattr(candidate.graph, kind)]
        if before != after:
            changed = [a for a in after if a not in before] + [b for b in before if b not in after]
            _list(differences, f"graph {kind} differ", [str(c) for c in changed])
    compared, initializer_differences = _initializers(
        original, candidate, original_layer_nodes, candidate_layer_nodes
    )
    differences += initializer_differences
    outside = len(original.graph) - len(original_layer_nodes & set(original.graph))
    summary = (
        f"{outside} nodes outside {len(original_layer_nodes)} layer nodes, "
        f"{len(original.graph.inputs)} inputs, {len(original.graph.outputs)} outputs, "
        f"{compared} initializers compared byte for byte"
    )
    if differences:
        return CheckResult(
            GRAPH_DIFF, "candidate", False, detail="; ".join(differences) + f" ({summary})"
        )
    return CheckResult(GRAPH_DIFF, "candidate", True, 0.0, 0.0, detail=summary)


def _list(differences: list[str], what: str, items: list[str]) -> None:
    if items:
        more = f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
        differences.append(f"{len(items)} {what}: {', '.join(items[:_LISTED])}{more}")


def _node_key(node: ir.Node) -> tuple[object, ...]:
    return (
        node.domain or "",
        node.op_type,
        node.overload,
        tuple(v.name if v is not None else "" for v in node.inputs),
        tuple(v.name for v in node.outputs),
        tuple(sorted((name, _attribute_key(attr)) for name, attr in node.attributes.items())),
    )


def _attribute_key(attr: ir.Attr) -> str:
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        graphs = [attr.as_graph()] if attr.type == ir.AttributeType.GRAPH else attr.as_graphs()
        return repr([ir.serde.serialize_graph(g).SerializeToString() for g in graphs])
    if attr.type == ir.AttributeType.TENSOR:
        tensor = attr.as_tensor()
        return f"{tensor.dtype}{tensor.shape}{tensor.tobytes()!r}"
    return repr(attr.value)


def _value_key(value: ir.Value) -> tuple[str, str, str]:
    return (value.name or "", str(value.type), str(value.shape))


def _readers(graph: ir.Graph, excluded: frozenset[ir.Node]) -> set[str]:
    """Names of initializers read by a node outside the layers (or returned as outputs)."""
    names = {v.name for v in graph.outputs if v.name}
    for node in graph:
        if node in excluded:
            continue
        names.update(v.name for v in inputs_deep(node) if v is not None and v.name)
    return names


def inputs_deep(node: ir.Node) -> Iterable[ir.Value | None]:
    yield from node.inputs
    for attr in node.attributes.values():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            graphs = [attr.as_graph()] if attr.type == ir.AttributeType.GRAPH else attr.as_graphs()
            for graph in graphs:
                for inner in ir.traversal.RecursiveGraphIterator(graph):
                    yield from inner.inputs


def _initializers(
    original: ir.Model,
    candidate: ir.Model,
    original_layer_nodes: frozenset[ir.Node],
    candidate_layer_nodes: frozenset[ir.Node],
) -> tuple[int, list[str]]:
    names = _readers(original.graph, original_layer_nodes) | _readers(
        candidate.graph, candidate_layer_nodes
    )
    missing, changed = [], []
    compared = 0
    for name in sorted(names):
        before = original.graph.initializers.get(name)
        after = candidate.graph.initializers.get(name)
        if before is None and after is None:
            continue
        if before is None or after is None or before.const_value is None:
            missing.append(name)
            continue
        if after.const_value is None or not same_tensor(before.const_value, after.const_value):
            changed.append(name)
        compared += 1
    differences: list[str] = []
    _list(differences, "initializers only on one side", missing)
    _list(differences, "initializers with different data, dtype or shape", changed)
    return compared, differences


def same_tensor(a: ir.TensorProtocol, b: ir.TensorProtocol) -> bool:
    """Same dtype, shape and bytes; external data is read in chunks, never whole."""
    if a is b:
        return True
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if isinstance(a, ir.ExternalTensor) and isinstance(b, ir.ExternalTensor):
        if os.path.realpath(a.path) == os.path.realpath(b.path) and a.offset == b.offset:
            return a.length == b.length
        return _same_external_bytes(a, b)
    if isinstance(a, ir.ExternalTensor) or isinstance(b, ir.ExternalTensor):
        external, inline = (a, b) if isinstance(a, ir.ExternalTensor) else (b, a)
        data = inline.tobytes()
        return _external_chunks_equal(external, data)
    return a.tobytes() == b.tobytes()


def _chunks(tensor: ir.ExternalTensor) -> Iterable[bytes]:
    length = tensor.length if tensor.length is not None else tensor.nbytes
    with open(tensor.path, "rb") as file:
        file.seek(tensor.offset or 0)
        remaining = length
        while remaining > 0:
            chunk = file.read(min(_CHUNK_BYTES, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk


def _same_external_bytes(a: ir.ExternalTensor, b: ir.ExternalTensor) -> bool:
    left, right = _chunks(a), _chunks(b)
    buffer = b""
    for chunk in left:
        while len(buffer) < len(chunk):
            more = next(right, None)
            if more is None:
                return False
            buffer += more
        if buffer[: len(chunk)] != chunk:
            return False
        buffer = buffer[len(chunk) :]
    return not buffer and next(right, None) is None


def _external_chunks_equal(tensor: ir.ExternalTensor, data: bytes) -> bool:
    position = 0
    for chunk in _chunks(tensor):
        if data[position : position + len(chunk)] != chunk:
            return False
        position += len(chunk)
    return position == len(data)
