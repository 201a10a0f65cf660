"""ONNX Runtime execution providers by the names the command line takes."""

from __future__ import annotations

__all__ = ["PROVIDERS"]

# Sessions get the whole list: CUDA sessions keep the CPU provider for the ops CUDA lacks.
# The first entry is the provider itself (the form probe runs on it alone).
PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
}
