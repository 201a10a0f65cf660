"""The KV-shared Attention -> GroupQueryAttention rule: structure of what it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from decoder_runs import FIXTURES, borrowed_cache

from rewriter import rewrite as rewrite_model
from rewriter.fixtures.gemma4_like import build_decoder, tiny_config
from rewriter.forms import FormRejectedError
from rewriter.metadata import METADATA_PREFIX
from rewriter.rules import FormDecision

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "fixtures"


def rewrite(model, **options):
    """The KV-shared rule alone: layers with their own cache are tests/test_nonshared_rule.py's."""
    return rewrite_model(model, layers="shared", **options)


MASK_OPS = {"CumSum", "Less", "LessOrEqual", "GreaterOrEqual", "And", "Where", "Expand"}


def load(name: str) -> ir.Model:
    return ir.load(FIXTURE_DIR / f"{name}.onnx")


def ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def gqa_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "GroupQueryAttention"]


def shared_attention(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "Attention" and len(n.inputs) <= 4]


@pytest.mark.parametrize("name", FIXTURES)
def test_every_shared_layer_becomes_one_gqa_node(name: str) -> None:
    model = load(name)
    shared = shared_attention(model)
    existing_gqa = len(gqa_nodes(model))
    model, report = rewrite(model)

    assert report.rewritten == len(shared) == 3
    assert len(gqa_nodes(model)) == existing_gqa + 3
    assert shared_attention(model) == []
    assert "Transpose" not in ops(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


@pytest.mark.parametrize("name", ["p1_tiny", "p2_tiny", "p1_tiny_fp16"])
def test_mask_chains_are_gone_when_nothing_else_reads_them(name: str) -> None:
    model, _ = rewrite(load(name))
    assert MASK_OPS.isdisjoint(ops(model))


def test_all_attention_model_keeps_the_mask_its_other_layers_read() -> None:
    model, report = rewrite(load("p2_all_attention_tiny"))
    # The four non-shared layers are Attention with past inputs: not this rule's business.
    assert (
        sorted(s.reason for s in report.skipped)
        == ["a layer with its own cache (past inputs); --layers shared leaves it"] * 4
    )
    assert ops(model).count("Attention") == 4
    assert "CumSum" in ops(model)


@pytest.mark.parametrize("name", FIXTURES)
def test_gqa_attributes_and_inputs(name: str) -> None:
    original = load(name)
    expected = {}
    for node in shared_attention(original):
        mask_chain_has_window = _mask_has_less(node.inputs[3])
        cache = node.inputs[1].producer().inputs[0].producer().inputs[0]
        expected[node.outputs[0].name] = (mask_chain_has_window, cache.name)
    model, report = rewrite(original)

    new_gqa = [
        n for n in gqa_nodes(model) if borrowed_cache(n.inputs[3]).name.startswith("present.")
    ]
    assert len(new_gqa) == 3
    for node, rewrite_entry in zip(new_gqa, report.rewrites, strict=True):
        windowed, cache_name = expected[node.outputs[0].name]
        attrs = node.attributes
        assert attrs["num_heads"].as_int() == 4
        assert attrs["kv_num_heads"].as_int() == 1
        assert attrs["scale"].as_float() == 1.0
        assert attrs["do_rotary"].as_int() == 0
        assert "softcap" not in attrs
        if windowed:
            assert attrs["local_window_size"].as_int() == 4 == rewrite_entry.local_window_size
        else:
            assert "local_window_size" not in attrs and rewrite_entry.local_window_size is None
        # past form: empty key/value, the borrowed present cache as past, present omitted.
        assert node.inputs[1] is node.inputs[2]
        assert node.inputs[1].producer().op_type == "ConstantOfShape"
        assert borrowed_cache(node.inputs[3]).name == cache_name
        assert borrowed_cache(node.inputs[4]).name == cache_name.replace(".key", ".value")
        # Sliding layers read the keys their window reaches; full layers the whole cache.
        assert rewrite_entry.window_slice == windowed
        assert (node.inputs[3].producer().op_type == "Slice") == windowed
        assert len(node.outputs) == 1
        assert rewrite_entry.form == "past"


def _mask_has_less(mask: ir.Value) -> bool:
    seen, stack = set(), [mask]
    while stack:
        value = stack.pop()
        producer = value.producer() if value is not None else None
        if producer is None or producer in seen:
            continue
        seen.add(producer)
        if producer.op_type == "Less":
            return True
        stack.extend(producer.inputs)
    return False


def test_seqlens_k_is_computed_once_or_reused() -> None:
    # p2_tiny's own GQA layers already compute seqlens_k: the rewrite reuses theirs.
    model, _ = rewrite(load("p2_tiny"))
    assert len({_unshifted(n.inputs[5]) for n in gqa_nodes(model)}) == 1
    assert ops(model).count("ReduceSum") == 1
    # In an all-Attention model it is computed once for all rewritten layers.
    model, _ = rewrite(load("p2_all_attention_tiny"))
    assert len({_unshifted(n.inputs[5]) for n in gqa_nodes(model)}) == 1
    # The sliding layers' window slice shifts it once for all of them.
    sliced = {n.inputs[5] for n in gqa_nodes(model) if n.inputs[3].producer().op_type == "Slice"}
    assert len(sliced) == 1
    # One empty K/V per head size (sliding D=8, full D=16), shared by layers of that size.
    assert len({n.inputs[1] for n in gqa_nodes(model)}) == 2


def _unshifted(seqlens_k: ir.Value) -> ir.Value:
    """seqlens_k before the window slice's shift (Sub(seqlens_k, start))."""
    producer = seqlens_k.producer()
    if producer is not None and producer.op_type == "Sub":
        return producer.inputs[0]
    return seqlens_k


def test_nothing_else_changes() -> None:
    original = load("p2_tiny")
    before_nodes = {
        n.name: (n.op_type, [v.name if v else "" for v in n.inputs]) for n in original.graph
    }
    before_inputs = [v.name for v in original.graph.inputs]
    before_outputs = [v.name for v in original.graph.outputs]
    before_init = {name: v.const_value.tobytes() for name, v in original.graph.initializers.items()}
    model, report = rewrite(original)

    after = {n.name: (n.op_type, [v.name if v else "" for v in n.inputs]) for n in model.graph}
    removed = set(before_nodes) - set(after)
    assert {before_nodes[n][0] for n in removed} <= MASK_OPS | {
        "Attention",
        "Transpose",
        "Reshape",
        "Unsqueeze",
        "Cast",
        "Slice",
        "Sub",
        "Shape",
        "Concat",
        "Gather",
        "CastLike",
        "Constant",
    }
    for name in set(before_nodes) & set(after):
        assert after[name] == before_nodes[name], name
    assert [v.name for v in model.graph.inputs] == before_inputs
    assert [v.name for v in model.graph.outputs] == before_outputs
    for name, value in model.graph.initializers.items():
        if name in before_init:
            assert value.const_value.tobytes() == before_init[name]
    assert report.nodes_removed == len(removed)


def test_nodes_already_dead_in_the_input_are_kept() -> None:
    model = load("p2_tiny")
    dead = ir.node("Identity", [model.graph.inputs[0]], name="already_dead")
    model.graph.append(dead)
    model, _ = rewrite(model)
    assert "already_dead" in {n.name for n in model.graph}


def test_rewriting_twice_changes_nothing() -> None:
    once, _ = rewrite(load("p1_tiny"))
    text = str(ir.to_proto(once).graph)
    twice, report = rewrite(once)
    assert report.rewritten == 0 and report.skipped == []
    assert str(ir.to_proto(twice).graph) == text


def test_model_proto_in_model_proto_out_and_input_untouched() -> None:
    proto = onnx.load(FIXTURE_DIR / "p1_tiny.onnx")
    before = proto.SerializeToString()
    result, report = rewrite(proto)
    assert isinstance(result, onnx.ModelProto)
    assert proto.SerializeToString() == before
    assert report.rewritten == 3


def test_metadata_records_the_rewrite() -> None:
    model, _ = rewrite(load("p1_tiny"))
    props = model.metadata_props
    assert props[METADATA_PREFIX + "rewrites"] == "3"
    assert props[METADATA_PREFIX + "forms"] == "past"
    assert props[METADATA_PREFIX + "probed_on"].startswith("onnxruntime ")
    assert METADATA_PREFIX + "version" in props


def test_padding_contract() -> None:
    _, report = rewrite(load("p2_tiny"))
    assert report.padding_contract == "unchanged" and report.warnings == []
    _, report = rewrite(load("p2_all_attention_tiny"))
    assert report.padding_contract == "right-padding-only"
    assert any("right padding" in w for w in report.warnings)
    _, report = rewrite(load("p2_all_attention_tiny"), exact_padding=True)
    assert report.padding_contract == "exact" and report.warnings == []


def test_exact_padding_passes_a_finite_bias_without_window() -> None:
    model, _ = rewrite(load("p2_all_attention_tiny"), exact_padding=True)
    for node in gqa_nodes(model):
        assert "local_window_size" not in node.attributes  # the bias carries the window
        bias = node.inputs[10]
        assert bias is not None and bias.producer().op_type == "Where"
        negative = bias.producer().inputs[2].const_value.numpy()
        assert np.isfinite(negative).all()


def test_past_present_form_keeps_three_outputs() -> None:
    model, report = rewrite(load("p2_tiny"), form="past-present")
    new = [
        n
        for n in gqa_nodes(model)
        if len(n.outputs) == 3
        and n.inputs[1].producer()
        and n.inputs[1].producer().op_type == "ConstantOfShape"
    ]
    assert len(new) == 3
    assert {r.form for r in report.rewrites} == {"past-present"}


def test_forced_split_is_refused_with_the_probe_reason() -> None:
    with pytest.raises(FormRejectedError, match=r"split.*batch2-decode"):
        rewrite(load("p2_tiny"), form="split")


def test_forced_split_with_force_is_written_and_marked() -> None:
    model, report = rewrite(load("p2_tiny"), form="split", force=True)
    assert report.forced and {r.form for r in report.rewrites} == {"split"}
    assert model.metadata_props[METADATA_PREFIX + "forced"] == "true"
    assert any("--force" in w for w in report.warnings)


def test_layer_with_no_qualifying_form_stays_with_the_reason() -> None:
    model, report = rewrite(
        load("p1_tiny"), choose_form=lambda dtype, d, windowed: FormDecision(None, "none here")
    )
    assert report.rewritten == 0
    assert [s.reason for s in report.skipped] == [
        "no GroupQueryAttention form qualifies: none here"
    ] * 3
    assert len(shared_attention(model)) == 3


def _skip_reasons(model: ir.Model) -> dict[str, str]:
    _, report = rewrite(model)
    return {s.node: s.reason for s in report.skipped}


def test_window_with_less_or_equal_is_not_rewritten() -> None:
    model = load("p1_tiny")
    for node in model.graph:
        if node.op_type == "Less":
            node.op_type = "LessOrEqual"  # W+1 keys: GQA cannot express it
    reasons = _skip_reasons(model)
    assert len(reasons) == 2  # the two sliding layers; the full layer is still rewritten
    assert all(
        "mask is not a recognised P1/P2 mask" in r and "LessOrEqual" in r for r in reasons.values()
    )


def test_window_that_is_not_a_constant_is_not_rewritten() -> None:
    model = load("p2_tiny")
    less = next(n for n in model.graph if n.op_type == "Less")
    window_input = ir.Value(
        name="window", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([])
    )
    model.graph.inputs.append(window_input)
    less.replace_input_with(1, window_input)
    assert set(_skip_reasons(model).values()) == {
        "mask is not a recognised P1/P2 mask (closest is P2Sliding: window is not a constant)"
    }


def test_transpose_with_another_perm_is_not_rewritten() -> None:
    model = load("p1_tiny")
    transpose = next(n for n in model.graph if n.op_type == "Transpose")
    transpose.attributes["perm"] = ir.AttrInt64s("perm", [0, 2, 3, 1])
    reasons = _skip_reasons(model)
    assert reasons and all("perm mismatch" in r for r in reasons.values())


def test_key_and_value_from_different_sources_are_not_rewritten() -> None:
    model = load("p2_tiny")
    layer4 = next(n for n in shared_attention(model) if "layers.4" in n.name)
    layer6 = next(n for n in shared_attention(model) if "layers.6" in n.name)
    # Layer 4 borrows V from layer 6's source (a full layer of another head size).
    layer4.replace_input_with(2, layer6.inputs[2])
    reasons = _skip_reasons(model)
    assert reasons[layer4.name] == (
        "K and V do not come from the same source layer's present outputs"
    )


def test_mask_cast_before_cumsum_is_recognised_and_verifies() -> None:
    from rewriter import verify

    model = load("p2_tiny")
    cumsum = next(n for n in model.graph if n.op_type == "CumSum")
    cast = ir.node("Cast", [cumsum.inputs[0]], attributes={"to": ir.DataType.INT64})
    model.graph.insert_before(cumsum, cast)
    cumsum.replace_input_with(0, cast.outputs[0])
    original = ir.to_proto(model)
    rewritten, report = rewrite(model)
    assert report.rewritten == 3 and report.skipped == []
    assert verify(original, rewritten).passed


# -- head size from what real exports state ----------------------------------------------------


def _symbolic_head_dims(model: ir.Model) -> bool:
    presents = [v for v in model.graph.outputs if v.name.startswith("present.")]
    queries = [node.inputs[0] for node in shared_attention(model)]
    return all(not isinstance(v.shape[-1], int) for v in presents + queries)


@pytest.mark.parametrize("annotations", ["exporter", "static"])
def test_head_size_found_however_the_export_annotates(annotations: str) -> None:
    # "exporter" is how the mobius exports annotate (present [batch, 1, _d22, _d21], query
    # [batch, sequence_len, _d31]): the head size is only on the source layer's past input
    # and after shape inference. The committed fixtures are built that way.
    config = tiny_config(mask_style="p1", annotations=annotations)
    model = ir.from_proto(build_decoder(config))
    assert _symbolic_head_dims(model) == (annotations == "exporter")
    annotated = {v.name: (v.shape, v.dtype) for n in model.graph for v in n.outputs}
    model, report = rewrite(model)
    assert report.rewritten == 3 and report.skipped == []
    assert sorted(r.head_size for r in report.rewrites) == [8, 8, 16]
    # What shape inference found is evidence only: no annotation was written or changed.
    survivors = {v.name: (v.shape, v.dtype) for n in model.graph for v in n.outputs}
    assert {name: survivors[name] for name in annotated if name in survivors} == {
        name: annotated[name] for name in annotated if name in survivors
    }


def test_committed_fixtures_carry_symbolic_head_dims_like_real_exports() -> None:
    for name in FIXTURES:
        assert _symbolic_head_dims(load(name)), name


def test_head_size_disagreement_names_every_source() -> None:
    model = load("p1_tiny")
    # The source layer 2's past input now claims D=16 while its projections say 8.
    past = next(v for v in model.graph.inputs if v.name == "past_key_values.2.key")
    past.shape = ir.Shape(["batch", 1, "past_sequence_length", 16])
    _, report = rewrite(model)
    assert len(report.skipped) == 2  # layers 4 and 5 borrow layer 2's cache
    for skip in report.skipped:
        assert skip.reason.startswith("inconsistent head sizes [8, 16]: ")
        assert "16 from borrowed cache writer" in skip.reason
        assert "past input past_key_values.2.key" in skip.reason
        assert "8 from query" in skip.reason
