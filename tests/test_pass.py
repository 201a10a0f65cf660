"""The rewrite as an onnx-ir pass: in a PassManager, its pre/postconditions, the fuse idiom."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest

from rewriter import AttentionToGQAPass, fuse_attention_to_gqa, rewrite
from rewriter.rules import always_past

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "p2_tiny.onnx"


def _model() -> ir.Model:
    return ir.load(FIXTURE)


def test_the_pass_runs_in_a_pass_manager_and_writes_what_rewrite_writes() -> None:
    model = _model()
    manager = ir.passes.PassManager([AttentionToGQAPass(choose_form=always_past)])
    result = manager(model)
    assert result.modified and result.model is model
    expected, report = rewrite(_model(), choose_form=always_past)
    assert report.rewritten == 3
    assert ir.to_proto(model).SerializeToString() == ir.to_proto(expected).SerializeToString()


def test_the_result_carries_the_report() -> None:
    result = AttentionToGQAPass(choose_form=always_past, layers="shared")(_model())
    assert result.report.rewritten == 3
    assert result.report.layers == "shared"
    assert {r.form for r in result.report.rewrites} == {"past"}


def test_fuse_counts_the_rewritten_layers_and_a_second_pass_changes_nothing() -> None:
    model = _model()
    assert fuse_attention_to_gqa(model, choose_form=always_past) == 3
    before = ir.to_proto(model).SerializeToString()
    again = AttentionToGQAPass(choose_form=always_past)(model)
    assert again.report.rewritten == 0 and not again.modified
    assert ir.to_proto(model).SerializeToString() == before


def test_options_are_checked_when_the_pass_is_configured() -> None:
    with pytest.raises(ValueError, match="layers must be one of"):
        AttentionToGQAPass(layers="some")
    with pytest.raises(ValueError, match="speed must be one of"):
        AttentionToGQAPass(speed="fast")


def test_a_model_with_another_com_microsoft_version_is_refused_before_anything_changes() -> None:
    model = _model()
    model.opset_imports["com.microsoft"] = 2
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(ir.passes.PreconditionError, match=r"com\.microsoft opset 2"):
        AttentionToGQAPass(choose_form=always_past)(model)
    assert ir.to_proto(model).SerializeToString() == before


def test_a_model_without_an_ai_onnx_opset_is_refused() -> None:
    model = _model()
    del model.opset_imports[""]
    with pytest.raises(ir.passes.PreconditionError, match=r"no ai\.onnx opset"):
        AttentionToGQAPass(choose_form=always_past)(model)


def _dangling_reader(model: ir.Model) -> ir.Model:
    """`model` plus a node reading a value nothing produces: the checker refuses it."""
    nowhere = ir.Value(name="produced_by_nothing")
    model.graph.append(ir.node("Identity", [nowhere]))
    return model


def test_ensures_holds_a_valid_input_to_the_checker() -> None:
    rewrite_pass = AttentionToGQAPass(choose_form=always_past)
    rewrite_pass.requires(_model())  # passes the checker
    with pytest.raises(ir.passes.PostconditionError, match="fails the ONNX checker"):
        rewrite_pass.ensures(_dangling_reader(_model()))


def test_ensures_does_not_blame_the_rewrite_for_an_input_the_checker_refused() -> None:
    rewrite_pass = AttentionToGQAPass(choose_form=always_past)
    rewrite_pass.requires(_dangling_reader(_model()))
    rewrite_pass.ensures(_dangling_reader(_model()))  # no error: the input was no better


def test_the_checker_leaves_the_model_as_it_was() -> None:
    model = _model()
    rewrite_pass = AttentionToGQAPass(choose_form=always_past)
    before = ir.to_proto(model).SerializeToString()
    rewrite_pass.requires(model)
    rewrite_pass.ensures(model)
    assert ir.to_proto(model).SerializeToString() == before
