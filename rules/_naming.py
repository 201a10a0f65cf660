"""Names for the nodes a rewrite builds: after the layer they replace.

onnxscript's builder leaves new nodes and values unnamed, and the serializer then calls them
node_GroupQueryAttention_27 and val_3: a runtime profile or error message would not say which
layer they belong to.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

__all__ = ["name_after"]


def name_after(nodes: Iterable[ir.Node], prefix: str) -> None:
    """Name each unnamed node `prefix`/op_index and its unnamed outputs `prefix`/index_position.

    `prefix` is a name unique in the model (the replaced node's or its output's), so are these.
    """
    for index, node in enumerate(nodes):
        if not node.name:
            node.name = f"{prefix}/{node.op_type}_{index}"
        for position, value in enumerate(node.outputs):
            if not value.name:
                value.name = f"{prefix}/{index}_{position}"
