"""Cut each rewritten layer out of both models as two small standalone models.

Dimension letters: B batch, S query length, T total length, P past length (T - S), N query
heads, Nkv KV heads, D head size, W sliding window.

A rewritten layer is a ``com.microsoft.GroupQueryAttention`` node of the candidate whose first
output carries the name of an ai.onnx ``Attention`` output of the original (the rewrite keeps
the replaced Attention's value names). Its *boundary* is what both layers read from the rest of
the model:

- data: the query ``[B, S, N*D]`` and the cache, found walking back from the replacement's
  query/key/value/past inputs to the first values the original also has (the borrowed BNSH
  cache of the source layer, or the layer's own new key/value and past inputs);
- lengths and masks: graph inputs only (``attention_mask``, ``input_ids`` for its shape): the
  mask chain of the original and ``seqlens_k``/``total_sequence_length`` of the replacement
  are part of the layer and are proven with it.

The original is then walked back from its Attention to the same data values. Both subgraphs
are extracted with ``onnx_ir.convenience.extract`` and their boundary values renamed to their
role (``query``, ``key_cache``, ...), internal values and nodes to canonical names, so two
layers that compute alike serialize to the same bytes. A subgraph that reaches weights (any
initializer above 1 MiB) is not a layer and is refused with a reason.

The layer is read here from the graphs, independently of the rules' matching and of what
they recorded (``LayerRewrite``), on purpose: a proof that took the rules' reading of a
layer (its head size, window, which cache it reads) would prove the rewrite against its own
mistakes. The only thing shared with the rules is the ops' schema of which inputs a cache
writer appends (``rules._cache_writers``). ``tests/test_layer_readings.py`` checks that both
readings agree on the fixtures and the corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from rewriter.rules import node_label
from rewriter.rules._batched_chunks import BATCHED_CHUNKS_KEY
from rewriter.rules._cache_writers import cache_write, writer_kv_heads
from rewriter.rules._speed_choice import SPEED_LAYER_KEY
from rewriter.verification._graph_diff import inputs_deep

__all__ = [
    "OWN_CACHE",
    "SHARED",
    "LayerConfig",
    "LayerPair",
    "UnprovableLayer",
    "pair_layers",
]

SHARED, OWN_CACHE = "kv-shared", "own-cache"
_MS = "com.microsoft"

# Roles of boundary inputs; the feeds of a scenario are built per role.
QUERY = "query"  # [B, S, N*D]
QUERY_SHAPE = "query_shape_source"  # another layer's query, read only for its shape [B, S, .]
KEY_CACHE, VALUE_CACHE = "key_cache", "value_cache"  # borrowed [B, Nkv, T, D]
KEY_TOTAL, VALUE_TOTAL = "key_total", "value_total"  # borrowed as 3-D [B, T, Nkv*D]
KEY_NEW, VALUE_NEW = "key", "value"  # own layer's new [B, S, Nkv*D]
PAST_KEY, PAST_VALUE = "past_key", "past_value"  # own layer's [B, Nkv, P, D]
ATTENTION_MASK, INPUT_IDS, POSITION_IDS = "attention_mask", "input_ids", "position_ids"
OUTPUT, PRESENT_KEY, PRESENT_VALUE = "output", "present_key", "present_value"

_RANKS = {
    QUERY: 3,
    QUERY_SHAPE: 3,
    KEY_CACHE: 4,
    VALUE_CACHE: 4,
    KEY_TOTAL: 3,
    VALUE_TOTAL: 3,
    KEY_NEW: 3,
    VALUE_NEW: 3,
    PAST_KEY: 4,
    PAST_VALUE: 4,
    ATTENTION_MASK: 2,
    INPUT_IDS: 2,
    POSITION_IDS: 2,
}
_GRAPH_INPUT_ROLES = {
    "attention_mask": ATTENTION_MASK,
    "input_ids": INPUT_IDS,
    "position_ids": POSITION_IDS,
}
# A layer's own subgraph has a few dozen nodes and constants of a few bytes; anything bigger
# means the walk left the layer (into projections and weights).
_MAX_NODES = 256
# Between the original Attention's query/key/value inputs and the values the replacement
# reads there may only be a change of layout (the borrowed cache's Transpose + Reshape, a
# head repeat): anything else computes, and is not what the replacement reads.
_LAYOUT_OPS = frozenset(
    {"Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Expand", "Cast", "CastLike"}
)
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_MAX_CONSTANT_BYTES = 1 << 20


# (Attention label, replacement label, why no proof, whether the layer's nodes are known)
Unprovable = tuple[str, str, str, bool]


class UnprovableLayer(Exception):
    """The layer cannot be cut out as a standalone proof; the message says why."""


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """What the layer means, read from the original Attention and its mask constants."""

    kind: str  # SHARED or OWN_CACHE
    num_heads: int
    kv_num_heads: int
    head_size: int
    scale: float
    softcap: float
    window: int | None  # W: query i sees key j iff 0 <= i - j < W; None = full attention
    dtype: np.dtype
    upper_left_causal: bool  # original has is_causal=1 without past inputs
    mask_rank: int | None  # rank of the original Attention's mask input
    # No mask and is_causal=0 (a drafter's full layer over the target's cache): every query
    # sees every key of the cache, attention_mask is not read.
    every_key_visible: bool = False
    # Whether the replacement, like the original, takes a cache whose right-padded rows have
    # their new key after the padding: a layer with its own cache that writes it so
    # (rules._speed_choice.own_cache_fold; GQA writes at seqlens_k instead), or a KV-shared
    # layer whose decode reads the export's own bias. Both layers then take the same padded
    # decode step, and the proof runs it.
    appends_after_padding: bool = False

    def describe(self) -> str:
        window = f"W={self.window}" if self.window is not None else "full"
        softcap = f", softcap {self.softcap:g}" if self.softcap else ""
        if self.every_key_visible:
            window += " non-causal"
        return (
            f"{self.kind}, N={self.num_heads} Nkv={self.kv_num_heads} D={self.head_size} "
            f"{window}, scale {self.scale:g}{softcap}, {self.dtype.name}"
        )


@dataclasses.dataclass
class LayerPair:
    """One rewritten layer: both standalone models, serialized, and what they mean."""

    node: str  # the candidate's GroupQueryAttention
    original_node: str  # the Attention it replaced
    config: LayerConfig
    original_bytes: bytes
    candidate_bytes: bytes
    original_inputs: dict[str, ir.DataType]  # role -> dtype
    candidate_inputs: dict[str, ir.DataType]
    outputs: tuple[str, ...]  # roles compared: output [, present_key, present_value]
    # Nodes of each full graph inside this layer (for the graph diff outside the layers).
    original_nodes: frozenset[ir.Node]
    candidate_nodes: frozenset[ir.Node]

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for part in (self.original_bytes, self.candidate_bytes, repr(self.config).encode()):
            digest.update(hashlib.sha256(part).digest())
        return digest.hexdigest()


def pair_layers(
    original: ir.Model, candidate: ir.Model
) -> tuple[list[LayerPair | Unprovable], frozenset[ir.Node], frozenset[ir.Node]]:
    """Every rewritten layer of the main graph, as a LayerPair or (Attention label,
    replacement label, why no proof, whether its nodes are claimed all the same).

    Also returns the nodes of each graph that belong to some layer (pairs that could not be
    cut out still claim their Attention and GroupQueryAttention nodes).
    """
    produced_by = {
        value.name: node for node in original.graph for value in node.outputs if value.name
    }
    # Float tensors the original computes or takes: where the replacement's walk stops.
    # Integer values (lengths, shapes) are walked through to the graph inputs instead: the
    # replacement's seqlens_k / window slice are part of the layer, even when it reuses the
    # model's own length values.
    original_names = {
        value.name
        for value in (*original.graph.inputs, *(v for n in original.graph for v in n.outputs))
        if value.name and value.dtype in _FLOAT_TYPES
    }
    pairs: list[LayerPair | Unprovable] = []
    original_nodes: set[ir.Node] = set()
    candidate_nodes: set[ir.Node] = set()
    for gqa in candidate.graph:
        # An If of rules._batched_chunks replaces its layer as one GQA node would.
        batched_if = gqa.op_type == "If" and BATCHED_CHUNKS_KEY in gqa.metadata_props
        if not (gqa.op_type == "GroupQueryAttention" and gqa.domain == _MS) and not batched_if:
            continue
        replaced = produced_by.get(gqa.outputs[0].name or "")
        if replaced is not None and replaced.op_type == gqa.op_type:
            continue  # a GQA layer of the original itself
        attention = _attention_behind(replaced)
        if attention is not replaced or attention is None:
            # E.g. the transformers exporter's 4-D layout: the replacement takes over the
            # output of a Transpose/Reshape after the Attention.
            label = node_label(attention) if attention is not None else node_label(gqa)
            where = (
                f"a {replaced.op_type} after the Attention"
                if attention is not None and replaced is not None
                else "no Attention of the original"
            )
            reason = (
                f"the replacement takes over {gqa.outputs[0].name}, the output of {where}: "
                "layer proofs cut at an Attention's own output only"
            )
            pairs.append((label, node_label(gqa), reason, False))
            continue
        original_nodes.add(attention)
        candidate_nodes.add(gqa)
        try:
            pair = _cut_layer(original, candidate, attention, gqa, original_names)
        except UnprovableLayer as reason:
            pairs.append((node_label(attention), node_label(gqa), str(reason), False))
            continue
        original_nodes |= pair.original_nodes
        candidate_nodes |= pair.candidate_nodes
        pairs.append(pair)
    for replacement in candidate.graph:
        speed_form = replacement.metadata_props.get(SPEED_LAYER_KEY)
        attention = produced_by.get(replacement.outputs[0].name or "")
        if speed_form is None or attention is None or attention.op_type != "Attention":
            continue
        # A speed choice (an If on S == 1, or Attention reading the BNSH cache in place).
        try:
            pair = _cut_layer(original, candidate, attention, replacement, original_names)
        except UnprovableLayer as reason:
            # What differs from the original behind it is the layer, for the graph diff.
            original_nodes |= _nodes_behind(attention, _value_names(candidate.graph))
            candidate_nodes |= _nodes_behind(replacement, _value_names(original.graph))
            pairs.append((node_label(attention), node_label(replacement), str(reason), True))
            continue
        original_nodes |= pair.original_nodes | {attention}
        candidate_nodes |= pair.candidate_nodes | {replacement}
        pairs.append(pair)
    return pairs, frozenset(original_nodes), frozenset(candidate_nodes)


def _original_walk(attention: ir.Node, data_names: set[str | None]) -> _Walk:
    walk = _Walk("the original layer")
    for index, value in enumerate(attention.inputs):
        if value is None:
            continue
        if index in (0, 1, 2, 4, 5):
            walk.visit(
                value,
                lambda v: v.name in data_names,
                data_index=index,
                through=_LAYOUT_OPS,
                expected=sorted(n or "" for n in data_names),
            )
        else:
            # The mask chain may read a data value's shape (Shape(query)): stop there too.
            walk.visit(value, lambda v: v.name in data_names)
    return walk


def _attention_data(attention: ir.Node, own_cache: bool) -> dict[ir.Value, int]:
    """The data an Attention reads, each with the GQA input it would be: a KV-shared layer's
    query and the borrowed caches behind the layout ops (query 0, past_key 3, past_value 4);
    a layer with its own cache, its inputs as they are (query 0, new key 1, new value 2,
    past_key 3, past_value 4)."""
    if own_cache:
        pairs = ((0, 0), (1, 1), (2, 2), (4, 3), (5, 4))
        data = {attention.inputs[index]: gqa_index for index, gqa_index in pairs}
        if None in data:
            raise UnprovableLayer("the original layer lacks a query, key, value or past input")
        return data  # type: ignore[return-value]
    data = {attention.inputs[0]: 0}
    for index, gqa_index in ((1, 3), (2, 4)):
        value = attention.inputs[index]
        while value is not None and (producer := value.producer()) is not None:
            if producer.op_type not in _LAYOUT_OPS or not producer.inputs:
                break
            value = producer.inputs[0]
        if value is None:
            raise UnprovableLayer(f"the original layer's input {index} has no source")
        data[value] = gqa_index
    return data


def _speed_layer_walk(
    replacement: ir.Node, data: dict[ir.Value, int], stop_names: set[str | None]
) -> _Walk:
    """The walk back from a speed choice's replacement (an If whose branches read the
    enclosing graph, or the Reshape after Attention on the BNSH cache) to `stop_names`: the
    layer's data and what else the original has but its layer does not compute (another
    layer's query, read for its shape by the lengths computed once per graph)."""
    walk = _Walk("the replacement")
    for value in _outer_inputs(replacement):
        walk.visit(value, lambda v: v.name in stop_names, data_index=0)
    by_name = {value.name: index for value, index in data.items()}
    for value in list(walk.data_boundary):
        if value.name in by_name:
            walk.reached_from[value.name or ""] = {by_name[value.name]}
        else:  # stopped there, but not data: a boundary like the GQA walk's QUERY_SHAPE
            walk.data_boundary.remove(value)
            walk.reached_from.pop(value.name or "", None)
    return walk


def _outer_inputs(node: ir.Node) -> list[ir.Value]:
    """What `node` reads from its graph: its inputs and what its subgraphs capture."""
    outer: list[ir.Value] = []
    for value in inputs_deep(node):
        if value is not None and value.graph is node.graph and value not in outer:
            outer.append(value)
    return outer


def _value_names(graph: ir.Graph) -> set[str]:
    names = {value.name for value in graph.inputs if value.name}
    names.update(value.name for node in graph for value in node.outputs if value.name)
    return names


def _nodes_behind(start: ir.Node, kept_names: set[str]) -> set[ir.Node]:
    """`start` and the nodes of its graph it reads through values absent from the other
    graph (`kept_names`), including values read inside its subgraphs."""
    nodes: set[ir.Node] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        if node in nodes:
            continue
        nodes.add(node)
        for value in inputs_deep(node):
            if value is None or value.name in kept_names:
                continue
            producer = value.producer()
            if producer is not None and producer.graph is start.graph:
                stack.append(producer)
    return nodes


def _attention_behind(node: ir.Node | None) -> ir.Node | None:
    """The ai.onnx Attention whose output reaches ``node`` through layout ops only."""
    for _ in range(8):
        if node is None:
            return None
        if node.op_type == "Attention" and node.domain == "":
            return node
        if node.op_type not in _LAYOUT_OPS or not node.inputs or node.inputs[0] is None:
            return None
        node = node.inputs[0].producer()
    return None


def _cut_layer(
    original: ir.Model,
    candidate: ir.Model,
    attention: ir.Node,
    replacement: ir.Node,
    original_names: set[str],
) -> LayerPair:
    own_cache = len(attention.inputs) > 4 and attention.inputs[4] is not None
    kind = OWN_CACHE if own_cache else SHARED
    if replacement.op_type == "GroupQueryAttention":
        # The replacement's data inputs stop at the first values the original also computes.
        candidate_walk = _Walk("the replacement")
        for index, value in enumerate(replacement.inputs):
            if value is None:
                continue
            candidate_walk.visit(
                value, lambda v: v.name in original_names, data_index=index if index <= 4 else None
            )
        data_names = {v.name for v in candidate_walk.data_boundary}
        original_walk = _original_walk(attention, data_names)
    else:
        # A speed choice's replacement may read the original's own mask chain: the original
        # is walked first, and the replacement walks through what the original layer computes.
        data = _attention_data(attention, own_cache)
        data_names = {v.name for v in data}
        original_walk = _original_walk(attention, data_names)
        computed = {v.name for node in original_walk.nodes for v in node.outputs}
        candidate_walk = _speed_layer_walk(
            replacement, data, (original_names - computed) | data_names
        )
    candidate_index = {
        value.name: min(candidate_walk.reached_from[value.name or ""])
        for value in candidate_walk.data_boundary
    }
    roles = _roles(original_walk, kind, candidate_index)
    for value in candidate_walk.boundary:
        if value.name in roles or value.name in _GRAPH_INPUT_ROLES:
            roles.setdefault(value.name or "", _GRAPH_INPUT_ROLES.get(value.name or "", ""))
        elif _only_shape_read(value, candidate_walk.nodes):
            # Lengths computed once per graph from the first rewritten layer's query (the
            # window slice): only its shape [B, S, .] is read, the same for every layer.
            roles[value.name or ""] = QUERY_SHAPE
        else:
            raise UnprovableLayer(
                f"the replacement reads {value.name}, which the original layer does not read"
            )

    boundary = {v.name: v for v in (*original_walk.boundary, *candidate_walk.boundary)}
    config = _config(attention, replacement, original_walk.nodes, kind, roles, boundary)
    outputs: list[tuple[str, ir.Value, ir.Value]] = [
        (OUTPUT, attention.outputs[0], replacement.outputs[0])
    ]
    if own_cache:
        for role, index in ((PRESENT_KEY, 1), (PRESENT_VALUE, 2)):
            if len(replacement.outputs) <= index or len(attention.outputs) <= index:
                raise UnprovableLayer(f"the replacement has no {role} output")
            if replacement.outputs[index].name != attention.outputs[index].name:
                raise UnprovableLayer(
                    f"{role} is {replacement.outputs[index].name} in the replacement, "
                    f"{attention.outputs[index].name} in the original"
                )
            outputs.append((role, attention.outputs[index], replacement.outputs[index]))

    original_model, original_inputs = _standalone(
        original, original_walk.boundary, [(r, o) for r, o, _ in outputs], roles, config
    )
    if config.mask_rank is None:
        config = dataclasses.replace(config, mask_rank=_inferred_mask_rank(original_model))
    candidate_model, candidate_inputs = _standalone(
        candidate, candidate_walk.boundary, [(r, c) for r, _, c in outputs], roles, config
    )
    return LayerPair(
        node=node_label(replacement),
        original_node=node_label(attention),
        config=config,
        original_bytes=original_model,
        candidate_bytes=candidate_model,
        original_inputs=original_inputs,
        candidate_inputs=candidate_inputs,
        outputs=tuple(role for role, _, _ in outputs),
        original_nodes=frozenset(original_walk.nodes),
        candidate_nodes=frozenset(candidate_walk.nodes),
    )


class _Walk:
    """Nodes reached walking back from a layer's inputs, and where the walk stopped."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.nodes: set[ir.Node] = set()
        self.boundary: list[ir.Value] = []
        self.data_boundary: list[ir.Value] = []
        self.reached_from: dict[str, set[int]] = {}

    def visit(
        self,
        start: ir.Value,
        stop: Callable[[ir.Value], bool],
        data_index: int | None = None,
        through: frozenset[str] | None = None,
        expected: list[str] | None = None,
    ) -> None:
        """Walk back from ``start`` until ``stop``. With ``through``, the path from ``start``
        may only pass those (layout) ops, along their first input; their other inputs
        (shapes) are walked back to graph inputs and constants like a mask."""
        stack = [(start, True)]
        seen: set[tuple[ir.Value, bool]] = set()
        while stack:
            value, on_path = stack.pop()
            if (value, on_path) in seen:
                continue
            seen.add((value, on_path))
            stops = on_path and value.producer() is not None and stop(value)
            if value.is_graph_input() or stops:
                self._stop_at(value, data_index if on_path else None)
                continue
            if value.is_initializer() or value.producer() is None:
                self._constant(value)
                continue
            node = value.producer()
            assert node is not None
            if on_path and through is not None and node.op_type not in through:
                raise UnprovableLayer(
                    f"{self.who} reads its input {data_index} through {node.op_type} "
                    f"({node_label(node)}), not from what the replacement reads "
                    f"({', '.join(expected or [])})"
                )
            if node.domain not in ("", "ai.onnx", _MS) or _has_subgraph(node):
                raise UnprovableLayer(f"{self.who} reaches {node_label(node)} ({node.op_type})")
            if node not in self.nodes:
                self.nodes.add(node)
                if len(self.nodes) > _MAX_NODES:
                    raise UnprovableLayer(
                        f"{self.who} has more than {_MAX_NODES} nodes: the walk left the layer "
                        f"at {node_label(node)}"
                    )
            for position, operand in enumerate(node.inputs):
                if operand is not None:
                    stays = on_path and (through is None or position == 0)
                    stack.append((operand, stays))

    def _stop_at(self, value: ir.Value, data_index: int | None) -> None:
        if value not in self.boundary:
            self.boundary.append(value)
        if data_index is not None:
            if value not in self.data_boundary:
                self.data_boundary.append(value)
            self.reached_from.setdefault(value.name or "", set()).add(data_index)

    def _constant(self, value: ir.Value) -> None:
        tensor = value.const_value
        if tensor is None:
            raise UnprovableLayer(f"{self.who} reads {value.name}, which has no producer")
        # By size only: exporters that write every initializer as external data store
        # shape constants there too.
        if tensor.nbytes > _MAX_CONSTANT_BYTES:
            raise UnprovableLayer(
                f"{self.who} reaches weights ({value.name}, {tensor.nbytes} bytes): the layer "
                "is not separable from the model"
            )


def _only_shape_read(value: ir.Value, nodes: set[ir.Node]) -> bool:
    uses = [node for node, _ in value.uses() if node in nodes]
    return bool(uses) and all(node.op_type == "Shape" for node in uses)


def _has_subgraph(node: ir.Node) -> bool:
    return any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for attr in node.attributes.values()
    )


def _roles(walk: _Walk, kind: str, candidate_index: dict[str | None, int]) -> dict[str, str]:
    """Role of each boundary value of the original layer, from the Attention input it feeds
    (and, where its rank is not recorded, the GroupQueryAttention input it feeds)."""
    roles: dict[str, str] = {}
    for value in walk.boundary:
        name = value.name or ""
        sources = walk.reached_from.get(name, set())
        if not sources:
            role = _GRAPH_INPUT_ROLES.get(name)
            if role is None:
                raise UnprovableLayer(f"the original layer's mask reads {name}: cannot feed it")
        elif len(sources) > 1:
            raise UnprovableLayer(f"{name} feeds Attention inputs {sorted(sources)} at once")
        else:
            role = _data_role(next(iter(sources)), value, kind, candidate_index.get(name))
        roles[name] = role
    return roles


def _data_role(index: int, value: ir.Value, kind: str, gqa_index: int | None) -> str:
    rank = value.shape.rank() if value.shape is not None else None
    if rank is None and gqa_index is not None:
        # GQA's query/key/value are 3-D, its past_key/past_value 4-D BNSH.
        rank = 3 if gqa_index <= 2 else 4
    if index == 0:
        if rank not in (3, None):
            raise UnprovableLayer(f"query {value.name} is not 3-D [B, S, N*D]")
        return QUERY
    if index in (4, 5):
        return PAST_KEY if index == 4 else PAST_VALUE
    if kind == OWN_CACHE:
        if rank != 3:
            raise UnprovableLayer(f"{value.name} is not 3-D [B, S, Nkv*D]")
        return KEY_NEW if index == 1 else VALUE_NEW
    if rank == 4:
        return KEY_CACHE if index == 1 else VALUE_CACHE
    if rank == 3:
        return KEY_TOTAL if index == 1 else VALUE_TOTAL
    raise UnprovableLayer(f"borrowed cache {value.name} has unknown rank")


def _config(
    attention: ir.Node,
    gqa: ir.Node,
    nodes: Iterable[ir.Node],
    kind: str,
    roles: dict[str, str],
    boundary: dict[str | None, ir.Value],
) -> LayerConfig:
    attrs = attention.attributes
    num_heads = attrs.get_int("q_num_heads", 0)
    kv_num_heads = attrs.get_int("kv_num_heads", 0)
    if num_heads <= 0 or kv_num_heads <= 0 or num_heads % kv_num_heads:
        raise UnprovableLayer("Attention has no usable q_num_heads/kv_num_heads")
    head_size = _head_size(attention, num_heads, kv_num_heads, roles, boundary)
    scale_attr = attrs.get("scale")
    scale = scale_attr.as_float() if scale_attr is not None else 1.0 / math.sqrt(head_size)
    # The layer's dtype: the first one recorded on its query, caches or output.
    typed = [attention.inputs[0], gqa.inputs[0], *(boundary.get(name) for name in roles)]
    typed += [attention.outputs[0], gqa.outputs[0]]
    dtypes = [v.dtype for v in typed if v is not None and v.dtype in _FLOAT_TYPES]
    if not dtypes:
        raise UnprovableLayer("dtype unknown: neither the query nor the cache records it")
    dtype = dtypes[0]
    mask = attention.inputs[3] if len(attention.inputs) > 3 else None
    return LayerConfig(
        kind=kind,
        num_heads=num_heads,
        kv_num_heads=kv_num_heads,
        head_size=head_size,
        scale=scale,
        softcap=attrs.get_float("softcap", 0.0),
        window=_mask_window(nodes),
        dtype=np.dtype(dtype.numpy()),
        upper_left_causal=attrs.get_int("is_causal", 0) == 1 and kind == SHARED,
        mask_rank=mask.shape.rank() if mask is not None and mask.shape is not None else None,
        every_key_visible=mask is None and attrs.get_int("is_causal", 0) == 0 and kind == SHARED,
        appends_after_padding=_appends_after_padding(attention, gqa, kind),
    )


def _appends_after_padding(attention: ir.Node, replacement: ir.Node, kind: str) -> bool:
    """See LayerConfig.appends_after_padding."""
    if replacement.op_type == "GroupQueryAttention":
        return False
    if kind == OWN_CACHE:
        return True
    mask = attention.inputs[3] if len(attention.inputs) > 3 else None
    exact = mask is not None and not attention.attributes.get_int("is_causal", 0)
    # What decodes: the then branch of an If on S == 1 (rules._speed_choice.phase_if), else
    # the replacement itself. It belongs to the other model: values match by name.
    decode = replacement.attributes.get("then_branch") if replacement.op_type == "If" else None
    readers = list(decode.as_graph()) if decode is not None else [replacement]
    read = {value.name for node in readers for value in inputs_deep(node) if value is not None}
    return exact and mask.name in read


def _head_size(
    attention: ir.Node,
    num_heads: int,
    kv_num_heads: int,
    roles: dict[str, str],
    boundary: dict[str | None, ir.Value],
) -> int:
    """D, from every static shape of the Attention's inputs and the layer's boundary."""
    sizes: set[int] = set()
    heads_of = {QUERY: num_heads}
    with_heads = [(attention.inputs[0], num_heads)]
    with_heads += [(value, kv_num_heads) for value in attention.inputs[1:3]]
    with_heads += [
        (boundary.get(name), heads_of.get(role, kv_num_heads))
        for name, role in roles.items()
        if role != QUERY_SHAPE  # another layer's query: its D may differ
    ]
    for value, heads in [*with_heads, *((v, kv_num_heads) for v in attention.inputs[4:6])]:
        shape = value.shape if value is not None else None
        if shape is None or value is None or value.dtype in (ir.DataType.INT64, ir.DataType.INT32):
            continue
        if shape.rank() == 3 and isinstance(shape[2], int):
            sizes.add(shape[2] // heads)
        elif shape.rank() == 4 and isinstance(shape[3], int):
            sizes.add(shape[3])
    for name, role in roles.items():
        if role in (KEY_CACHE, VALUE_CACHE) and boundary.get(name) is not None:
            sizes |= _cache_writer_head_sizes(boundary[name])  # type: ignore[arg-type]
    if len(sizes) != 1:
        raise UnprovableLayer(f"head size not known from static shapes (found {sorted(sizes)})")
    return sizes.pop()


def _cache_writer_head_sizes(cache_BNSH: ir.Value) -> set[int]:
    """D of a borrowed present cache, as its source layer states it: exporters often leave
    the present's head dim symbolic but spell it on the source's past input and new key or
    value. Which inputs those are is the ops' schema (``rules._cache_writers``); the shapes
    are the model's own annotations."""
    write = cache_write(cache_BNSH)
    if write is None:
        return set()
    sizes: set[int] = set()
    past = write.past_BNPD.shape if write.past_BNPD is not None else None
    if past is not None and past.rank() == 4 and isinstance(past[3], int):
        sizes.add(past[3])
    heads = writer_kv_heads(write.writer)
    new = write.new.shape if write.new is not None else None
    if heads and new is not None and new.rank() == 3 and isinstance(new[2], int):
        sizes.add(new[2] // heads)
    return sizes


# Comparison ops of a sliding-window mask: key j is visible while the distance d = i - j
# satisfies the comparison against the constant (SPEC.md sections 2 and 4).
_WINDOW_COMPARISONS = {
    # op: (index of the constant operand, W from the constant c)
    ("Less", 1): lambda c: c,  # d < W
    ("Greater", 0): lambda c: c,  # W > d
    ("LessOrEqual", 1): lambda c: c + 1,  # d <= W - 1
    ("GreaterOrEqual", 0): lambda c: c + 1,  # W - 1 >= d
}


def _mask_window(nodes: Iterable[ir.Node]) -> int | None:
    """W of the original's mask: the constant a position difference is compared with."""
    windows: set[int] = set()
    for node in nodes:
        for index in (0, 1):
            rule = _WINDOW_COMPARISONS.get((node.op_type, index))
            if rule is None or len(node.inputs) != 2:
                continue
            distance = node.inputs[1 - index]
            if distance is None or distance.producer() is None:
                continue
            if distance.producer().op_type != "Sub":  # type: ignore[union-attr]
                continue
            constant = _scalar(node.inputs[index])
            if constant is not None:
                windows.add(rule(constant))
    if len(windows) > 1:
        raise UnprovableLayer(f"the mask compares positions with several windows {windows}")
    return windows.pop() if windows else None


def _scalar(value: ir.Value | None) -> int | None:
    while value is not None:
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is not None:
            array = tensor.numpy()
            return int(array.reshape(-1)[0]) if array.size == 1 else None
        producer = value.producer()
        if producer is None or producer.op_type not in ("Cast", "CastLike", "Identity"):
            return None
        value = producer.inputs[0]
    return None


def _inferred_mask_rank(model_bytes: bytes) -> int | None:
    """Rank of the Attention's computed mask in a standalone original, by ONNX shape inference
    (the model is a few KB: no weights, and a copy of our own to annotate)."""
    model = ir.from_proto(onnx.load_from_string(model_bytes))
    # ONNX's own defaults; a failed inference leaves the model as it was (no rank), and its
    # warning is not ours to print: inference is an explanation aid only.
    inference = common_passes.ShapeInferencePass(
        check_type=False, strict_mode=False, data_prop=False
    )
    logger = logging.getLogger("onnx_ir.passes.common.shape_inference")
    previous_level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        inference(model)
    finally:
        logger.setLevel(previous_level)
    for node in model.graph:
        if node.op_type != "Attention" or len(node.inputs) < 4:
            continue
        mask = node.inputs[3]
        if OUTPUT not in (value.name for value in node.outputs) or mask is None:
            continue
        # A graph input's rank is the feed's (its annotation), not an inferred one.
        if mask.producer() is None or mask.shape is None:
            return None
        return mask.shape.rank()
    return None


def _standalone(
    model: ir.Model,
    boundary: list[ir.Value],
    outputs: list[tuple[str, ir.Value]],
    roles: dict[str, str],
    config: LayerConfig,
) -> tuple[bytes, dict[str, ir.DataType]]:
    """The layer as a model of its own, values renamed canonically, serialized."""
    try:
        graph = ir.convenience.extract(model.graph, boundary, [value for _, value in outputs])
    except ValueError as error:
        raise UnprovableLayer(f"cannot extract the layer: {error}") from None
    model_dtype = ir.DataType.from_numpy(config.dtype)
    inputs: dict[str, ir.DataType] = {}
    for value in graph.inputs:
        role = roles[value.name or ""]
        value.name = role
        if value.dtype is None:
            value.dtype = model_dtype
        inputs[role] = value.dtype  # type: ignore[assignment]
    for (role, _), value in zip(outputs, graph.outputs, strict=True):
        value.name = role
        if value.dtype is None:
            value.dtype = model_dtype
    named = {v.name for v in (*graph.inputs, *graph.outputs)}
    counter = 0
    # Subgraphs (a speed choice's If) too: their names spell the layer's output name.
    for index, node in enumerate(ir.traversal.RecursiveGraphIterator(graph)):
        node.name = f"n{index}"
        node.doc_string = None
        node.metadata_props.clear()
        for value in node.outputs:
            if value.name not in named:
                value.name = f"v{counter}"
                counter += 1
    # Recorded shapes differ between layers that compute alike (exporters name symbolic dims
    # per layer) and say nothing the feeds do not: inputs keep their rank, nothing more.
    for value in (*graph.inputs, *graph.outputs, *(v for n in graph for v in n.outputs)):
        value.shape = None
        value.doc_string = None
        value.metadata_props.clear()
    for value in graph.inputs:
        value.shape = ir.Shape([None] * _RANKS[value.name or ""])
    for index, value in enumerate(list(graph.initializers.values())):
        # A fresh tensor: renaming the value would rename the tensor it shares with the
        # model under verification (onnx_ir keeps them in sync), and a small one at that.
        name = f"c{index}"
        assert value.const_value is not None
        constant = ir.Value(
            name=name,
            shape=value.shape,
            type=value.type,
            const_value=ir.tensor(value.const_value.numpy().copy(), name=name),
        )
        value.replace_all_uses_with(constant)
        graph.initializers.pop(value.name or "")
        graph.register_initializer(constant)
    graph.name = "layer"
    graph.doc_string = None
    graph.metadata_props.clear()
    graph.opset_imports.update(model.opset_imports)
    standalone = ir.Model(graph, ir_version=model.ir_version)
    return ir.to_proto(standalone).SerializeToString(), inputs
