"""Property 2: one rewritten KV-shared layer equals a float64 NumPy attention.

The model is the smallest one the rule rewrites: a query input, a borrowed BNSH cache
input made 3-D by Transpose+Reshape, the P1 or P2 mask chain of SPEC.md section 2 over
``attention_mask``, and one ``Attention``. Whatever the rewrite emits is run on ONNX Runtime
and compared with ``rewriter.probe._reference`` for random (B, S, T, N, Nkv, D, W, right
padding), so a failure points at the GroupQueryAttention the rule builds, not at a model.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, note
from single_layer import (
    CHUNK_NEEDS_BATCH_1,
    assert_close,
    feeds,
    reference,
    shared_layer_model,
)
from strategies import SingleLayerCase, single_layer_cases

import rewriter

pytestmark = pytest.mark.property


@given(case=single_layer_cases())
def test_one_rewritten_layer_equals_the_float64_reference(case: SingleLayerCase) -> None:
    model, report = rewriter.rewrite(shared_layer_model(case))
    note(report.summary())
    if case.head_size % 8:
        # ORT's GQA kernel rejects this head size: the rule must refuse, and say why.
        assert report.rewritten == 0
        (skip,) = report.skipped
        assert "head_size must be a multiple of 8" in skip.reason
        return
    (done,) = report.rewrites
    assert report.skipped == []
    assert done.local_window_size == case.window
    # Sliding layers read only the keys their window reaches (GQAInputs.window_slice).
    assert done.window_slice == (case.window is not None)
    (gqa,) = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert not any(n.op_type == "Attention" for n in model.graph)
    attrs = gqa.attributes
    assert attrs["num_heads"].as_int() == case.num_heads
    assert attrs["kv_num_heads"].as_int() == case.kv_num_heads
    assert attrs["do_rotary"].as_int() == 0
    # GQA's default scale is 1/sqrt(D) too, but the rewrite states it (SPEC.md 4).
    scale = case.scale if case.scale is not None else 1.0 / np.sqrt(case.head_size)
    assert attrs["scale"].as_float() == pytest.approx(scale, rel=1e-6)
    window = attrs["local_window_size"].as_int() if "local_window_size" in attrs else None
    assert window == case.window

    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    inputs = feeds(case)
    if case.batch > 1 and 1 < case.query_length < case.total_length:
        # GQA runs a multi-token call after a past at B = 1 only (ORT 1.31.1, SPEC.md 4):
        # the whole batch is refused, each row alone is computed.
        with pytest.raises(Exception, match=CHUNK_NEEDS_BATCH_1):
            session.run(None, inputs)
        for row in range(case.batch):
            rows = slice(row, row + 1)
            (actual,) = session.run(None, {name: value[rows] for name, value in inputs.items()})
            assert_close(case, actual, reference(case, inputs, rows), rows)
        return
    rows = slice(0, case.batch)
    (actual,) = session.run(None, inputs)
    assert_close(case, actual, reference(case, inputs, rows), rows)
