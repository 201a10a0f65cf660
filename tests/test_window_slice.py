"""Sliding KV-shared layers read only the keys their window reaches (GQAInputs.window_slice).

Why it exists: ONNX Runtime's CPU GroupQueryAttention reads every key of its past even with
local_window_size, so the rewrite cuts the borrowed cache to
``start = max(0, min(min_b L_b - S - W + 1, T - S - 1))`` and shifts seqlens_k and
total_sequence_length by ``start``. These cases sit on the edges of that formula: lengths
around W, chunks after a past, right-padded batch 2, W = 1 (where the cap keeps GQA from
taking the call for a first prompt), prefill, fp16. Each is compared with the float64
reference; keys before ``start`` are poisoned with NaN, so a rewrite that still read them
would give a non-finite output.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from single_layer import assert_close, feeds, reference, shared_layer_model
from strategies import SingleLayerCase

import rewriter

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "p1_tiny.onnx"
W = 8
_BASE = SingleLayerCase(
    batch=1,
    query_length=1,
    total_length=W,
    valid_lengths=(W,),
    num_heads=4,
    kv_num_heads=2,
    head_size=16,
    window=W,
    mask_style="p2",
    scale=1.0,
    softcap=0.0,
    dtype="float32",
    seed=0,
)


def _case(**changes: object) -> SingleLayerCase:
    case = dataclasses.replace(_BASE, **changes)
    if "valid_lengths" not in changes:
        case = dataclasses.replace(case, valid_lengths=(case.total_length,) * case.batch)
    return case


CASES = {
    "decode T=W-1": _case(total_length=W - 1),
    "decode T=W": _case(total_length=W),
    "decode T=W+1": _case(total_length=W + 1),
    "decode T=2W+1": _case(total_length=2 * W + 1),
    "decode T=40": _case(total_length=40),
    "chunk of 3 at T=W+1": _case(query_length=3, total_length=W + 1),
    "chunk of 3 at T=2W+1": _case(query_length=3, total_length=2 * W + 1),
    "padded batch 2 decode": _case(batch=2, total_length=2 * W + 1, valid_lengths=(17, 6)),
    "padded batch 2 decode, both long": _case(batch=2, total_length=30, valid_lengths=(30, 22)),
    "W=1 decode": _case(window=1, total_length=5),
    "W=1 chunk of 2": _case(window=1, query_length=2, total_length=5),
    "prefill S=T=2W+1": _case(query_length=2 * W + 1, total_length=2 * W + 1),
    "p1 mask decode T=2W+1": _case(mask_style="p1", total_length=2 * W + 1),
    "fp16 decode T=2W+1": _case(dtype="float16", total_length=2 * W + 1),
}


def _start(case: SingleLayerCase) -> int:
    s, t, window = case.query_length, case.total_length, case.window
    assert window is not None
    return max(0, min(min(case.valid_lengths) - s - window + 1, t - s - 1))


def _run(model: ir.Model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (output,) = session.run(None, inputs)
    return output


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_sliced_layer_equals_the_reference(case: SingleLayerCase) -> None:
    model, report = rewriter.rewrite(shared_layer_model(case))
    (done,) = report.rewrites
    assert done.window_slice
    (gqa,) = [node for node in model.graph if node.op_type == "GroupQueryAttention"]
    assert {gqa.inputs[3].producer().op_type, gqa.inputs[4].producer().op_type} == {"Slice"}

    inputs = feeds(case)
    rows = slice(0, case.batch)
    expected = reference(case, inputs, rows)
    start = _start(case)
    # Keys no query can see: poisoned, so reading them would show as NaN.
    for name in ("past_key_values.0.key", "past_key_values.0.value"):
        inputs[name][:, :, :start] = np.nan
    assert_close(case, _run(model, inputs), expected, rows)


def test_poisoned_keys_reach_the_output_without_the_slice() -> None:
    # The check above can fail: the same layer rewritten without the slice reads every key.
    case = CASES["decode T=2W+1"]
    inputs = feeds(case)
    inputs["past_key_values.0.value"][:, :, : _start(case)] = np.nan
    model, report = rewriter.rewrite(shared_layer_model(case), window_slice=False)
    assert not report.rewrites[0].window_slice
    assert not np.all(np.isfinite(_run(model, inputs)))


def test_full_attention_layers_are_not_sliced() -> None:
    model, report = rewriter.rewrite(shared_layer_model(_case(window=None, total_length=20)))
    (done,) = report.rewrites
    assert not done.window_slice
    assert "Slice" not in {node.op_type for node in model.graph}


def test_one_slice_per_borrowed_cache_for_all_its_layers() -> None:
    # p1_tiny: layers 4 and 5 borrow layer 2's sliding cache, layer 6 layer 3's full one.
    model, report = rewriter.rewrite(ir.load(FIXTURE), layers="shared")
    assert [r.window_slice for r in report.rewrites] == [True, True, False]
    slices = [node for node in model.graph if node.op_type == "Slice"]
    assert sorted(node.inputs[0].name for node in slices) == ["present.2.key", "present.2.value"]
