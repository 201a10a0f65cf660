"""What the rules did to one model, kept apart from the rules themselves.

A rule set is built per model run (``RewriteRule``s made with ``.rule()`` keep no handle on
their rule instances), so the rules write into a ``RewriteLog`` they are given and the
caller reads it afterwards: which Attention became which GQA node, why each other candidate
was left alone, which nodes the rewrite replaced and which value names move to GQA outputs.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

__all__ = ["LayerRewrite", "LayerSkip", "RewriteLog", "RuleLog"]


@dataclasses.dataclass(frozen=True)
class LayerRewrite:
    node: str
    rule: str
    form: str
    local_window_size: int | None
    mask_style: str
    source: str  # the cache the layer reads: a borrowed present, or its own past input
    dtype: str
    head_size: int
    # The borrowed cache is cut to the keys the window reaches (GQAInputs.window_slice).
    window_slice: bool = False
    # What runs: "gqa", or what a speed choice put there ("attention-bnsh", or an If on
    # S == 1 between two forms; rules._speed_choice.SpeedChoice.label).
    speed_form: str = "gqa"
    # With a speed choice: what it rests on, or why the layer was not timed (a correctness fix).
    speed_reason: str = ""
    # How a batched call of several tokens after a past, which the graph's shapes allow and
    # GQA refuses by default, still runs (rules._batched_chunks); "" where the graph's shapes
    # rule that call out.
    batched_chunks: str = ""


@dataclasses.dataclass(frozen=True)
class LayerSkip:
    node: str
    reason: str


@dataclasses.dataclass
class RuleLog:
    """One rule's record: every Attention reaching its check() is rewritten or skipped."""

    rewrites: list[LayerRewrite] = dataclasses.field(default_factory=list)
    skips: dict[str, LayerSkip] = dataclasses.field(default_factory=dict)  # by node label
    # Where the dead-code sweep starts once the rule set has run.
    replaced_nodes: list[ir.Node] = dataclasses.field(default_factory=list)
    # (GQA output, the name it takes over once the replaced value is gone)
    renames: list[tuple[ir.Value, str]] = dataclasses.field(default_factory=list)


class RewriteLog:
    """Per-rule logs, in the order the rules were registered."""

    def __init__(self) -> None:
        self._rules: dict[str, RuleLog] = {}

    def rule(self, name: str) -> RuleLog:
        return self._rules.setdefault(name, RuleLog())

    def rules(self) -> list[RuleLog]:
        return list(self._rules.values())

    @property
    def rewrites(self) -> list[LayerRewrite]:
        return [record for log in self._rules.values() for record in log.rewrites]

    @property
    def replaced_nodes(self) -> list[ir.Node]:
        return [node for log in self._rules.values() for node in log.replaced_nodes]

    @property
    def renames(self) -> list[tuple[ir.Value, str]]:
        return [rename for log in self._rules.values() for rename in log.renames]
