"""``rewrite(model) -> (model, report)``: the pass for an ``onnx.ModelProto`` or ``onnx_ir.Model``.

    model, report = rewriter.rewrite(model)

An ``onnx_ir.Model`` is rewritten in place and returned (like an onnx-ir pass); an
``onnx.ModelProto`` is left untouched and a new ``ModelProto`` is returned. The options are
``AttentionToGQAPass``'s.

A ``ModelProto`` loaded without its weights (``onnx.load(p, load_external_data=False)``)
does not know where they are: pass ``base_dir`` (the folder of ``p``), or a ValueError says
so before any work. The returned proto keeps the locations as they were, relative to that
folder.
"""

from __future__ import annotations

import os
from typing import TypeVar

import onnx
import onnx_ir as ir

from rewriter._paths import check_external_data, external_tensors
from rewriter.passes import AttentionToGQAPass
from rewriter.report import RewriteReport

__all__ = ["rewrite"]

ModelT = TypeVar("ModelT", ir.Model, onnx.ModelProto)


def rewrite(
    model: ModelT, *, base_dir: str | os.PathLike[str] | None = None, **options
) -> tuple[ModelT, RewriteReport]:
    """Rewrite the Attention layers of `model` into GroupQueryAttention (see
    ``rewriter.passes.AttentionToGQAPass`` for the options). `base_dir`: the folder a
    ``ModelProto``'s external data locations are relative to."""
    rewrite_pass = AttentionToGQAPass(**options)
    if isinstance(model, onnx.ModelProto):
        return _rewrite_proto(model, base_dir, rewrite_pass)
    if base_dir is not None:
        raise TypeError("base_dir is for an onnx.ModelProto; an onnx_ir.Model carries its own")
    if not isinstance(model, ir.Model):
        raise TypeError(f"expected onnx_ir.Model or onnx.ModelProto, got {type(model).__name__}")
    result = rewrite_pass(model)
    return result.model, result.report


def _rewrite_proto(
    proto: onnx.ModelProto,
    base_dir: str | os.PathLike[str] | None,
    rewrite_pass: AttentionToGQAPass,
) -> tuple[onnx.ModelProto, RewriteReport]:
    model = ir.from_proto(proto)
    tensors = list(external_tensors(model))
    if tensors and base_dir is None:
        raise ValueError(
            f"the model keeps {len(tensors)} tensor(s) in external data (first: "
            f"{tensors[0].name} in {tensors[0].location!r}) that were not loaded: pass "
            "base_dir=<the folder of the model file>, or load the model with its weights"
        )
    if tensors:
        ir.external_data.set_base_dir(model.graph, os.path.abspath(base_dir))
        check_external_data(model)  # ExternalDataError, a ValueError, naming the tensor
    result = rewrite_pass(model)
    return ir.to_proto(result.model), result.report
