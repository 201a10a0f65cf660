"""Matching a sub-pattern (mask, borrowed cache) at a value, keeping the reason it fails.

The main rule's check() asks "is this input a recognised mask?" the way onnxscript's own
GQA fusion does (PatternBase.match on the producer). Two things are added: every commuted
operand order is tried, and the sub-pattern's check() runs here rather than inside
Pattern.match, which drops the reason a check gives; the report needs that reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import pattern

__all__ = ["SubMatch", "SubPattern"]


@dataclasses.dataclass(frozen=True)
class SubMatch:
    bindings: dict[str, Any] | None  # None when nothing matched
    reason: str  # why not, when bindings is None
    depth: int = 0  # nodes matched before failing: how close the structure came


@dataclasses.dataclass(frozen=True)
class _SubContext:
    """What a sub-pattern's check() may read: the model, the graph and the matched root."""

    model: ir.Model
    graph_or_function: ir.Graph | ir.Function
    root: ir.Node


class SubPattern:
    def __init__(self, definition: pattern.PatternBase, *, commute: bool = False) -> None:
        self.definition = definition
        self.name = type(definition).__name__.lstrip("_")
        # The replacement is never used: these rules only match.
        rule = pattern.RewriteRule(definition.pattern, lambda op, **_: None, name=self.name)
        self._variants = list(rule.commute()) if commute else [rule]

    def match(self, context: Any, value: ir.Value) -> SubMatch:
        producer = value.producer()
        if producer is None:
            return SubMatch(None, f"{value.name} is not computed by a node", -1)
        closest: tuple[int, str] = (-1, "no match")
        for variant in self._variants:
            match = variant.match(
                context.model, context.graph_or_function, producer, check_nodes_are_removable=False
            )
            if match is None:
                continue
            if not match:
                # How far the structure matched tells which spelling the export meant.
                if len(match.nodes) > closest[0]:
                    closest = (len(match.nodes), _describe_failure(match))
                continue
            sub_context = _SubContext(context.model, context.graph_or_function, producer)
            checked = self.definition.check(sub_context, **match.bindings)
            if not checked:
                # A check failure is a precise near-miss: report it over structural misses.
                return SubMatch(None, checked.reason or "check failed", len(match.nodes))
            return SubMatch(dict(match.bindings), "")
        return SubMatch(None, closest[1], closest[0])


def _describe_failure(match: pattern.MatchResult) -> str:
    """The matcher's reason plus where it stopped: OrValue misses say nothing by themselves."""
    nodes = [n for n in match.failure_nodes_and_values if isinstance(n, ir.Node)]
    if not nodes:
        return match.reason
    node = nodes[-1]
    producers = [
        value.producer().op_type if value is not None and value.producer() else "input"
        for value in node.inputs
    ]
    return f"{match.reason} At {node.op_type} {node.name!r}, fed by {', '.join(producers)}"
