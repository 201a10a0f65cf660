"""The table the rules read a layer's form and speed choice from, decided before matching.

A rule reads a layer off the graph (dtype, N, Nkv, D, window, own cache or borrowed) and
looks its kind up here; it never runs a probe or a timing. The pass fills the table first
(``rewriter._rewrite_steps``): the rule set surveys the model with an empty table, every
question it could not answer is decided once per kind (form probe, speed probe or a fixed
policy), and only then do the rules rewrite, reading plain dicts.

A rule used on its own (tests, exporters that know their runtime) may instead be given
choosers; ``LayerDecisions.asking`` then answers each new kind by calling them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx_ir as ir

from rewriter.rules._failure import MatchFailureError
from rewriter.rules._speed_choice import SpeedChoice

__all__ = [
    "NATIVE_FORM",
    "FormChooser",
    "FormDecision",
    "FormQuestion",
    "LayerDecisions",
    "LayerKind",
    "Question",
    "SpeedChooser",
    "always_past",
    "native_support_from",
]

# How a layer with its own cache feeds GQA: new K/V, past, presents. Not a choice among
# borrowed-cache forms; the native question only answers whether GQA runs this dtype/D.
NATIVE_FORM = "native"


@dataclasses.dataclass(frozen=True)
class FormDecision:
    form: str | None  # a GQA form name; None = leave the layer alone
    reason: str = ""
    # A form the probe rejected, written anyway (--force): the report counts its layers.
    forced: bool = False


# (dtype name, head size D, windowed) -> which GQA form to emit.
FormChooser = Callable[[str, int, bool], FormDecision]


def always_past(dtype: str, head_size: int, windowed: bool) -> FormDecision:
    """A chooser without a probe: the copy-free `past` form, as measured on ORT 1.31.1 CPU."""
    return FormDecision("past")


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What a layer's speed depends on (the layer, not the call)."""

    dtype: str
    num_heads: int
    kv_num_heads: int
    head_size: int
    local_window_size: int | None
    scale: float
    softcap: float
    # A layer with its own cache (past inputs, presents out); else a KV-shared layer.
    own_cache: bool = False
    # False for an export that is wrong in decode (is_causal=1 without past): it may get
    # only forms that read nothing of it (rules._speed_choice.EXPORT_FREE_FORMS).
    export_correct: bool = True

    def describe(self) -> str:
        window = f"W={self.local_window_size}" if self.local_window_size else "full"
        cache = "own-cache" if self.own_cache else "KV-shared"
        defect = "" if self.export_correct else " (export wrong in decode)"
        return (
            f"{cache} {self.dtype} N={self.num_heads} Nkv={self.kv_num_heads} "
            f"D={self.head_size} {window}{defect}"
        )


# A layer whose export is correct -> the form each phase runs (rules._speed_choice).
SpeedChooser = Callable[[LayerKind], SpeedChoice]


@dataclasses.dataclass(frozen=True)
class FormQuestion:
    """Which GQA form a layer of this dtype and head size gets; ``native``: whether GQA runs
    a layer with its own cache of this dtype and head size at all (its one form)."""

    dtype: str
    head_size: int
    windowed: bool
    native: bool = False


# A form question, or the kind of a layer whose speed choice is asked.
Question = FormQuestion | LayerKind


@dataclasses.dataclass
class LayerDecisions:
    """Form and speed choice per kind of layer, and what the rules asked that it lacks.

    speeds is None when no speed choice is made at all (``speed="off"``): the rules then
    never ask. While `surveying`, every rule check fails after its questions (nothing is
    rewritten); a question without an answer is noted in `unanswered` and fails the match.
    """

    forms: dict[FormQuestion, FormDecision] = dataclasses.field(default_factory=dict)
    speeds: dict[LayerKind, SpeedChoice] | None = None
    surveying: bool = False
    unanswered: list[Question] = dataclasses.field(default_factory=list)
    # Labels of the layers that read a forced form (FormDecision.forced).
    forced_nodes: set[str] = dataclasses.field(default_factory=set)
    # Answer new questions by asking these (a rule used on its own); None: note them.
    ask_form: FormChooser | None = None
    ask_native: FormChooser | None = None
    ask_speed: SpeedChooser | None = None

    @classmethod
    def asking(
        cls,
        choose_form: FormChooser,
        choose_speed: SpeedChooser | None = None,
        native_support: FormChooser | None = None,
    ) -> LayerDecisions:
        """A table that answers each new question by asking the choosers (pure functions:
        a rule used on its own; probe models). `native_support` defaults to: GQA runs a
        layer with its own cache wherever `choose_form` finds a form."""
        return cls(
            speeds={} if choose_speed is not None else None,
            ask_form=choose_form,
            ask_native=native_support or native_support_from(choose_form),
            ask_speed=choose_speed,
        )

    @property
    def speed_chosen(self) -> bool:
        """Whether layers get a speed choice (else every qualifying layer is GQA)."""
        return self.speeds is not None

    def form(self, question: FormQuestion, node: ir.Node, label: str) -> FormDecision:
        """The form for `node`'s kind (MatchFailureError while it is undecided)."""
        decision = self.forms.get(question)
        if decision is None:
            ask = self.ask_native if question.native else self.ask_form
            if ask is None:
                self._unanswered(question, node)
            assert ask is not None
            decision = ask(question.dtype, question.head_size, question.windowed)
            self.forms[question] = decision
        if decision.forced:
            self.forced_nodes.add(label)
        return decision

    def speed(self, kind: LayerKind, node: ir.Node) -> SpeedChoice:
        """The speed choice for a layer of `kind` (MatchFailureError while it is undecided)."""
        assert self.speeds is not None, "speed asked without a speed choice"
        choice = self.speeds.get(kind)
        if choice is None:
            if self.ask_speed is None:
                self._unanswered(kind, node)
            assert self.ask_speed is not None
            choice = self.speeds[kind] = self.ask_speed(kind)
        return choice

    def _unanswered(self, question: Question, node: ir.Node) -> None:
        if question not in self.unanswered:
            self.unanswered.append(question)
        raise MatchFailureError(f"no decision yet for this kind of layer: {question}", node)


def native_support_from(choose_form: FormChooser) -> FormChooser:
    """A form chooser also decides where GQA runs at all: no form, no native layer."""

    def supports(dtype: str, head_size: int, windowed: bool) -> FormDecision:
        decision = choose_form(dtype, head_size, windowed)
        return decision if decision.form is None else FormDecision(NATIVE_FORM)

    return supports
