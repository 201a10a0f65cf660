"""The rewrite as an onnx-ir pass, for exporters that run a ``PassManager``::

    import onnx_ir as ir
    from rewriter.passes import AttentionToGQAPass

    result = AttentionToGQAPass(layers="all")(model)   # model: onnx_ir.Model, changed in place
    print(result.report.summary())

``fuse_attention_to_gqa(model) -> count`` is the one-line form (onnxscript's ``fuse_*``).
onnxruntime is needed only for the form probe and the speed probe: pass ``choose_form`` (for
example ``rewriter.rules.always_past``) to run the pass without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from rewriter import __version__
from rewriter._cleanup import remove_dead_producers
from rewriter._error_text import collapsed
from rewriter._input_checks import check_rewritable
from rewriter._report_builder import all_nodes, attention_nodes, describe, is_gqa
from rewriter.metadata import record_metadata
from rewriter.report import RewriteReport
from rewriter.rules import FormChooser, SpeedChooser, gqa_rules
from rewriter.rules._shape_evidence import ShapeFacts, keeping_initializer_order
from rewriter.rules.rule_set import LAYER_CHOICES

__all__ = ["SPEED_CHOICES", "AttentionToGQAPass", "RewriteResult", "fuse_attention_to_gqa"]

SPEED_CHOICES = ("auto", "off")

# GroupQueryAttention is an operator of com.microsoft version 1, the only version ONNX
# Runtime defines for its contrib domain.
_MS_DOMAIN, _MS_VERSION = "com.microsoft", 1


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
        onnxruntime is imported then.
    choose_speed: replaces the speed probe: LayerKind -> rules.SpeedChoice (tests, or
        exporters that measured their runtime).
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
        version = model.opset_imports.get(_MS_DOMAIN, _MS_VERSION)
        if version != _MS_VERSION:
            raise ir.passes.PreconditionError(
                f"the model imports {_MS_DOMAIN} opset {version}; GroupQueryAttention is "
                f"defined in version {_MS_VERSION}"
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
        report = RewriteReport(tool_version=__version__, form_request=self.form, layers=self.layers)
        candidates = attention_nodes(model)
        had_gqa = any(is_gqa(node) for node in all_nodes(model))
        probed = self._form_probe()
        # A forced form is never second-guessed.
        timed = self._speed_probe() if self.form == "auto" else None
        choose_speed = self.choose_speed or timed
        rules = gqa_rules(
            self.choose_form or probed,
            # Inferred once, before any rewrite changes the graph the inference would see.
            facts=ShapeFacts.infer(model),
            layers=self.layers,
            exact_padding=self.exact_padding,
            window_slice=self.window_slice,
            choose_speed=choose_speed,
            native_support=probed.native_support if probed is not None else None,
        )
        rules.rule_set.apply_to_model(model)
        if any(is_gqa(node) for node in all_nodes(model)):
            # A GQA node inside an If branch (a speed choice) is not seen by the rewriter's
            # own opset bookkeeping.
            model.opset_imports.setdefault(_MS_DOMAIN, _MS_VERSION)
        report.nodes_removed = remove_dead_producers(rules.log.replaced_nodes)
        # Readers of a rewritten layer keep seeing the same value names as in the input.
        for gqa_output, name in rules.log.renames:
            gqa_output.name = name
        common_passes.TopologicalSortPass()(model)

        report.rewrites = rules.log.rewrites
        describe(
            report,
            model,
            candidates,
            had_gqa=had_gqa,
            exact_padding=self.exact_padding,
            shared=rules.shared,
            unmasked=rules.unmasked,
            own_cache=rules.own_cache,
            hf=rules.hf,
        )
        if timed is not None:
            report.speed = {"provider": self.provider, "layers": timed.tables()}
        if probed is not None:
            report.probe = {"provider": self.provider, "tables": probed.probe_tables()}
            report.forced = probed.forced_layers > 0
            if report.forced:
                report.warnings.append(
                    f"--force: {probed.forced_layers} layer(s) use form {self.form}, which the "
                    "probe rejected on this runtime"
                )
        probed_on = f"{probed.runtime}, provider {self.provider}" if probed is not None else None
        record_metadata(model, report, probed_on)
        modified = bool(report.rewrites) or dict(model.metadata_props) != metadata_before
        return RewriteResult(model, modified, report=report)

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
