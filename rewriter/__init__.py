"""Rewrite KV-shared ONNX ``Attention`` layers into ONNX Runtime ``GroupQueryAttention``.

Public API::

    model, report = rewriter.rewrite(model)          # onnx_ir.Model or onnx.ModelProto
    result = rewriter.AttentionToGQAPass()(model)    # an onnx-ir pass; result.report
    count = rewriter.fuse_attention_to_gqa(model)    # onnxscript's fuse_* idiom
    result = rewriter.verify(original, candidate)    # proof on ONNX Runtime
    result = rewriter.verify_pair((prefill, decode), (prefill2, decode2))  # two-graph exports

The names are imported on first use, so ``import rewriter.rules`` (onnxscript and onnx-ir
only) works without onnxruntime, which only the probes and the verifier need.
"""

from __future__ import annotations

import importlib
import os as _os
from typing import Any

# In a source checkout `rules/` and `fixtures/` sit beside this directory and become
# `rewriter.rules` / `rewriter.fixtures` only once installed (package-dir mapping in
# pyproject.toml). `python -m rewriter` run from the checkout root imports this directory
# instead of the installed package, so let it find those subpackages the same way.
_checkout_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "rules")) and _os.path.isfile(
    _os.path.join(_checkout_root, "rules", "__init__.py")
):
    __path__.append(_checkout_root)

__version__ = "0.1.0"

_LAZY = {
    "rewrite": "rewriter.pipeline",
    "AttentionToGQAPass": "rewriter.passes",
    "RewriteResult": "rewriter.passes",
    "fuse_attention_to_gqa": "rewriter.passes",
    "verify": "rewriter.verification",
    "verify_pair": "rewriter.verification",
}

__all__ = [
    "AttentionToGQAPass",
    "RewriteResult",
    "__version__",
    "fuse_attention_to_gqa",
    "rewrite",
    "verify",
    "verify_pair",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rewriter' has no attribute {name!r}")
