"""A synthetic full-size Gemma 4 E2B export for the verifier's memory target (issue 12).

The bench's E2B model (``bench/models.py``, attention at real size) with the parts a real
export adds inflated to real size: vocabulary 262144 (embedding and lm head), MLP width 6144,
and per-layer embeddings [262144, 35 x 256] gathered by ``input_ids``. Every weight lives in
one *sparse* external-data file: the inflated weights are holes (they read back as zeros and
take no disk space), the rest keep the bench model's bytes. About 17.7 GB of fp32 weights,
1.1 GB on disk. Never committed; written where you say::

    python bench/full_size_e2b.py /tmp/e2b-full
    python -m rewriter /tmp/e2b-full/original.onnx /tmp/e2b-full/rewritten.onnx --report r.json

(the rewrite writes the candidate's weights in full: ~18 GB of disk.)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import onnx_ir as ir

from bench.models import CACHE_DIR, ensure_models

__all__ = ["write_full_size_e2b"]

VOCABULARY, MLP_WIDTH, LAYERS, PER_LAYER_WIDTH = 262144, 6144, 35, 256
_ALIGN = 4096


def _real_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if name == "model.embed_tokens.weight":
        return (VOCABULARY, shape[1])
    if name == "lm_head.weight":
        return (shape[0], VOCABULARY)
    if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
        return (shape[0], MLP_WIDTH)
    if name.endswith("mlp.down_proj.weight"):
        return (MLP_WIDTH, shape[1])
    return shape


def write_full_size_e2b(directory: Path, cache_dir: Path = CACHE_DIR) -> Path:
    source = ensure_models("e2b", [], cache_dir).original
    model = ir.load(source)
    directory.mkdir(parents=True, exist_ok=True)
    data_name = "original.onnx.data"
    offset = 0
    with open(directory / data_name, "wb") as data:

        def place(nbytes: int) -> int:
            nonlocal offset
            start = offset
            offset = (offset + nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
            return start

        def external(name: str, dtype: ir.DataType, shape: tuple[int, ...], start: int, n: int):
            return ir.ExternalTensor(
                data_name, start, n, dtype, shape=ir.Shape(shape), name=name, base_dir=directory
            )

        for name, value in list(model.graph.initializers.items()):
            tensor = value.const_value
            assert tensor is not None
            shape = _real_shape(name, tuple(tensor.shape))
            inflated = shape != tuple(tensor.shape)
            nbytes = int(np.prod(shape) * tensor.dtype.itemsize) if inflated else tensor.nbytes
            start = place(nbytes)
            if not inflated:
                data.seek(start)
                data.write(tensor.tobytes())
            value.const_value = external(name, tensor.dtype, shape, start, nbytes)
            value.shape = ir.Shape(shape)
        per_layer_shape = (VOCABULARY, LAYERS * PER_LAYER_WIDTH)
        nbytes = int(np.prod(per_layer_shape)) * 4
        name = "model.embed_tokens_per_layer.weight"
        per_layer = ir.Value(
            name=name,
            shape=ir.Shape(per_layer_shape),
            type=ir.TensorType(ir.DataType.FLOAT),
            const_value=external(name, ir.DataType.FLOAT, per_layer_shape, place(nbytes), nbytes),
        )
        model.graph.register_initializer(per_layer)
        data.truncate(offset)  # the holes up to the end
    _read_per_layer_embeddings(model, per_layer)
    path = directory / "original.onnx"
    ir.save(model, path)
    return path


def _read_per_layer_embeddings(model: ir.Model, per_layer: ir.Value) -> None:
    """Gather the per-layer embeddings by input_ids and add 0 x their mean to the logits, so
    that a session must read them (ORT drops unused initializers)."""
    graph = model.graph
    input_ids = next(v for v in graph.inputs if v.name == "input_ids")
    logits = next(v for v in graph.outputs if v.name == "logits")
    zero = ir.Value(
        name="per_layer_zero",
        shape=ir.Shape([]),
        type=ir.TensorType(ir.DataType.FLOAT),
        const_value=ir.tensor(np.array(0, np.float32), name="per_layer_zero"),
    )
    graph.register_initializer(zero)
    gather = ir.node("Gather", [per_layer, input_ids])
    mean = ir.node("ReduceMean", gather.outputs, attributes={"keepdims": 1})
    scaled = ir.node("Mul", [mean.outputs[0], zero])
    total = ir.node("Add", [logits, scaled.outputs[0]])
    graph.extend([gather, mean, scaled, total])
    for node in graph:  # recorded shapes of the cut model are wrong now: drop them
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = None
    new_logits = total.outputs[0]
    new_logits.dtype = ir.DataType.FLOAT
    new_logits.shape = ir.Shape([logits.shape[0], logits.shape[1], VOCABULARY])  # type: ignore[index]
    graph.outputs[list(graph.outputs).index(logits)] = new_logits
    logits.name, new_logits.name = "logits_before_per_layer", "logits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="bench model cache")
    args = parser.parse_args()
    path = write_full_size_e2b(args.directory, args.cache_dir)
    data = path.with_name("original.onnx.data")
    print(f"wrote {path}: {os.path.getsize(data) / 1e9:.2f} GB of weights (sparse)")


if __name__ == "__main__":
    main()
