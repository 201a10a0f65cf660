"""Remove what a rewrite left without readers, and nothing else."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

__all__ = ["remove_dead_producers"]


def _is_dead(node: ir.Node) -> bool:
    return all(not out.uses() and not out.is_graph_output() for out in node.outputs)


def remove_dead_producers(replaced: Iterable[ir.Node]) -> int:
    """Delete the replaced nodes and, transitively, producers that only they read.

    onnx-ir's RemoveUnusedNodesPass would also delete nodes that were already dead in the
    input model; the rewrite promises that nothing outside the rewritten layers changes, so
    the sweep starts only from the nodes we replaced. Initializers that only fed removed
    nodes go too (a mask's window constant, a Reshape shape).
    """
    removed = 0
    stack = [node for node in replaced if node.graph is not None]
    while stack:
        node = stack.pop()
        graph = node.graph
        if graph is None or not _is_dead(node):
            continue
        inputs = [value for value in node.inputs if value is not None]
        graph.remove(node, safe=True)
        removed += 1
        for value in inputs:
            if value.uses() or value.is_graph_output():
                continue
            producer = value.producer()
            if producer is not None:
                stack.append(producer)
            elif value.is_initializer() and not value.is_graph_input():
                graph_of_value = value.graph
                if graph_of_value is not None and value.name in graph_of_value.initializers:
                    del graph_of_value.initializers[value.name]
    return removed
