"""Forms are decided before matching (issue 24): the rules survey a model without changing it,
each kind of layer is decided once, and the rules then read a plain table."""

from __future__ import annotations

import ast
from pathlib import Path

import onnx_ir as ir
import pytest

from rewriter import rewrite
from rewriter._rewrite_steps import rewrite_layers
from rewriter.rules import (
    FormDecision,
    FormQuestion,
    LayerDecisions,
    LayerKind,
    SpeedChoice,
    always_past,
    gqa_rules,
)
from rewriter.rules._shape_evidence import ShapeFacts
from rewriter.rules.rule_set import survey

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def _surveyed(name: str, decisions: LayerDecisions) -> tuple[ir.Model, list]:
    model = ir.load(FIXTURES / f"{name}.onnx")
    return model, survey(model, decisions, facts=ShapeFacts.infer(model), layers="all")


def test_a_survey_changes_nothing_and_asks_each_kind_once() -> None:
    model, questions = _surveyed("p2_all_attention_tiny", LayerDecisions())
    untouched = ir.load(FIXTURES / "p2_all_attention_tiny.onnx")
    assert ir.to_proto(model).SerializeToString() == ir.to_proto(untouched).SerializeToString()
    assert len(questions) == len(set(questions))
    # KV-shared layers ask for a form, layers with their own cache whether GQA runs them;
    # a sliding (D=8, W=4) and a full (D=16) kind of each.
    assert set(questions) == {
        FormQuestion("float32", 8, True),
        FormQuestion("float32", 16, False),
        FormQuestion("float32", 8, True, native=True),
        FormQuestion("float32", 16, False, native=True),
    }


def test_speed_questions_come_once_the_forms_are_decided() -> None:
    forms = {q: FormDecision("native" if q.native else "past") for q in _all_forms()}
    decisions = LayerDecisions(forms=dict(forms), speeds={})
    _, questions = _surveyed("p2_all_attention_tiny", decisions)
    assert questions and all(isinstance(kind, LayerKind) for kind in questions)
    assert {kind.own_cache for kind in questions} == {True, False}
    assert len(questions) == len(set(questions))


def _all_forms() -> list[FormQuestion]:
    _, questions = _surveyed("p2_all_attention_tiny", LayerDecisions())
    return questions


@pytest.mark.parametrize("layers", ["all", "shared"])
def test_rules_reading_a_plain_table_write_what_the_choosers_write(layers: str) -> None:
    def keep_own_cache(kind: LayerKind) -> SpeedChoice:
        return SpeedChoice("export", "export", "kept") if kind.own_cache else SpeedChoice()

    expected, _ = rewrite(
        ir.load(FIXTURES / "p2_all_attention_tiny.onnx"),
        layers=layers,
        choose_form=always_past,
        choose_speed=keep_own_cache,
    )
    model = ir.load(FIXTURES / "p2_all_attention_tiny.onnx")
    table = LayerDecisions(
        forms={q: FormDecision("native" if q.native else "past") for q in _all_forms()},
        speeds={},
    )
    _, kinds = _surveyed("p2_all_attention_tiny", table)
    table.speeds = {kind: keep_own_cache(kind) for kind in kinds}
    log = rewrite_layers(model, table, layers=layers)
    assert log.rewrites and not table.unanswered
    # The pass also writes its metadata; the graphs are the same.
    assert ir.to_proto(model.graph).SerializeToString() == (
        ir.to_proto(expected.graph).SerializeToString()
    )


def test_a_kind_missing_from_the_table_is_left_with_that_reason() -> None:
    model = ir.load(FIXTURES / "p2_tiny.onnx")
    table = LayerDecisions()
    rules = gqa_rules(table, facts=ShapeFacts.infer(model), layers="all")
    rules.rule_set.apply_to_model(model)
    assert rules.log.rewrites == []
    assert table.unanswered
    reasons = {rules.log.skip_reason(node) for node in model.graph if node.op_type == "Attention"}
    assert reasons and all(reason.startswith("no decision yet") for reason in reasons)


def test_a_forced_form_is_counted_per_layer_that_reads_it() -> None:
    forced = LayerDecisions.asking(lambda *_: FormDecision("past", forced=True))
    log = rewrite_layers(ir.load(FIXTURES / "p2_tiny.onnx"), forced, layers="shared")
    assert len(forced.forced_nodes) == len(log.rewrites) == 3


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize(
    "module",
    [
        *sorted((ROOT / "rewriter" / "probe").glob("*.py")),
        ROOT / "rewriter" / "speed.py",
        ROOT / "rewriter" / "forms.py",
        ROOT / "rewriter" / "_rewrite_steps.py",
    ],
    ids=lambda path: path.name,
)
def test_the_probes_build_their_models_without_the_pipeline(module: Path) -> None:
    # pipeline -> passes -> forms -> probe -> _one_layer -> pipeline was an import cycle.
    assert not _imported_modules(module) & {"rewriter.pipeline", "rewriter.passes"}
