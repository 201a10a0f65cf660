"""What the rules did to one model, kept apart from the rules themselves.

A rule set is built per model run (``RewriteRule``s made with ``.rule()`` keep no handle on
their rule instances), so the rules write into a ``RewriteLog`` they are given and the
caller reads it afterwards: which Attention became which GQA node, why each other candidate
was left alone, which nodes the rewrite replaced and which value names move to GQA outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx_ir as ir

__all__ = [
    "LayerRewrite",
    "LayerSkip",
    "PaddingRequirement",
    "RewriteLog",
    "RuleLog",
    "SkipOwner",
    "node_label",
]


def node_label(node: ir.Node) -> str:
    return node.name or f"{node.op_type}({node.outputs[0].name})"


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
    # Whose padding convention a decode step follows: "export" (a right-padded row's new key
    # after its padding, as the export's Attention with past writes it: the own-cache fold,
    # and a KV-shared fold over the export's bias) or "gqa" (right after the row's valid keys).
    decode_convention: str = "gqa"


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


@dataclasses.dataclass(frozen=True)
class SkipOwner:
    """Whose reason a candidate Attention left alone gets.

    With `owns`, the layers of that kind are this rule's: its reason, or `unexamined` where
    its pattern never reached the layer. Without, the rule's reason wins wherever it examined
    the layer (a pattern that matched more of the layer says more).
    """

    log: RuleLog
    owns: Callable[[ir.Node], bool] | None = None
    unexamined: str = ""

    def reason(self, node: ir.Node) -> str | None:
        label = node_label(node)
        if self.owns is None:
            skip = self.log.skips.get(label)
            return skip.reason if skip is not None else None
        if not self.owns(node):
            return None
        skip = self.log.skips.get(label)
        return skip.reason if skip is not None else self.unexamined


@dataclasses.dataclass(frozen=True)
class PaddingRequirement:
    """A padding contract a rule's rewrites hold the model to, beyond the one the rule
    set's GQA layers imply (rewriter.report.PaddingContract), with the warning that says why."""

    contract: str
    warning: str
    # Batched calls of several tokens after a past still run as in the original.
    chunks_kept: bool = False


class RewriteLog:
    """Per-rule logs, in the order the rules were registered."""

    def __init__(self) -> None:
        self._rules: dict[str, RuleLog] = {}
        # Who explains a skipped candidate, first match first (rules.rule_set sets them).
        self.skip_owners: list[SkipOwner] = []
        # Set by a rule whose rewrites need a stricter padding contract (the HF rules).
        self.padding_contract: PaddingRequirement | None = None

    def rule(self, name: str) -> RuleLog:
        return self._rules.setdefault(name, RuleLog())

    def rules(self) -> list[RuleLog]:
        return list(self._rules.values())

    def skip_reason(self, node: ir.Node) -> str:
        """Why the candidate `node` was left alone, from the rule whose layer it is."""
        for owner in self.skip_owners:
            reason = owner.reason(node)
            if reason is not None:
                return reason
        raise AssertionError(f"no rule owns {node_label(node)}: the last owner owns all")

    def skip_reasons(self) -> list[str]:
        """Every reason any rule gave for a layer it left, in rule order."""
        return [skip.reason for log in self._rules.values() for skip in log.skips.values()]

    @property
    def rewrites(self) -> list[LayerRewrite]:
        return [record for log in self._rules.values() for record in log.rewrites]

    @property
    def replaced_nodes(self) -> list[ir.Node]:
        return [node for log in self._rules.values() for node in log.replaced_nodes]

    @property
    def renames(self) -> list[tuple[ir.Value, str]]:
        return [rename for log in self._rules.values() for rename in log.renames]
