"""The rewrite's steps as small onnx-ir passes over one ``RewriteRun``, composed with
``ir.passes.Sequential`` by ``rewriter.passes.AttentionToGQAPass``.

Data flows one way: the model is read (shape facts, candidates), each kind of layer gets its
form and speed choice once (``DecideFormsPass``, ``DecideSpeedsPass``: the only steps that may
run onnxruntime, through the choosers the caller gives), the rules rewrite reading that table
(``ApplyRulesPass``), what they replaced is swept and renamed, and the report and metadata
are written. The probe models are built with ``rewrite_steps`` alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from rewriter._cleanup import remove_dead_producers
from rewriter._report_builder import all_nodes, attention_nodes, describe, is_gqa
from rewriter.metadata import record_metadata
from rewriter.report import RewriteReport
from rewriter.rules import (
    FormChooser,
    FormQuestion,
    LayerDecisions,
    LayerKind,
    RewriteLog,
    SpeedChooser,
    gqa_rules,
)
from rewriter.rules._shape_evidence import ShapeFacts
from rewriter.rules.rule_set import survey

__all__ = [
    "ApplyRulesPass",
    "CollectReportPass",
    "DecideFormsPass",
    "DecideSpeedsPass",
    "RecordMetadataPass",
    "RemoveReplacedPass",
    "RenameOutputsPass",
    "RewriteRun",
    "rewrite_layers",
    "rewrite_steps",
    "run_steps",
]

# GroupQueryAttention is an operator of com.microsoft version 1, the only version ONNX
# Runtime defines for its contrib domain.
MS_DOMAIN, MS_VERSION = "com.microsoft", 1


@dataclasses.dataclass
class RewriteRun:
    """What one run of the rewrite reads and writes, shared by its steps."""

    decisions: LayerDecisions
    layers: str = "all"
    exact_padding: bool = False
    window_slice: bool = True
    # Who answers the table's questions (DecideFormsPass, DecideSpeedsPass).
    choose_form: FormChooser | None = None
    native_support: FormChooser | None = None
    choose_speed: SpeedChooser | None = None
    # The probes behind the choosers, whose tables the report keeps: a
    # rewriter.forms.ProbedFormChooser and a rewriter.speed.SpeedProbe, or None.
    probed: Any = None
    timed: Any = None
    provider: str = "cpu"
    report: RewriteReport | None = None
    # Read before any rewrite changes the graph.
    facts: ShapeFacts | None = None
    candidates: list[ir.Node] = dataclasses.field(default_factory=list)
    had_gqa: bool = False
    # Written by ApplyRulesPass.
    log: RewriteLog = dataclasses.field(default_factory=RewriteLog)

    def read(self, model: ir.Model) -> None:
        """Shape facts and candidates of the model as given, once."""
        if self.facts is None:
            self.facts = ShapeFacts.infer(model)
            self.candidates = attention_nodes(model)
            self.had_gqa = any(is_gqa(node) for node in all_nodes(model))

    def rule_options(self, model: ir.Model) -> dict[str, Any]:
        """What the rule set is built with (rules.gqa_rules, rules.rule_set.survey)."""
        self.read(model)
        return {
            "facts": self.facts,
            "layers": self.layers,
            "exact_padding": self.exact_padding,
            "window_slice": self.window_slice,
        }


class _Step(ir.passes.InPlacePass):
    def __init__(self, run: RewriteRun) -> None:
        super().__init__()
        self.run = run


class DecideFormsPass(_Step):
    """Guarantees: the model is unchanged; the table answers every form question the rules
    ask of the model (which GQA form, whether GQA runs a layer with its own cache), each
    kind decided once, in the order the rules ask."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        run = self.run
        for question in survey(model, run.decisions, **run.rule_options(model)):
            assert isinstance(question, FormQuestion), question
            chooser = run.native_support if question.native else run.choose_form
            assert chooser is not None
            run.decisions.forms[question] = chooser(
                question.dtype, question.head_size, question.windowed
            )
        return ir.passes.PassResult(model, modified=False)


class DecideSpeedsPass(_Step):
    """Guarantees: the model is unchanged; with a speed chooser, the table holds a speed
    choice for every kind of layer the rules ask one for (those a form was found for)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        run = self.run
        if run.choose_speed is None:
            return ir.passes.PassResult(model, modified=False)
        run.decisions.speeds = {}
        for kind in survey(model, run.decisions, **run.rule_options(model)):
            assert isinstance(kind, LayerKind), kind
            run.decisions.speeds[kind] = run.choose_speed(kind)
        return ir.passes.PassResult(model, modified=False)


class ApplyRulesPass(_Step):
    """Guarantees: every layer a rule takes is replaced (its replacement reads the values
    the Attention read and its outputs are read where the Attention's were); no node is
    removed; the model imports com.microsoft wherever a GQA node was written."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        run = self.run
        rules = gqa_rules(run.decisions, **run.rule_options(model))
        rules.rule_set.apply_to_model(model)
        run.log = rules.log
        if any(is_gqa(node) for node in all_nodes(model)):
            # A GQA node inside an If branch (a speed choice) is not seen by the rewriter's
            # own opset bookkeeping.
            model.opset_imports.setdefault(MS_DOMAIN, MS_VERSION)
        return ir.passes.PassResult(model, modified=bool(run.log.rewrites))


class RemoveReplacedPass(_Step):
    """Guarantees: the replaced nodes are gone, with every producer and initializer only
    they read; nothing that was dead in the input is removed."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        removed = remove_dead_producers(self.run.log.replaced_nodes)
        if self.run.report is not None:
            self.run.report.nodes_removed = removed
        return ir.passes.PassResult(model, modified=removed > 0)


class RenameOutputsPass(_Step):
    """Guarantees: readers of a rewritten layer see the same value names as in the input."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        renames = self.run.log.renames
        for gqa_output, name in renames:
            gqa_output.name = name
        return ir.passes.PassResult(model, modified=bool(renames))


class CollectReportPass(_Step):
    """Guarantees: the model is unchanged; the report accounts for every candidate layer
    (rewritten, or skipped with the reason of the rule whose layer it is), the padding
    contract and the probes' tables."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        run = self.run
        report = run.report
        assert report is not None
        report.rewrites = run.log.rewrites
        describe(
            report,
            model,
            run.candidates,
            run.log,
            had_gqa=run.had_gqa,
            exact_padding=run.exact_padding,
        )
        if run.timed is not None:
            report.speed = {"provider": run.provider, "layers": run.timed.tables()}
        if run.probed is not None:
            report.probe = {"provider": run.provider, "tables": run.probed.probe_tables()}
            forced = len(run.decisions.forced_nodes)
            report.forced = forced > 0
            if report.forced:
                report.warnings.append(
                    f"--force: {forced} layer(s) use form {report.form_request}, which the "
                    "probe rejected on this runtime"
                )
        return ir.passes.PassResult(model, modified=False)


class RecordMetadataPass(_Step):
    """Guarantees: the model's ``kvshare_gqa_rewriter.*`` metadata describe this run."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        run = self.run
        assert run.report is not None
        probed_on = (
            f"{run.probed.runtime}, provider {run.provider}" if run.probed is not None else None
        )
        before = dict(model.metadata_props)
        record_metadata(model, run.report, probed_on)
        return ir.passes.PassResult(model, modified=dict(model.metadata_props) != before)


def rewrite_steps(run: RewriteRun) -> list[ir.passes.PassBase]:
    """The steps that change the model: the rules, the sweep, the renames, the sort."""
    return [
        ApplyRulesPass(run),
        RemoveReplacedPass(run),
        RenameOutputsPass(run),
        common_passes.TopologicalSortPass(),
    ]


def rewrite_layers(
    model: ir.Model, decisions: LayerDecisions, *, layers: str, window_slice: bool = True
) -> RewriteLog:
    """Rewrite `model` in place with the rule set alone, reading `decisions` (the probes'
    one-layer models: no check, report or metadata); what the rules logged."""
    run = RewriteRun(decisions, layers=layers, window_slice=window_slice)
    run_steps(rewrite_steps(run), model)
    return run.log


def run_steps(steps: list[ir.passes.PassBase], model: ir.Model) -> None:
    """Run `steps` in order on `model` as one ``ir.passes.Sequential``."""
    try:
        ir.passes.Sequential(*steps)(model)
    except ir.passes.PassError as error:
        # Sequential wraps what a step raises; callers catch the step's own error
        # (FormRejectedError, ProbeError, the CLI's Interrupted).
        cause = error.__cause__
        if isinstance(cause, Exception):
            raise cause from None
        raise
