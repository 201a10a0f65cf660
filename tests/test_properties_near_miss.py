"""Property 3: a KV-shared layer mutated into a near-miss is never rewritten, and says why.

Hypothesis draws a decoder, one of its KV-shared layers and a mutation that applies to it.
The layer first gets its own copy of its mask chain and Transpose/Reshape chains (exporters
de-duplicate them across layers), so the mutation touches that layer alone; the rule must
then leave it unchanged with a reason in ``report.skipped`` and still rewrite every other
shared layer. A few mutations keep the layer valid (another constant window, K and V
swapped, unused present outputs): those must be rewritten to match, and verify.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from decoder_runs import borrowed_cache
from hypothesis import assume, event, given, note
from hypothesis import strategies as st
from strategies import decoder_configs

import rewriter
from rewriter.fixtures.gemma4_like import DecoderConfig, build_decoder

pytestmark = pytest.mark.property

_MASK_OPS = frozenset(
    {
        "CumSum",
        "Unsqueeze",
        "Slice",
        "Sub",
        "Less",
        "GreaterOrEqual",
        "And",
        "Cast",
        "Where",
        "Expand",
        "Concat",
        "Shape",
        "CastLike",
    }
)
_BORROW_OPS = frozenset({"Transpose", "Reshape"})
_NOT_A_MASK = r"^mask is not a recognised P1/P2 mask"
_NOT_BORROWED = re.escape("is not Reshape(Transpose(cache, perm=[0,2,1,3]))")
_NOT_SAME_SOURCE = "^K and V do not come from the same source layer's present outputs$"
# The rule's own reason, or the pipeline's when it classifies the layer as owning a cache.
_HAS_PAST = r"^has past_key/past_value/nonpad_kv_seqlen inputs|own cache \(past inputs\)"


@dataclasses.dataclass
class Layer:
    """The mutated layer, with its own copies of the chains it reads."""

    model: ir.Model
    config: DecoderConfig
    attention: ir.Node
    layer_type: str
    source: int
    data: st.DataObject
    mask_chain: list[ir.Node] = dataclasses.field(default_factory=list)

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    def own_mask(self) -> list[ir.Node]:
        if not self.mask_chain:
            self.mask_chain = _own_copy(self.graph, self.attention, 3, _MASK_OPS)
        return self.mask_chain

    def own_borrowed(self, index: int) -> tuple[ir.Node, ir.Node]:
        transpose, reshape = _own_copy(self.graph, self.attention, index, _BORROW_OPS)
        return transpose, reshape

    def mask_node(self, op_type: str) -> ir.Node:
        (node,) = [n for n in self.own_mask() if n.op_type == op_type]
        return node

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype))
        value.const_value = tensor
        self.graph.register_initializer(value)
        return value

    def graph_input(self, name: str, dtype: ir.DataType, dims: list) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))
        self.graph.inputs.append(value)
        return value

    def insert(self, op_type: str, inputs: list[ir.Value], before: ir.Node, **attrs) -> ir.Value:
        node = ir.node(op_type, inputs, attrs)
        self.graph.insert_before(before, node)
        return node.outputs[0]

    def input_named(self, name: str) -> ir.Value:
        (value,) = [v for v in self.graph.inputs if v.name == name]
        return value

    @property
    def dtype(self) -> ir.DataType:
        return ir.DataType.FLOAT16 if self.config.dtype == "float16" else ir.DataType.FLOAT

    @property
    def head_size(self) -> int:
        return self.config.head_dim(self.layer_type)


def _own_copy(graph: ir.Graph, consumer: ir.Node, index: int, ops: frozenset) -> list[ir.Node]:
    """Give consumer.inputs[index] a private copy of its producers of these op types."""
    copies: dict[ir.Node, ir.Node] = {}

    def copied(value: ir.Value | None) -> ir.Value | None:
        producer = value.producer() if value is not None else None
        if producer is None or producer.op_type not in ops:
            return value
        if producer not in copies:
            inputs = [copied(v) for v in producer.inputs]
            copies[producer] = ir.Node(
                producer.domain,
                producer.op_type,
                inputs,
                attributes=[copy.copy(a) for a in producer.attributes.values()],
                num_outputs=len(producer.outputs),
                name=f"{producer.name}/near_miss",
            )
        return copies[producer].outputs[value.index()]

    consumer.replace_input_with(index, copied(consumer.inputs[index]))
    order = list(copies.values())  # producers are created before their consumers
    graph.insert_before(consumer, order)
    return order


@dataclasses.dataclass(frozen=True)
class Expect:
    reason: str | None = None  # regex the skip reason must match; None: must be rewritten
    window: int | None = None  # local_window_size the rewrite must carry
    swapped: bool = False  # the rewrite reads the source's value cache as past_key
    runs: bool = False  # the mutated model is a meaningful decoder: verify the rewrite


Mutation = Callable[[Layer], Expect]


# --- near misses of the window term ------------------------------------------------------


def less_or_equal(layer: Layer) -> Expect:
    layer.mask_node("Less").op_type = "LessOrEqual"  # W + 1 keys: not a GQA window
    return Expect(_NOT_A_MASK, runs=True)


def distance_reversed(layer: Layer) -> Expect:
    less = layer.mask_node("Less")
    distance = less.inputs[0].producer()
    first, second = distance.inputs
    distance.replace_input_with(0, second)
    distance.replace_input_with(1, first)
    return Expect(_NOT_A_MASK)  # later keys become visible: not a causal decoder any more


def window_from_graph_input(layer: Layer) -> Expect:
    window = layer.graph_input("window", ir.DataType.INT64, [])
    layer.mask_node("Less").replace_input_with(1, window)
    return Expect("window is not a constant")


def window_computed(layer: Layer) -> Expect:
    less = layer.mask_node("Less")
    shape = layer.insert("Shape", [layer.input_named("attention_mask")], less)
    one = layer.constant("near_miss_index_1", np.array(1, dtype=np.int64))
    less.replace_input_with(1, layer.insert("Gather", [shape, one], less))  # W = T
    return Expect("window is not a constant", runs=True)


def window_overridable(layer: Layer) -> Expect:
    default = layer.constant("window_default", np.array(3, dtype=np.int64))
    layer.graph.inputs.append(default)  # an initializer that is an input is not a constant
    layer.mask_node("Less").replace_input_with(1, default)
    return Expect("window is not a constant")


def window_other_constant(layer: Layer) -> Expect:
    old = layer.config.sliding_window
    new = layer.data.draw(st.integers(1, 63), label="new window")
    new += new >= old  # any window but the model's
    window = layer.constant("near_miss_window", np.array(new, dtype=np.int64))
    layer.mask_node("Less").replace_input_with(1, window)
    return Expect(window=new, runs=True)  # a valid layer: GQA takes the mask's own W


# --- near misses of the rest of the mask -------------------------------------------------


def causal_without_diagonal(layer: Layer) -> Expect:
    layer.mask_node("GreaterOrEqual").op_type = "Greater"
    return Expect(_NOT_A_MASK)


def visible_bias_not_zero(layer: Layer) -> Expect:
    half = layer.constant("near_miss_half", np.array(0.5, dtype=layer.dtype.numpy()))
    layer.mask_node("Where").replace_input_with(1, half)
    return Expect("bias for visible keys is not the constant 0", runs=True)


def masked_bias_not_negative_enough(layer: Layer) -> Expect:
    minus_one = layer.constant("near_miss_minus_one", np.array(-1.0, dtype=layer.dtype.numpy()))
    layer.mask_node("Where").replace_input_with(2, minus_one)
    return Expect("bias for masked keys is not a large negative constant")  # keys leak


def not_causal(layer: Layer) -> Expect:
    layer.attention.attributes["is_causal"] = ir.AttrInt64("is_causal", 0)
    return Expect("^neither is_causal nor the mask makes attention causal")


def positions_from_another_input(layer: Layer) -> Expect:
    other = layer.graph_input(
        "other_attention_mask", ir.DataType.INT64, ["batch", "total_sequence_length"]
    )
    layer.mask_node("CumSum").replace_input_with(0, other)
    return Expect(_NOT_A_MASK)


def positions_on_another_axis(layer: Layer) -> Expect:
    axis = layer.constant("near_miss_axis_0", np.array(0, dtype=np.int64))
    layer.mask_node("CumSum").replace_input_with(1, axis)
    return Expect("CumSum is not over the sequence axis")


def attention_mask_through_an_op(layer: Layer) -> Expect:
    attention_mask = layer.input_named("attention_mask")
    chain = layer.own_mask()
    copied = layer.insert("Identity", [attention_mask], chain[0])
    for node in chain:
        for index, value in enumerate(node.inputs):
            if value is attention_mask:
                node.replace_input_with(index, copied)
    return Expect("mask is not derived from a graph input attention_mask", runs=True)


def mask_is_a_graph_input(layer: Layer) -> Expect:
    if layer.config.mask_style == "p1":
        mask = layer.graph_input(
            "attention_bias", ir.DataType.BOOL, ["batch", "sequence_length", "total"]
        )
    else:
        mask = layer.graph_input(
            "attention_bias", layer.dtype, ["batch", 1, "sequence_length", "total"]
        )
    layer.attention.replace_input_with(3, mask)
    return Expect("^mask is not built in the graph")


def extra_op_in_mask_chain(layer: Layer) -> Expect:
    chain = layer.own_mask()
    in_chain = set(chain)
    # Edges whose values carry the mask's meaning; the Expand shape (any broadcast of the
    # padding means the same) and the CastLike'd fill constants are looked through on purpose.
    edges = [(layer.attention, 3)] + [
        (node, index)
        for node in chain
        if node.op_type != "Concat"
        for index, value in enumerate(node.inputs)
        if value is not None
        and value.producer() in in_chain
        and value.producer().op_type not in ("Concat", "CastLike")
    ]
    consumer, index = layer.data.draw(st.sampled_from(edges), label="edge")
    note(f"Identity inserted before input {index} of {consumer.op_type} {consumer.name}")
    consumer.replace_input_with(index, layer.insert("Identity", [consumer.inputs[index]], consumer))
    return Expect(_NOT_A_MASK, runs=True)


# --- near misses of the borrowed K/V ----------------------------------------------------


def other_perm(layer: Layer) -> Expect:
    index = layer.data.draw(st.sampled_from([1, 2]), label="K or V")
    perms = [list(p) for p in itertools.permutations(range(4)) if list(p) != [0, 2, 1, 3]]
    transpose, _ = layer.own_borrowed(index)
    perm = layer.data.draw(st.sampled_from(perms), label="perm")
    transpose.attributes["perm"] = ir.AttrInt64s("perm", perm)
    return Expect(_NOT_BORROWED)


def reshape_allowzero(layer: Layer) -> Expect:
    _, reshape = layer.own_borrowed(layer.data.draw(st.sampled_from([1, 2]), label="K or V"))
    reshape.attributes["allowzero"] = ir.AttrInt64("allowzero", 1)
    return Expect("Reshape has allowzero=1")


def reshape_to_another_width(layer: Layer) -> Expect:
    _, reshape = layer.own_borrowed(1)
    width = layer.config.num_kv_heads * (layer.head_size + 8)
    shape = layer.constant("near_miss_shape", np.array([0, 0, width], dtype=np.int64))
    reshape.replace_input_with(1, shape)
    return Expect("^inconsistent head sizes")


def value_from_another_source(layer: Layer) -> Expect:
    others = [j for j in layer.config.nonshared_layers if j != layer.source]
    other = layer.data.draw(st.sampled_from(others), label="value source")
    transpose, _ = layer.own_borrowed(2)
    (present,) = [v for v in layer.graph.outputs if v.name == f"present.{other}.value"]
    transpose.replace_input_with(0, present)
    return Expect(_NOT_SAME_SOURCE)


def key_as_value(layer: Layer) -> Expect:
    layer.attention.replace_input_with(2, layer.attention.inputs[1])
    return Expect(_NOT_SAME_SOURCE, runs=True)


def key_and_value_swapped(layer: Layer) -> Expect:
    key, value = layer.attention.inputs[1], layer.attention.inputs[2]
    layer.attention.replace_input_with(1, value)
    layer.attention.replace_input_with(2, key)
    # Attention over (values as keys, keys as values) is GQA over the swapped caches.
    window = layer.config.sliding_window if layer.layer_type == "sliding" else None
    return Expect(window=window, swapped=True, runs=True)


# --- near misses of the Attention node itself ---------------------------------------------


def past_inputs(layer: Layer) -> Expect:
    dims = ["batch", layer.config.num_kv_heads, "near_miss_past", layer.head_size]
    layer.attention.resize_inputs(6)
    for index, kind in ((4, "key"), (5, "value")):
        layer.attention.replace_input_with(
            index, layer.graph_input(f"near_miss_past_{kind}", layer.dtype, dims)
        )
    return Expect(_HAS_PAST)


def nonpad_kv_seqlen(layer: Layer) -> Expect:
    layer.attention.resize_inputs(7)
    lengths = layer.graph_input("nonpad_kv_seqlen", ir.DataType.INT64, ["batch"])
    layer.attention.replace_input_with(6, lengths)
    return Expect(_HAS_PAST)


def present_output_used(layer: Layer) -> Expect:
    layer.attention.resize_outputs(3)
    which = layer.data.draw(st.sampled_from([1, 2]), label="present key or value")
    used = layer.attention.outputs[which]
    used.name = f"near_miss_present_{which}"
    used.type = ir.TensorType(layer.dtype)
    layer.graph.outputs.append(used)
    return Expect("^present outputs are used$")


def qk_matmul_output_used(layer: Layer) -> Expect:
    layer.attention.resize_outputs(4)
    used = layer.attention.outputs[3]
    used.name = "near_miss_qk_matmul_output"
    used.type = ir.TensorType(layer.dtype)
    layer.graph.outputs.append(used)
    return Expect("^qk_matmul_output is used$")


def present_outputs_unused(layer: Layer) -> Expect:
    layer.attention.resize_outputs(3)
    window = layer.config.sliding_window if layer.layer_type == "sliding" else None
    return Expect(window=window, runs=True)  # nobody reads them: still a KV-shared layer


def _any(config: DecoderConfig, layer_type: str) -> bool:
    return True


def _sliding(config: DecoderConfig, layer_type: str) -> bool:
    return layer_type == "sliding"


def _p2(config: DecoderConfig, layer_type: str) -> bool:
    return config.mask_style == "p2"


def _has_positions(config: DecoderConfig, layer_type: str) -> bool:
    return config.mask_style == "p2" or layer_type == "sliding"  # P1 full has no CumSum


# name -> (mutation, which layers it applies to)
MUTATIONS: dict[str, tuple[Mutation, Callable[[DecoderConfig, str], bool]]] = {
    m.__name__: (m, when)
    for m, when in [
        (extra_op_in_mask_chain, _any),
        (attention_mask_through_an_op, _any),
        (mask_is_a_graph_input, _any),
        (other_perm, _any),
        (reshape_allowzero, _any),
        (reshape_to_another_width, _any),
        (key_as_value, _any),
        (key_and_value_swapped, _any),
        (past_inputs, _any),
        (present_output_used, _any),
        (qk_matmul_output_used, _any),
        (present_outputs_unused, _any),
        (less_or_equal, _sliding),
        (distance_reversed, _sliding),
        (window_from_graph_input, _sliding),
        (window_computed, _sliding),
        (window_overridable, _sliding),
        (window_other_constant, _sliding),
        (causal_without_diagonal, _p2),
        (visible_bias_not_zero, _p2),
        (masked_bias_not_negative_enough, _p2),
        (not_causal, lambda config, layer_type: config.mask_style == "p1"),
        (positions_from_another_input, _has_positions),
        (positions_on_another_axis, _has_positions),
        (value_from_another_source, lambda config, _: len(config.nonshared_layers) > 1),
        (nonpad_kv_seqlen, lambda config, _: config.attention_opset >= 24),
    ]
}


def _layer_of(label: str) -> int:
    """Decoder layer of a node named /model/layers.{i}/..."""
    return int(label.split("/")[2].split(".")[1])


def _names(node: ir.Node) -> list[str | None]:
    return [v.name if v is not None else None for v in node.inputs]


@given(
    mutation=st.sampled_from(list(MUTATIONS)),
    config=decoder_configs(max_head_size=64, max_window=16, gqa_sizes_only=True),
    data=st.data(),
)
def test_near_misses_are_left_alone_and_explained(
    mutation: str, config: DecoderConfig, data: st.DataObject
) -> None:
    mutate, applies = MUTATIONS[mutation]
    types = config.resolved_layer_types
    layers = [i for i in config.shared_layers if applies(config, types[i])]
    assume(layers)  # e.g. a window mutation needs a sliding shared layer
    layer_index = data.draw(st.sampled_from(layers), label="layer")
    model = ir.from_proto(build_decoder(config))
    (attention,) = [
        n for n in model.graph if n.name.startswith(f"/model/layers.{layer_index}/Attention")
    ]
    layer = Layer(
        model,
        config,
        attention,
        types[layer_index],
        config.resolved_kv_sources()[layer_index],
        data,
    )
    event(mutation)
    expect = mutate(layer)
    model.graph.sort()
    mutated = ir.to_proto(model)
    target = Target(attention.name, attention.outputs[0].name, _names(attention), layer.source)

    # `shared` runs the rule under test alone: its own reason is asserted. The default
    # pipeline also converts layers with their own cache, and must not take the near-miss
    # for one of those.
    rewritten_proto = check_rewrite(mutated, config, target, expect, layers="shared")
    check_rewrite(mutated, config, target, expect, layers="all")

    # A layer left alone keeps the original's defects (P1, P2 with is_causal=1): the
    # candidate is then only as right as the original, which the verifier holds against it.
    defect_free = config.mask_style == "p2" and config.p2_is_causal == 0
    all_rewritten = not any(n.op_type == "Attention" for n in rewritten_proto.graph.node)
    if expect.runs and (defect_free or all_rewritten):
        onnx.checker.check_model(rewritten_proto)
        result = rewriter.verify(mutated, rewritten_proto)
        note(result.summary())
        assert result.passed, result.summary()


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # the mutated Attention node
    output: str  # its output's name, which a GQA replacing it takes over
    inputs: list[str | None]
    source: int  # the layer whose cache it borrows


def check_rewrite(
    mutated: onnx.ModelProto, config: DecoderConfig, target: Target, expect: Expect, layers: str
) -> onnx.ModelProto:
    rewritten_proto, report = rewriter.rewrite(mutated, layers=layers)
    note(f"layers={layers}: {report.summary()}")
    rewritten = ir.from_proto(rewritten_proto)
    labels = [n.name for n in mutated.graph.node if n.op_type == "Attention"]
    skipped = {s.node: s.reason for s in report.skipped}
    done = {r.node: r for r in report.rewrites}
    # Property 5 on near-misses: every candidate is rewritten or skipped, exactly once.
    assert sorted([r.node for r in report.rewrites] + [s.node for s in report.skipped]) == sorted(
        labels
    )
    # Every other shared layer is rewritten as before, with the model's own window: a
    # mutated mask (another W, say) belongs to the mutated layer alone.
    types = config.resolved_layer_types
    for label in labels:
        index = _layer_of(label)
        if label != target.name and index in config.shared_layers:
            assert label in done, f"untouched shared layer {label} was not rewritten"
            window = config.sliding_window if types[index] == "sliding" else None
            assert done[label].local_window_size == window

    if expect.reason is not None:
        assert target.name in skipped, f"the near-miss was rewritten with layers={layers}"
        reason = skipped[target.name]
        assert reason
        if layers == "shared":
            assert re.search(expect.reason, reason), reason
        (kept,) = [n for n in rewritten.graph if n.name == target.name]
        assert kept.op_type == "Attention" and _names(kept) == target.inputs
        return rewritten_proto
    assert done[target.name].local_window_size == expect.window
    (gqa,) = [
        n
        for n in rewritten.graph
        if n.op_type == "GroupQueryAttention" and n.outputs[0].name == target.output
    ]
    if expect.window is not None:
        assert gqa.attributes["local_window_size"].as_int() == expect.window
    else:
        assert "local_window_size" not in gqa.attributes
    kinds = ("value", "key") if expect.swapped else ("key", "value")
    assert [borrowed_cache(gqa.inputs[3]).name, borrowed_cache(gqa.inputs[4]).name] == [
        f"present.{target.source}.{kind}" for kind in kinds
    ]
    return rewritten_proto
