"""The rewrite as an onnx-ir pass, for exporters that run a ``PassManager``::

    import onnx_ir as ir
    from rewriter.passes import AttentionToGQAPass

    result = AttentionToGQAPass(layers="all")(model)   # model: onnx_ir.Model, changed in place
    print(result.report.summary())

``fuse_attention_to_gqa(model) -> count`` is the one-line form (onnxscript's ``fuse_*``).
onnxruntime is needed only for the form probe and the speed probe: pass ``choose_form`` (for
example ``rewriter.rules.always_past``) to run the pass without it.

The pass is a ``Sequential`` of the small passes of ``rewriter._rewrite_steps``: decide each
kind of layer's form, then its speed choice (the probes run here, before any rewrite), apply
the rules reading that table, sweep what they replaced, restore value names, sort, report,
record metadata.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from rewriter import __version__
from rewriter._error_text import collapsed
from rewriter._input_checks import check_rewritable
from rewriter._rewrite_steps import (
    MS_DOMAIN,
    MS_VERSION,
    CollectReportPass,
    DecideFormsPass,
    DecideSpeedsPass,
    RecordMetadataPass,
    RewriteRun,
    rewrite_steps,
    run_steps,
)
from rewriter.report import RewriteReport
from rewriter.rules import FormChooser, LayerDecisions, SpeedChooser, native_support_from
from rewriter.rules._shape_evidence import keeping_initializer_order
from rewriter.rules.rule_set import LAYER_CHOICES

__all__ = ["SPEED_CHOICES", "AttentionToGQAPass", "RewriteResult", "fuse_attention_to_gqa"]

SPEED_CHOICES = ("auto", "off")


@dataclasses.dataclass
class RewriteResult(ir.passes.PassResult):
    """The pass result with the report: every rewritten and skipped layer, and why."""

    report: RewriteReport = dataclasses.field(kw_only=True)


class AttentionToGQAPass(ir.passes.InPlacePass):
    """Rewrite KV-shared ai.onnx Attention layers (and, with layers="all", layers with their
    own cache) into com.microsoft GroupQueryAttention, in place.

    Guarantees: nothing outside the rewritten layers changes (no other node is removed or
    renamed; readers of a rewritten layer see the same value names); a model that passed
    the ONNX checker still does (``ensures``); the report accounts for every candidate.
    Each step's own guarantee is in its docstring (``rewriter._rewrite_steps``).

    layers: "all" (default) or "shared" (KV-shared layers only).
    form: "auto" picks, per KV-shared layer, the best form the probe found correct on
        `provider`; a form name forces it (FormRejectedError if the probe rejects it,
        unless `force`).
    exact_padding: pass the mask as attention_bias so any padding keeps its meaning.
    window_slice: sliding KV-shared layers read only the keys their window reaches (the
        borrowed cache sliced once per source and step; CPU GQA reads every key it gets).
    speed: "off" (default) makes every KV-shared layer that qualifies GroupQueryAttention;
        "auto" gives float32 KV-shared layers on CPU If(S == 1: fold, else: gqa) (fixed,
        measured once: rewriter.speed.FOLD_ON_CPU) and times, per other layer kind whose
        export is correct, GQA, the export's Attention and Attention reading the cache in
        place, in prefill and decode, on `provider`, and gives the layer the fastest (one per
        phase behind an If on S == 1 where that is measured faster still; rewriter.speed).
        Not with a forced form.
    choose_form: replaces the probe (tests, or exporters that know their runtime); no
        onnxruntime is imported then. Asked once per kind of layer, before the rules run.
    choose_speed: replaces the speed probe: LayerKind -> rules.SpeedChoice (tests, or
        exporters that measured their runtime). Asked once per kind, before the rules run.
    progress: called with a line per layer kind the speed probe times (the CLI prints it).
    """

    def __init__(
        self,
        *,
        layers: str = "all",
        form: str = "auto",
        provider: str = "cpu",
        force: bool = False,
        exact_padding: bool = False,
        window_slice: bool = True,
        speed: str = "off",
        choose_form: FormChooser | None = None,
        choose_speed: SpeedChooser | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        if layers not in LAYER_CHOICES:
            raise ValueError(f"layers must be one of {LAYER_CHOICES}, got {layers!r}")
        if speed not in SPEED_CHOICES:
            raise ValueError(f"speed must be one of {SPEED_CHOICES}, got {speed!r}")
        self.layers = layers
        self.form = form
        self.provider = provider
        self.force = force
        self.exact_padding = exact_padding
        self.window_slice = window_slice
        self.speed = speed
        self.choose_form = choose_form
        self.choose_speed = choose_speed
        self.progress = progress
        # Whether the model given to requires() passed the checker: ensures() holds the
        # result to the same standard, never to one the input did not meet.
        self._input_checked = False

    def requires(self, model: ir.Model) -> None:
        if "" not in model.opset_imports and "ai.onnx" not in model.opset_imports:
            raise ir.passes.PreconditionError(
                "the model imports no ai.onnx opset: its Attention nodes have no meaning"
            )
        version = model.opset_imports.get(MS_DOMAIN, MS_VERSION)
        if version != MS_VERSION:
            raise ir.passes.PreconditionError(
                f"the model imports {MS_DOMAIN} opset {version}; GroupQueryAttention is "
                f"defined in version {MS_VERSION}"
            )
        # Before any probe or rewrite: a model that would fail deep inside them (a cycle, a
        # mistyped attribute, a window GroupQueryAttention cannot hold) is refused by name.
        check_rewritable(model)
        self._input_checked = _passes_checker(model) is None

    def ensures(self, model: ir.Model) -> None:
        if not self._input_checked:
            return
        problem = _passes_checker(model)
        if problem is not None:
            raise ir.passes.PostconditionError(
                f"the rewritten model fails the ONNX checker: {problem}"
            )

    def call(self, model: ir.Model) -> RewriteResult:
        metadata_before = dict(model.metadata_props)
        run = self._run()
        run_steps(
            [
                DecideFormsPass(run),
                DecideSpeedsPass(run),
                *rewrite_steps(run),
                CollectReportPass(run),
                RecordMetadataPass(run),
            ],
            model,
        )
        report = run.report
        assert report is not None
        modified = bool(report.rewrites) or dict(model.metadata_props) != metadata_before
        return RewriteResult(model, modified, report=report)

    def _run(self) -> RewriteRun:
        """This run's state, with the choosers that fill its table: the caller's, else the
        probes (which import onnxruntime, so only then)."""
        probed = self._form_probe()
        # A forced form is never second-guessed.
        timed = self._speed_probe() if self.form == "auto" else None
        choose_form = self.choose_form or probed
        assert choose_form is not None
        return RewriteRun(
            LayerDecisions(),
            layers=self.layers,
            exact_padding=self.exact_padding,
            window_slice=self.window_slice,
            choose_form=choose_form,
            native_support=(
                probed.native_support if probed is not None else native_support_from(choose_form)
            ),
            choose_speed=self.choose_speed or timed,
            probed=probed,
            timed=timed,
            provider=self.provider,
            report=RewriteReport(
                tool_version=__version__, form_request=self.form, layers=self.layers
            ),
        )

    def _form_probe(self):  # -> rewriter.forms.ProbedFormChooser | None
        if self.choose_form is not None:
            return None
        # The probe runs onnxruntime: imported only when no chooser is given.
        from rewriter.forms import ProbedFormChooser

        return ProbedFormChooser(self.provider, self.form, self.force)

    def _speed_probe(self):  # -> rewriter.speed.SpeedProbe | None
        if self.speed != "auto" or self.choose_speed is not None:
            return None
        from rewriter.speed import SpeedProbe

        return SpeedProbe(self.provider, progress=self.progress)


def fuse_attention_to_gqa(model: ir.Model, **options) -> int:
    """Rewrite `model` in place; the number of layers rewritten (options: the pass's)."""
    return AttentionToGQAPass(**options)(model).report.rewritten


def _passes_checker(model: ir.Model) -> str | None:
    """The ONNX checker's complaint about `model`, or None. Large tensors are left out of
    the check (onnx-ir's CheckerPass), and the model is left exactly as it was."""
    with keeping_initializer_order(model):
        try:
            common_passes.CheckerPass()(model)
        except Exception as error:  # onnx.checker.ValidationError and what serialising raises
            return collapsed(error)
    return None
