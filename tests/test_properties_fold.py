"""Property: one KV-shared layer rewritten to ``If(S == 1: fold, else: gqa)`` (the CPU
policy for float32 KV-shared layers, rewriter.speed.FOLD_ON_CPU) equals a float64 NumPy
attention, in decode (the fold) and in prefill (GQA), for N/Nkv in {1, 2, 4, 8}, any D GQA
runs, windows around T, right-padded batches, P1 and P2 exports, fp32 and fp16.
"""

from __future__ import annotations

import hypothesis.strategies as st
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, note
from single_layer import assert_close, feeds, reference, shared_layer_model
from strategies import SingleLayerCase, gqa_head_sizes

import rewriter
from rewriter.rules import SpeedChoice, always_past
from rewriter.rules._speed_choice import SPEED_FORM_KEY

pytestmark = pytest.mark.property

FOLD = SpeedChoice("fold", "gqa", "property")


@st.composite
def fold_cases(draw: st.DrawFn) -> SingleLayerCase:
    batch = draw(st.integers(1, 3))
    total = draw(st.integers(1, 80))
    query_length = draw(st.sampled_from([1, 1, total]))  # mostly decode: the fold's phase
    low = 1 if query_length == total else query_length
    kv_num_heads = draw(st.integers(1, 2))
    window = draw(
        st.one_of(
            st.none(),
            st.sampled_from(sorted({1, total, total + 1, max(1, total - 1)})),
            st.integers(1, 96),
        )
    )
    return SingleLayerCase(
        batch=batch,
        query_length=query_length,
        total_length=total,
        valid_lengths=tuple(draw(st.integers(low, total)) for _ in range(batch)),
        num_heads=kv_num_heads * draw(st.sampled_from([1, 2, 4, 8])),
        kv_num_heads=kv_num_heads,
        head_size=draw(gqa_head_sizes(512)),
        window=window,
        mask_style=draw(st.sampled_from(["p2", "p1"])),
        scale=draw(st.one_of(st.just(1.0), st.none(), st.floats(0.01, 1.0))),
        softcap=draw(st.one_of(st.just(0.0), st.floats(1.0, 50.0))),
        dtype=draw(st.sampled_from(["float32", "float16"])),
        seed=draw(st.integers(0, 2**16)),
    )


@given(case=fold_cases())
def test_the_folded_layer_equals_the_float64_reference(case: SingleLayerCase) -> None:
    model, report = rewriter.rewrite(
        shared_layer_model(case), choose_form=always_past, choose_speed=lambda _: FOLD
    )
    note(report.summary())
    (done,) = report.rewrites
    assert done.speed_form == FOLD.label
    (phase_if,) = [n for n in model.graph if n.op_type == "If"]
    folded = [
        n.op_type
        for n in phase_if.attributes["then_branch"].as_graph()
        if n.metadata_props.get(SPEED_FORM_KEY) == "fold"
    ]
    # float32: FusedMatMul, [softcap,] Add (the mask), Softmax, MatMul (all intra-op
    # threads); fp16: one Attention.
    if case.dtype == "float32":
        assert folded[0] == "FusedMatMul" and folded[-2:] == ["Softmax", "MatMul"]
    else:
        assert folded == ["Attention"]

    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    inputs = feeds(case)
    rows = slice(0, case.batch)
    (actual,) = session.run(None, inputs)
    assert_close(case, actual, reference(case, inputs, rows), rows)
