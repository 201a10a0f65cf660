"""The one way a rule's helper says "not this layer": raise ``MatchFailureError``.

onnxscript's own fusions (``ort_fusions/sdpa.py``) raise it from helpers and the rewriter
turns it into a failed match that keeps the reason and the value at fault; our rules catch
it once, in ``AttentionToGQARule.check``, to record the reason in the report as well.
"""

from __future__ import annotations

# Not re-exported by onnxscript.rewriter; ort_fusions import it from the same module.
from onnxscript.rewriter._basics import MatchFailureError

__all__ = ["MatchFailureError"]
