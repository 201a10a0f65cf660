"""Reading constants and graph facts off `onnx_ir` values, for the rules' `check()` methods."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils

__all__ = ["constant_array", "is_graph_input", "scalar_float", "scalar_int"]

# A pattern may see a constant through these value-preserving wrappers (fp16 exports
# write float32 literals and CastLike them to the model dtype).
_TRANSPARENT_CASTS = frozenset({"CastLike", "Cast", "Identity"})


def is_graph_input(value: ir.Value) -> bool:
    return value.graph is not None and value in value.graph.inputs


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant data, or None when it is not a true constant.

    An initializer that is also a graph input is an overridable default, not a constant.
    """
    if value is None or is_graph_input(value):
        return None
    return _ir_utils.get_numpy_value(value)


def scalar_int(value: ir.Value | None) -> int | None:
    array = constant_array(value)
    if array is None or array.size != 1 or array.dtype.kind not in "iu":
        return None
    return int(array.reshape(()).item())


def scalar_float(value: ir.Value | None) -> float | None:
    """A one-element float constant, looking through Cast/CastLike/Identity."""
    while value is not None:
        array = constant_array(value)
        if array is not None:
            if array.size != 1:
                return None
            return float(array.reshape(()).astype(np.float64).item())
        producer = value.producer()
        if producer is None or producer.domain not in ("", "ai.onnx"):
            return None
        if producer.op_type not in _TRANSPARENT_CASTS:
            return None
        value = producer.inputs[0]
    return None
