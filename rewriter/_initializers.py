"""What a model's initializers weigh and whether any lives in external data.

The writer (inline protobuf or external data), the verifier's sessions (serialized in
memory or through a file) and its memory estimate all ask; the answers come from tensor
metadata (dtype and shape), so no weight is read.
"""

from __future__ import annotations

import onnx_ir as ir

from rewriter._paths import external_tensors

__all__ = ["has_external_data", "initializer_bytes"]


def initializer_bytes(model: ir.Model) -> int:
    """Bytes of every initializer of every graph (subgraphs included), inline or external."""
    return sum(
        value.const_value.nbytes
        for graph in model.graphs()
        for value in graph.initializers.values()
        if value.const_value is not None
    )


def has_external_data(model: ir.Model) -> bool:
    """Whether some initializer keeps its bytes in an external data file."""
    return next(external_tensors(model), None) is not None
