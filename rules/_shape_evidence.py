"""Static shapes and dtypes of values, gathered from every place a real export states them.

Why: exporters annotate shapes unevenly. In the mobius exports of 2026 the source layer's
GroupQueryAttention present outputs carry a symbolic head dim (``[batch, 1, _d22, _d21]``)
and the KV-shared layer's query is ``[batch, sequence_len, _d31]``, while the head size is
static elsewhere: on the source layer's ``past_key`` graph input, on its 3-D key input, and
after ONNX shape inference on the query (its Reshape/RotaryEmbedding chain). A rule that
reads only the value_info next to the Attention node finds no head size at all.

``ShapeFacts.infer(model)`` runs onnx-ir's ``ShapeInferencePass`` (ONNX shape inference, no
second inferencer) and keeps what it found in a side table: the model's own annotations are
restored afterwards, so nothing inferred is written into the output. ONNX shape inference
knows no com.microsoft op; what flows through GroupQueryAttention is read off the node's
own inputs instead (``cache_head_sizes``).

Dimension letters: B batch, S query length, T total length, N query heads, Nkv KV heads,
D head size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from rewriter.rules._cache_writers import cache_write, cache_writer, writer_kv_heads

__all__ = ["HeadSizeEvidence", "ShapeFacts", "keeping_initializer_order"]


@dataclasses.dataclass(frozen=True)
class HeadSizeEvidence:
    """One statement of D, and where the model makes it (for a skip reason)."""

    head_size: int
    source: str


def _values_of(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


class ShapeFacts:
    """What the model states about each value's shape and dtype, annotated or inferred."""

    def __init__(
        self, inferred: Mapping[ir.Value, tuple[ir.Shape | None, ir.DataType | None]] | None = None
    ) -> None:
        # Only what inference added or changed; a value's own annotation is read off it.
        self._inferred = dict(inferred or {})

    @classmethod
    def infer(cls, model: ir.Model) -> ShapeFacts:
        """Run ONNX shape inference on `model` and keep its findings aside; `model` is left
        with exactly the annotations it had."""
        values = [value for graph in model.graphs() for value in _values_of(graph)]
        annotated = {value: (value.shape, value.dtype) for value in values}
        # The pass sets dtypes on the values' existing type objects: keep those to restore.
        types = {value: value.type for value in values}
        # Partial results are the point: one node ONNX cannot infer must not void the rest.
        inference = common_passes.ShapeInferencePass(
            check_type=False, strict_mode=False, data_prop=True
        )
        logger = logging.getLogger("onnx_ir.passes.common.shape_inference")
        previous_level = logger.level
        logger.setLevel(logging.ERROR)  # "value not found in inferred graph" per unnamed value
        try:
            # The pass re-registers initializers, which would reorder them in the output.
            with keeping_initializer_order(model):
                inference(model)
            inferred = {
                value: (value.shape, value.dtype)
                for value in values
                if (value.shape, value.dtype) != annotated[value]
            }
        finally:
            logger.setLevel(previous_level)
            for value, (shape, dtype) in annotated.items():
                value.shape, value.type = shape, types[value]
                if value.type is not None and value.type.dtype != dtype:
                    value.type.dtype = dtype
        return cls(inferred)

    def shapes(self, value: ir.Value) -> list[ir.Shape]:
        """Every shape stated for `value`: its annotation, then what inference found."""
        inferred = self._inferred.get(value, (None, None))[0]
        return [shape for shape in (value.shape, inferred) if shape is not None]

    def rank(self, value: ir.Value) -> int | None:
        shapes = self.shapes(value)
        return shapes[0].rank() if shapes else None

    def dtype(self, value: ir.Value) -> ir.DataType | None:
        return value.dtype or self._inferred.get(value, (None, None))[1]

    def static_dims(self, value: ir.Value, axis: int) -> set[int]:
        return {
            shape[axis]
            for shape in self.shapes(value)
            if shape.rank() > axis and isinstance(shape[axis], int)
        }

    def cache_head_sizes(self, cache_BNSH: ir.Value, kind: str) -> list[HeadSizeEvidence]:
        """D of a BNSH cache: its own last dim, and when a layer writes it as a present
        output, that layer's past input's last dim and new key/value over its KV heads."""
        evidence = [
            HeadSizeEvidence(size, f"{kind} {cache_BNSH.name}")
            for size in self.static_dims(cache_BNSH, 3)
        ]
        write = cache_write(cache_BNSH)
        if write is None:
            return evidence
        label = f"{kind} writer {write.writer.name or write.writer.op_type}"
        past, new = write.past_BNPD, write.new
        if past is not None:
            evidence += [
                HeadSizeEvidence(size, f"{label} past input {past.name}")
                for size in self.static_dims(past, 3)
            ]
        kv_heads = writer_kv_heads(write.writer)
        if new is not None and kv_heads:
            for shape in self.shapes(new):
                if shape.rank() == 3 and isinstance(shape[2], int):
                    evidence.append(
                        HeadSizeEvidence(
                            shape[2] // kv_heads,
                            f"{label} input {new.name} ({shape[2]}/{kv_heads})",
                        )
                    )
                elif shape.rank() == 4 and isinstance(shape[3], int):
                    evidence.append(HeadSizeEvidence(shape[3], f"{label} input {new.name}"))
        return evidence

    def writer_kv_heads(self, cache_BNSH: ir.Value) -> int | None:
        """kv_num_heads stated by the layer that writes `cache_BNSH`, if one does."""
        writer = cache_writer(cache_BNSH)
        return writer_kv_heads(writer) if writer is not None else None


@contextlib.contextmanager
def keeping_initializer_order(model: ir.Model) -> Iterator[None]:
    """onnx-ir's passes that call the ONNX C API (shape inference, checker) take large
    initializers out and re-register them, which moves them to the end of the list: put
    every graph's initializers back in their order, so the output's bytes do not change."""
    initializers = {graph: list(graph.initializers.values()) for graph in model.graphs()}
    try:
        yield
    finally:
        for graph, order in initializers.items():
            if list(graph.initializers.values()) != order:
                graph.initializers.clear()
                for initializer in order:
                    graph.initializers.add(initializer)
