"""One copy of the weights for both whole-model sessions.

ONNX Runtime copies every initializer into each session, and on CPU it also prepacks MatMul
weights (a second copy): two sessions of a model hold about 2.4x its weights (5.1 GB for the
2.1 GB benchmark model, onnxruntime 1.31.1). Here each large weight is handed to both sessions
as one ``OrtValue`` over the same NumPy array (``SessionOptions.add_initializer``, used by ORT
without copying on CPU) with prepacking disabled. An external weight's array is a read-only
memory map of the original's data file: file-backed pages, counted once and reclaimable.

Measured (onnxruntime 1.32.0 CPU, 8 x 64 MB MatMul weights in external data, two sessions):
default 1058 MB anonymous memory; shared with prepacking disabled 0 MB anonymous and 512 MB
of the data file mapped (PSS; each mapping counts in RSS).

A candidate weight is shared only when its bytes equal the original's (same name, dtype,
shape, data): a rewrite that changed a weight is still run with its own.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from rewriter.verification._graph_diff import same_tensor

__all__ = ["MIN_SHARED_BYTES", "SharedWeights"]

# Small initializers (shapes, norms, constants) are not worth an OrtValue each.
MIN_SHARED_BYTES = 1 << 20


@dataclasses.dataclass
class SharedWeights:
    """Weights of the original, by name, as OrtValues both sessions read."""

    values: dict[str, ort.OrtValue]
    arrays: list[np.ndarray]  # keep the memory maps alive as long as the sessions
    candidate_names: frozenset[str]  # names whose candidate bytes equal the original's
    shared_bytes: int

    @classmethod
    def from_models(cls, original: ir.Model, candidate: ir.Model) -> SharedWeights:
        values: dict[str, ort.OrtValue] = {}
        arrays: list[np.ndarray] = []
        same: set[str] = set()
        total = 0
        for name, value in original.graph.initializers.items():
            tensor = value.const_value
            if tensor is None or tensor.nbytes < MIN_SHARED_BYTES or value.is_graph_input():
                continue
            try:
                array = tensor.numpy()
                ort_value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            except Exception:  # a dtype NumPy/ORT cannot wrap (e.g. int4): not shared
                continue
            arrays.append(array)
            values[name] = ort_value
            total += tensor.nbytes
            other = candidate.graph.initializers.get(name)
            theirs = other.const_value if other is not None else None
            if theirs is not None and same_tensor(tensor, theirs):
                same.add(name)
        return cls(values, arrays, frozenset(same), total)

    def apply(self, options: ort.SessionOptions, model: ir.Model, role: str) -> int:
        """Hand the shared weights to a session of ``model``; returns how many."""
        names = [
            name
            for name in self.values
            if name in model.graph.initializers
            and (role == "original" or name in self.candidate_names)
        ]
        for name in names:
            options.add_initializer(name, self.values[name])
        if names:
            # Prepacking copies each MatMul weight into the session: no sharing with it.
            options.add_session_config_entry("session.disable_prepacking", "1")
        return len(names)
