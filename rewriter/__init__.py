"""Rewrite KV-shared ONNX ``Attention`` layers into ONNX Runtime ``GroupQueryAttention``.

Public API::

    model, report = rewriter.rewrite(model)          # onnx_ir.Model or onnx.ModelProto
    result = rewriter.verify(original, candidate)    # proof on ONNX Runtime
"""

from __future__ import annotations

import os as _os

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

from rewriter.pipeline import rewrite  # noqa: E402  (after __path__ is complete)
from rewriter.verification import verify  # noqa: E402

__all__ = ["__version__", "rewrite", "verify"]
