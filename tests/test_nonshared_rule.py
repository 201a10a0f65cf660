"""Layers with their own cache (Attention with past/present) -> GroupQueryAttention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from decoder_runs import Decoder, relative_error, tokens

from rewriter import rewrite, verify
from rewriter.rules import FormDecision

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "fixtures"
MASK_OPS = {"CumSum", "Less", "GreaterOrEqual", "And", "Where", "Expand", "Slice"}


def load(name: str) -> onnx.ModelProto:
    return onnx.load(FIXTURE_DIR / f"{name}.onnx")


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_all_attention_model_becomes_all_gqa_without_mask_ops() -> None:
    original = load("p2_all_attention_tiny")
    rewritten, report = rewrite(original)
    assert report.rewritten == 7 and report.skipped == []
    assert sorted(r.form for r in report.rewrites) == ["native"] * 4 + ["past"] * 3
    assert "Attention" not in op_types(rewritten)
    # The only Slices left cut borrowed caches to the window (not the mask chain's).
    mask_ops = [
        n.op_type
        for n in rewritten.graph.node
        if n.op_type in MASK_OPS
        and not (n.op_type == "Slice" and n.input[0].startswith("present."))
    ]
    assert mask_ops == []
    # The KV cache keeps its graph interface: same present names, same order.
    assert [o.name for o in rewritten.graph.output] == [o.name for o in original.graph.output]
    for node in rewritten.graph.node:
        if node.op_type == "GroupQueryAttention" and node.input[3].startswith("past_key_values"):
            assert list(node.output[1:]) == [
                node.input[3].replace("past_key_values", "present"),
                node.input[4].replace("past_key_values", "present"),
            ]
    onnx.checker.check_model(rewritten, full_check=True)


def test_all_attention_model_verifies_including_padded_batch_decode() -> None:
    original = load("p2_all_attention_tiny")
    rewritten, _ = rewrite(original)
    result = verify(original, rewritten)
    assert result.passed, result.summary()
    batch = next(
        c for c in result.checks if c.name == "batch_consistency" and c.model == "candidate"
    )
    assert batch.passed and "decode step" in batch.detail and "prefix mask" in batch.detail
    assert result.original_defects == []


def test_presents_keep_the_original_layout_for_unpadded_rows() -> None:
    original, rewritten = load("p2_all_attention_tiny"), rewrite(load("p2_all_attention_tiny"))[0]
    ids = tokens(9, seed=1)
    mask = np.ones((1, 9), np.int64)
    before, after = Decoder(original).run(ids, mask), Decoder(rewritten).run(ids, mask)
    for name in before:
        assert before[name].shape == after[name].shape, name
        assert relative_error(after[name], before[name]) <= 1e-4, name


def test_d512_style_attention_layers_break_at_batch_2_and_the_rewrite_does_not() -> None:
    original = load("p1_attention_full_tiny")
    rewritten, report = rewrite(original)
    assert report.rewritten == 5
    ids = tokens(6, batch=2, seed=3)
    mask = np.ones((2, 6), np.int64)
    mask[1, 4:] = 0
    with pytest.raises(Exception, match="attn_mask must be broadcastable"):
        Decoder(original).run(ids, mask)
    logits = Decoder(rewritten).run(ids, mask)["logits"]
    assert np.isfinite(logits).all()

    result = verify(original, rewritten)
    assert result.passed, result.summary()
    assert any("3-D [B,S,T] attn_mask" in d for d in result.original_defects)


def test_layers_shared_leaves_cache_owning_layers_with_a_reason() -> None:
    rewritten, report = rewrite(load("p2_all_attention_tiny"), layers="shared")
    assert report.rewritten == 3
    assert [s.reason for s in report.skipped] == [
        "a layer with its own cache (past inputs); --layers shared leaves it"
    ] * 4
    assert op_types(rewritten).count("Attention") == 4


def test_exact_padding_keeps_the_original_cache_layout_and_semantics() -> None:
    original = load("p2_all_attention_tiny")
    exact, report = rewrite(original, exact_padding=True)
    assert report.padding_contract == "exact" and report.rewritten == 7
    ids = tokens(8, batch=2, seed=5)
    mask = np.ones((2, 8), np.int64)
    mask[0, :3] = 0  # left padding
    reference, actual = Decoder(original), Decoder(exact)
    before, after = reference.run(ids, mask), actual.run(ids, mask)
    # A decode step with a hole in row 1's mask: the appended layout of Attention caches.
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    mask2[1, 6:8] = 0
    step_before = reference.run(ids[:, :1], mask2, before)
    step_after = actual.run(ids[:, :1], mask2, after)
    assert relative_error(after["logits"][0, 3:], before["logits"][0, 3:]) <= 1e-4
    assert relative_error(after["logits"][1], before["logits"][1]) <= 1e-4
    assert relative_error(step_after["logits"], step_before["logits"]) <= 1e-4


def test_provider_limits_keep_a_layer_as_it_was() -> None:
    model = ir.from_proto(load("p1_attention_full_tiny"))

    def no_full_layers(dtype: str, head_size: int, windowed: bool) -> FormDecision:
        return FormDecision("past" if windowed else None, "no kernel for D=16 here")

    _, report = rewrite(model, choose_form=no_full_layers)
    assert {s.node: s.reason for s in report.skipped} == {
        "/model/layers.6/Attention_157": "no GroupQueryAttention form qualifies: "
        "no kernel for D=16 here",
        "/model/layers.1/Attention_47": "GroupQueryAttention does not run this layer here: "
        "no kernel for D=16 here",
        "/model/layers.3/Attention_91": "GroupQueryAttention does not run this layer here: "
        "no kernel for D=16 here",
    }
    assert report.rewritten == 2


def test_nonpad_kv_seqlen_is_not_rewritten() -> None:
    model = ir.from_proto(load("p2_all_attention_tiny"))
    layer0 = next(n for n in model.graph if n.op_type == "Attention" and n.inputs[4] is not None)
    lengths = ir.Value(name="nonpad", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["b"]))
    model.graph.inputs.append(lengths)
    layer0.resize_inputs(7)
    layer0.replace_input_with(6, lengths)
    _, report = rewrite(model)
    assert {s.node: s.reason for s in report.skipped} == {
        layer0.name: "has a nonpad_kv_seqlen input"
    }
