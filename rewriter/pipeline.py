"""``rewrite(model) -> (model, report)``: the pass for an ``onnx.ModelProto`` or ``onnx_ir.Model``.

    model, report = rewriter.rewrite(model)

An ``onnx_ir.Model`` is rewritten in place and returned (like an onnx-ir pass); an
``onnx.ModelProto`` is left untouched and a new ``ModelProto`` is returned. The options are
``AttentionToGQAPass``'s.
"""

from __future__ import annotations

from typing import TypeVar

import onnx
import onnx_ir as ir

from rewriter.passes import AttentionToGQAPass
from rewriter.report import RewriteReport

__all__ = ["rewrite"]

ModelT = TypeVar("ModelT", ir.Model, onnx.ModelProto)


def rewrite(model: ModelT, **options) -> tuple[ModelT, RewriteReport]:
    """Rewrite the Attention layers of `model` into GroupQueryAttention (see
    ``rewriter.passes.AttentionToGQAPass`` for the options)."""
    rewrite_pass = AttentionToGQAPass(**options)
    if isinstance(model, onnx.ModelProto):
        result = rewrite_pass(ir.from_proto(model))
        return ir.to_proto(result.model), result.report
    if not isinstance(model, ir.Model):
        raise TypeError(f"expected onnx_ir.Model or onnx.ModelProto, got {type(model).__name__}")
    result = rewrite_pass(model)
    return result.model, result.report
