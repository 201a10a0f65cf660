"""Decoder models with a huge, unused initializer in a sparse external-data file.

Shared by the >2 GB test and the interruption tests: the big weight makes writes slow and
large without costing disk space (a file hole reads back as zeros).
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from rewriter.fixtures.gemma4_like import build_decoder, tiny_config


def decoder_with_big_weight(directory: Path, name: str, nbytes: int) -> Path:
    """A tiny decoder plus one float32 initializer of `nbytes`, kept in a sparse data file.

    The big initializer is read by nothing (the rewrite must carry it over untouched).
    """

    model = ir.from_proto(build_decoder(tiny_config(mask_style="p2")))
    data_name = f"{name}.data"
    with open(directory / data_name, "wb") as data:
        data.truncate(nbytes)  # a hole: no disk space, reads back as zeros
    count = nbytes // 4
    tensor = ir.ExternalTensor(
        data_name,
        0,
        count * 4,
        ir.DataType.FLOAT,
        shape=ir.Shape([count]),
        name="unused.big_weight",
        base_dir=str(directory),
    )
    model.graph.register_initializer(
        ir.Value(
            name="unused.big_weight",
            shape=tensor.shape,
            type=ir.TensorType(ir.DataType.FLOAT),
            const_value=tensor,
        )
    )
    path = directory / name
    ir.save(model, path)  # existing external tensors keep their location
    return path
