"""Whether a model is one the rewrite can take at all, decided before any rewriting or probing.

A hostile or broken model must be refused with one line naming the node or value at fault,
not found out seconds later as an internal error (issue 23). Each check here is something
that would otherwise fail deep inside the rewrite, the save or the verifier:

- every name is text (protobuf hands a name that is not valid UTF-8 over as bytes, and
  serializing it fails only after all the work);
- the graph has no cycle (the rewrite ends with a topological sort);
- attributes of ai.onnx and com.microsoft nodes have the type their schema declares, and the
  head counts of attention nodes are positive (ONNX Runtime refuses both when it loads);
- a sliding window fits GroupQueryAttention's ``local_window_size``, which ONNX Runtime reads
  as a 32-bit int (``static_cast<int>`` in the contrib kernels): a larger window cannot be
  expressed, and one already in a GroupQueryAttention node is silently misread.

Nothing is changed; ``InputRejected`` (a PreconditionError) carries the message.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import onnx
import onnx_ir as ir

from rewriter.rules._failure import MatchFailureError
from rewriter.rules._mask_patterns import match_mask
from rewriter.rules._position_masks import match_position_mask

__all__ = ["INT32_MAX", "InputRejected", "check_rewritable"]

INT32_MAX = 2**31 - 1

_MS_DOMAIN = "com.microsoft"
# Head counts ONNX Runtime requires to be positive (Attention's type inference, GQA's kernel).
_HEAD_COUNTS = {
    ("", "Attention"): ("q_num_heads", "kv_num_heads"),
    (_MS_DOMAIN, "GroupQueryAttention"): ("num_heads", "kv_num_heads"),
}
_ATTRIBUTE_TYPES = {
    onnx.defs.OpSchema.AttrType.FLOAT: ir.AttributeType.FLOAT,
    onnx.defs.OpSchema.AttrType.INT: ir.AttributeType.INT,
    onnx.defs.OpSchema.AttrType.STRING: ir.AttributeType.STRING,
    onnx.defs.OpSchema.AttrType.TENSOR: ir.AttributeType.TENSOR,
    onnx.defs.OpSchema.AttrType.GRAPH: ir.AttributeType.GRAPH,
    onnx.defs.OpSchema.AttrType.FLOATS: ir.AttributeType.FLOATS,
    onnx.defs.OpSchema.AttrType.INTS: ir.AttributeType.INTS,
    onnx.defs.OpSchema.AttrType.STRINGS: ir.AttributeType.STRINGS,
    onnx.defs.OpSchema.AttrType.TENSORS: ir.AttributeType.TENSORS,
    onnx.defs.OpSchema.AttrType.GRAPHS: ir.AttributeType.GRAPHS,
}


class InputRejected(ir.passes.PreconditionError):
    """The model cannot be rewritten; the message is one line naming the node or value."""


def check_rewritable(model: ir.Model) -> None:
    """Raise InputRejected for the first problem found, in the order the module lists."""
    _check_names(model)
    for graph_like in (model.graph, *model.functions.values()):
        _check_acyclic(graph_like)
    for node, graph_like in _nodes(model):
        _check_attributes(model, node)
        _check_window(model, node, graph_like)


def _nodes(model: ir.Model) -> Iterator[tuple[ir.Node, ir.Graph | ir.Function]]:
    for graph_like in (model.graph, *model.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph_like):
            graph = node.graph
            yield node, graph if graph is not None and graph is not model.graph else graph_like


def _label(node: ir.Node) -> str:
    name = node.name if isinstance(node.name, str) else _shown(node.name)
    return f"node {name or '(unnamed)'} ({node.op_type})"


def _shown(text: object) -> str:
    """A name that is not text, as Python writes bytes (the bad bytes stay visible)."""
    return repr(text)[:120]


# --- names ---------------------------------------------------------------------------------


def _check_names(model: ir.Model) -> None:
    for key, value in model.metadata_props.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InputRejected(f"metadata property {_shown(key)} is not valid UTF-8")
    for graph_like in (model.graph, *model.functions.values()):
        for value in (*graph_like.inputs, *graph_like.outputs):
            _check_value_name(value, "graph input/output")
        for node in ir.traversal.RecursiveGraphIterator(graph_like):
            for field in ("name", "op_type", "domain"):
                text = getattr(node, field)
                if text is not None and not isinstance(text, str):
                    raise InputRejected(
                        f"a {node.op_type!s} node's {field} {_shown(text)} is not valid UTF-8"
                    )
            for index, value in enumerate(node.inputs):
                _check_value_name(value, f"{_label(node)} input {index}")
            for index, value in enumerate(node.outputs):
                _check_value_name(value, f"{_label(node)} output {index}")
    for graph in model.graphs():
        for name in graph.initializers:
            if not isinstance(name, str):
                raise InputRejected(f"initializer name {_shown(name)} is not valid UTF-8")


def _check_value_name(value: ir.Value | None, where: str) -> None:
    if value is not None and value.name is not None and not isinstance(value.name, str):
        raise InputRejected(f"{where}: value name {_shown(value.name)} is not valid UTF-8")


# --- cycles --------------------------------------------------------------------------------


def _check_acyclic(graph_like: ir.Graph | ir.Function) -> None:
    """Depth-first over the producers (onnx-ir's sort's edges: inputs, and subgraph nodes as
    predecessors of their node); a node met again on the current path closes a cycle."""
    nodes = list(ir.traversal.RecursiveGraphIterator(graph_like))
    known = set(nodes)
    done: set[ir.Node] = set()
    on_path: set[ir.Node] = set()
    for start in nodes:
        if start in done:
            continue
        stack: list[tuple[ir.Node, Iterator[ir.Node]]] = [(start, _predecessors(start, known))]
        on_path.add(start)
        while stack:
            node, pending = stack[-1]
            successor = next(pending, None)
            if successor is None:
                stack.pop()
                on_path.discard(node)
                done.add(node)
            elif successor in on_path:
                raise InputRejected(
                    f"the graph has a cycle through {_label(successor)}: a value it computes "
                    "is, through other nodes, one of its own inputs"
                )
            elif successor not in done:
                on_path.add(successor)
                stack.append((successor, _predecessors(successor, known)))


def _predecessors(node: ir.Node, known: set[ir.Node]) -> Iterator[ir.Node]:
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and producer in known:
            yield producer
    for attribute in node.attributes.values():
        if attribute.type == ir.AttributeType.GRAPH:
            yield from attribute.value
        elif attribute.type == ir.AttributeType.GRAPHS:
            for graph in attribute.value:
                yield from graph


# --- attributes ----------------------------------------------------------------------------


def _check_attributes(model: ir.Model, node: ir.Node) -> None:
    declared = _declared_types(model, node.domain or "", node.op_type)
    for name, attribute in node.attributes.items():
        if not isinstance(attribute, ir.Attr) or attribute.is_ref():
            continue  # a function's attribute reference: typed where the function is called
        expected = declared.get(name)
        if expected is not None and attribute.type != expected:
            raise InputRejected(
                f"{_label(node)}: attribute {name} is {attribute.type.name}, its schema "
                f"declares {expected.name}"
            )
    for name in _HEAD_COUNTS.get((node.domain or "", node.op_type), ()):
        attribute = node.attributes.get(name)
        if (
            attribute is not None
            and attribute.type == ir.AttributeType.INT
            and attribute.value <= 0
        ):
            raise InputRejected(
                f"{_label(node)}: attribute {name} is {attribute.value}, a head count must "
                "be positive"
            )


def _declared_types(model: ir.Model, domain: str, op_type: str) -> dict[str, ir.AttributeType]:
    if domain in ("", "ai.onnx"):
        version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        return _onnx_schema_types(op_type, version) if version is not None else {}
    if domain == _MS_DOMAIN:
        return _contrib_schema_types().get(op_type, {})
    return {}


@functools.cache
def _onnx_schema_types(op_type: str, version: int) -> dict[str, ir.AttributeType]:
    try:
        schema = onnx.defs.get_schema(op_type, version, "")
    except onnx.defs.SchemaError:
        return {}
    return {
        name: _ATTRIBUTE_TYPES[attribute.type]
        for name, attribute in schema.attributes.items()
        if attribute.type in _ATTRIBUTE_TYPES
    }


@functools.cache
def _contrib_schema_types() -> dict[str, dict[str, ir.AttributeType]]:
    """com.microsoft schemas from the installed onnxruntime; none without it (the pass may
    run without onnxruntime, and then ONNX Runtime is not what reads the model)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
    except ImportError:
        return {}
    types: dict[str, dict[str, ir.AttributeType]] = {}
    for schema in ort_state.get_all_operator_schema():
        if schema.domain != _MS_DOMAIN:
            continue
        declared: dict[str, ir.AttributeType] = {}
        for name, attribute in schema.attributes.items():
            try:  # ORT's AttrType numbers are AttributeProto's; skip any onnx-ir lacks
                declared[name] = ir.AttributeType(int(attribute.type))
            except ValueError:
                continue
        types[schema.name] = declared
    return types


# --- windows -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _MatchContext:
    """What the rules' mask matchers read: the model and the graph holding the node."""

    model: ir.Model
    graph_or_function: ir.Graph | ir.Function


def _check_window(model: ir.Model, node: ir.Node, graph_like: ir.Graph | ir.Function) -> None:
    if node.domain == _MS_DOMAIN and node.op_type == "GroupQueryAttention":
        window = node.attributes.get_int("local_window_size", -1)
        if window > INT32_MAX:
            raise InputRejected(
                f"{_label(node)}: local_window_size {window} does not fit the 32-bit int "
                "ONNX Runtime reads it as"
            )
        return
    if (node.domain or "") != "" or node.op_type != "Attention" or len(node.inputs) < 4:
        return
    mask = node.inputs[3]
    if mask is None:
        return
    window = _mask_window(_MatchContext(model, graph_like), mask)
    if window is not None and window > INT32_MAX:
        raise InputRejected(
            f"{_label(node)}: its mask's sliding window {window} is larger than "
            f"GroupQueryAttention's local_window_size can hold ({INT32_MAX}, a 32-bit int "
            "in ONNX Runtime)"
        )


def _mask_window(context: _MatchContext, mask: ir.Value) -> int | None:
    """The window the rules read off this mask (the same matchers), None if none matches."""
    for match in (match_mask, match_position_mask):
        try:
            return match(context, mask).local_window_size
        except MatchFailureError:
            continue
    return None
