"""Feed synthesis from a model's signature, tolerances and error texts of the verifier."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from rewriter.verification import VerificationError
from rewriter.verification._feeds import DecoderSignature, FeedSynthesizer, Step
from rewriter.verification._session import short_error
from rewriter.verification._tolerance import compare, tolerance_for

# The committed .onnx files live in the repository, not in the installed package.
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    source = model if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _signature_model(*, cache_dims: tuple[int | str, int | str] = (2, 4)) -> onnx.ModelProto:
    """A model with a decoder-like signature (int32 ids and mask, fp16 cache, extra inputs);
    its computation is irrelevant, only its declared inputs and outputs matter."""
    heads, size = cache_dims
    past = ["batch", heads, "past_sequence_length", size]
    present = ["batch", heads, "total_sequence_length", size]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ["batch", "total"]),
        helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT16, past),
        helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT16, past),
        helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, "mystery"]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 11]),
        helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT16, present),
        helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT16, present),
        helper.make_tensor_value_info("token_types", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, "mystery"]),
    ]
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_f", "axis2"], ["ids_3d"]),
        helper.make_node("Expand", ["ids_3d", "vocab_shape"], ["logits"]),
        helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
        helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"]),
        helper.make_node("Identity", ["token_type_ids"], ["token_types"]),
        helper.make_node("Identity", ["pixel_values"], ["pixels"]),
        helper.make_node("Identity", ["attention_mask"], ["mask_copy"]),
    ]
    initializers = [
        helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
        helper.make_tensor("vocab_shape", TensorProto.INT64, [3], [1, 1, 11]),
    ]
    graph = helper.make_graph(nodes, "signature", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def test_fixture_signature() -> None:
    signature = DecoderSignature.from_session(_session(FIXTURES / "p2_tiny.onnx"), "original")
    assert signature.vocab_size == 37
    assert signature.compared_outputs == ("logits",)
    assert signature.has_full_cache
    assert [(c.layer, c.kv_heads, c.head_size) for c in signature.cache] == [
        (0, 1, 8),
        (1, 1, 16),
        (2, 1, 8),
        (3, 1, 16),
    ]
    assert signature.cache[0].present_key == "present.0.key"
    # The presents' time dims are the exporter-style symbols _d0, _d2, ... (one per layer).
    assert dict(signature.dim_roles) == {
        "batch": "batch",
        "sequence_length": "sequence",
        "total_sequence_length": "total",
        "past_sequence_length": "past",
        **{f"_d{2 * layer}": "total" for layer in range(4)},
    }


def test_feeds_honour_declared_types_and_bind_symbols() -> None:
    session = _session(_signature_model())
    signature = DecoderSignature.from_session(session, "original")
    assert signature.position_ids is None
    assert [spec.name for spec in signature.others] == ["token_type_ids", "pixel_values"]
    synthesizer = FeedSynthesizer(vocab_size=11, capacity=8, seed=0)
    step = Step.prefill([0, 1], [5, 3], 5)
    feeds = synthesizer.feeds(signature, step)
    assert feeds["input_ids"].dtype == np.int32 and feeds["input_ids"].shape == (2, 5)
    assert feeds["attention_mask"].dtype == np.int32
    assert feeds["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert feeds["past_key_values.0.key"].shape == (2, 2, 0, 4)
    assert feeds["past_key_values.0.key"].dtype == np.float16
    assert feeds["token_type_ids"].shape == (2, 5) and feeds["token_type_ids"].dtype == np.int64
    # "mystery" is bound to nothing the decoder declares: the smallest extent.
    assert feeds["pixel_values"].shape == (2, 3, 1)
    assert int(feeds["input_ids"].max()) < 11
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, feeds), strict=True))
    past = FeedSynthesizer.next_past(signature, outputs)
    assert set(past) == {"past_key_values.0.key", "past_key_values.0.value"}


def test_cache_dims_that_are_not_static_are_refused_by_name() -> None:
    model = _signature_model(cache_dims=("heads", "head_size"))
    with pytest.raises(VerificationError, match=re.escape("'past_key_values.0.key'")):
        DecoderSignature.from_session(_session(model), "candidate")


def test_random_inputs_depend_on_seed_and_name_only() -> None:
    signature = DecoderSignature.from_session(_session(_signature_model()), "original")
    step = Step.prefill([0], [4], 4)
    first = FeedSynthesizer(vocab_size=11, capacity=8, seed=5).feeds(signature, step)
    again = FeedSynthesizer(vocab_size=11, capacity=8, seed=5).feeds(signature, step)
    other = FeedSynthesizer(vocab_size=11, capacity=8, seed=6).feeds(signature, step)
    for name in ("input_ids", "pixel_values"):
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["pixel_values"], other["pixel_values"])


def test_right_padded_positions() -> None:
    step = Step.prefill([0, 1], [4, 2], 4)
    assert step.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 1, 1]]
    decode = Step((0, 1), np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), 1)
    assert decode.past_length == 4
    assert decode.position_ids.tolist() == [[4], [2]]


_SIGNATURE: list[DecoderSignature] = []


def _shared_signature() -> DecoderSignature:
    if not _SIGNATURE:
        _SIGNATURE.append(DecoderSignature.from_session(_session(_signature_model()), "original"))
    return _SIGNATURE[0]


@pytest.mark.property
@settings(max_examples=30, deadline=None)
@given(
    prefix=st.integers(1, 12),
    steps=st.integers(1, 4),
    short=st.integers(1, 16),
    seed=st.integers(0, 2**16),
)
def test_token_data_is_indexed_by_row_and_position(
    prefix: int, steps: int, short: int, seed: int
) -> None:
    """The oracles compare different ways to compute the same tokens: a decode step must see
    the tokens a longer prefill saw at those positions, a padded row those of the row alone."""
    signature = _shared_signature()
    synthesizer = FeedSynthesizer(vocab_size=11, capacity=16, seed=seed)
    total = prefix + steps
    full = synthesizer.feeds(signature, Step.prefill([1], [total], total))
    for j in range(steps):
        mask = np.ones((1, prefix + j + 1), dtype=np.int64)
        past = {
            name: np.zeros((1, 2, prefix + j, 4), np.float16)
            for name in ("past_key_values.0.key", "past_key_values.0.value")
        }
        step = synthesizer.feeds(signature, Step((1,), mask, 1), past)
        for name in ("input_ids", "token_type_ids"):
            np.testing.assert_array_equal(step[name], full[name][:, prefix + j : prefix + j + 1])
    short = min(short, total)
    batch = synthesizer.feeds(signature, Step.prefill([0, 1], [total, short], total))
    alone = synthesizer.feeds(signature, Step.prefill([1], [short], short))
    np.testing.assert_array_equal(batch["input_ids"][1, :short], alone["input_ids"][0])


def test_tolerance_is_relative_to_the_reference_scale() -> None:
    logits = np.array([[-50.0, 3.0]], dtype=np.float32)
    assert tolerance_for(logits) == pytest.approx(5e-3)
    assert tolerance_for(logits.astype(np.float16)) == pytest.approx(0.5)
    assert tolerance_for(np.array([0.1], np.float32)) == pytest.approx(1e-4)  # floor at 1
    assert tolerance_for(np.array([3], np.int64)) == 0.0
    assert compare("x", logits, logits + np.float32(4e-3)).passed
    assert not compare("x", logits, logits + np.float32(6e-3)).passed
    nan = compare("x", logits, np.full_like(logits, np.nan))
    assert not nan.passed and "non-finite" in nan.note
    assert not compare("x", logits, logits[:, :1]).passed


def test_short_error_keeps_the_reason_not_the_signature() -> None:
    message = (
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Attention "
        "node. Name:'a' Status Message: /onnxruntime_src/onnxruntime/core/providers/cpu/llm/"
        "attention_helper.h:161 onnxruntime::common::Status onnxruntime::attention_helper::"
        "Compute(const onnxruntime::Tensor*, bool) mask == nullptr was false. attn_mask must be "
        "broadcastable\n"
    )
    assert short_error(RuntimeError(message)) == (
        "Non-zero status code returned while running Attention node. Name:'a' "
        "Status Message: attn_mask must be broadcastable"
    )
