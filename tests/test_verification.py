"""The verifier on the committed tiny fixtures: correct rewrites pass, broken ones fail on the
right check, defects of P1/P2-causal originals are reported without failing their rewrite."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from rewriter.rules import FormDecision
from rewriter.verification import CheckResult, VerificationError, VerificationResult, verify

pipeline = pytest.importorskip("rewriter.pipeline")

# The committed .onnx files live in the repository, not in the installed package.
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _fixture(name: str) -> ir.Model:
    return ir.load(FIXTURES / f"{name}.onnx")


_REWRITTEN: dict[str, onnx.ModelProto] = {}


def _rewritten(name: str) -> ir.Model:
    """A fresh, editable copy of the fixture's rewrite (the rewrite itself is cached)."""
    if name not in _REWRITTEN:
        model, _ = pipeline.rewrite(_fixture(name))
        _REWRITTEN[name] = ir.to_proto(model)
    return ir.from_proto(_REWRITTEN[name])


def _check(result: VerificationResult, name: str, model: str = "candidate") -> CheckResult:
    (check,) = [c for c in result.checks if c.name == name and c.model == model]
    return check


def _shared_gqa_nodes(model: ir.Model) -> list[ir.Node]:
    """GQA nodes that read a borrowed cache: their past_key is another node's present."""
    return [
        node
        for node in model.graph
        if node.op_type == "GroupQueryAttention" and node.inputs[3].producer() is not None
    ]


def _set_attribute(name: str, value: float | int) -> Callable[[ir.Model], None]:
    def edit(model: ir.Model) -> None:
        node = _shared_gqa_nodes(model)[0]
        if isinstance(value, float):
            node.attributes[name] = ir.AttrFloat32(name, value)
        else:
            node.attributes[name] = ir.AttrInt64(name, value)

    return edit


def _swap_key_value(model: ir.Model) -> None:
    node = _shared_gqa_nodes(model)[0]
    key, value = node.inputs[3], node.inputs[4]
    node.replace_input_with(3, value)
    node.replace_input_with(4, key)


def _drop_layer(model: ir.Model) -> None:
    """The shared layer contributes nothing: its attention output is multiplied by zero."""
    node = _shared_gqa_nodes(model)[0]
    output = node.outputs[0]
    zero = _constant(model, "zero_for_dropped_layer", np.array(0, dtype=np.float32))
    mul = ir.node("Mul", [output, zero])
    output.replace_all_uses_with(mul.outputs[0])
    mul.replace_input_with(0, output)
    model.graph.insert_after(node, mul)


def _seqlens_from_total_length(model: ir.Model) -> None:
    """seqlens_k = T - 1 for every row: right at B=1, wrong for a padded row's decode."""
    node = _shared_gqa_nodes(model)[0]
    seqlens, total = node.inputs[5], node.inputs[6]
    one = _constant(model, "one_i32", np.array([1], dtype=np.int32))
    last = ir.node("Sub", [total, one])
    rows = ir.node("Shape", [seqlens])
    expanded = ir.node("Expand", [last.outputs[0], rows.outputs[0]])
    for new in (last, rows, expanded):
        model.graph.insert_before(node, new)
    node.replace_input_with(5, expanded.outputs[0])


def _constant(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape, value.dtype = value.const_value.shape, value.const_value.dtype
    model.graph.register_initializer(value)
    return value


# -- correct rewrites --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["p2_tiny", "p2_tiny_opset24_explicit", "p2_all_attention_tiny"])
def test_correct_rewrite_passes_with_a_correct_original(name: str) -> None:
    result = verify(_fixture(name), _rewritten(name))
    assert result.passed, result.summary()
    assert result.original_defects == []
    assert {(c.name, c.model, c.passed) for c in result.checks} == {
        ("prefill_equivalence", "candidate", True),
        ("cache_consistency", "candidate", True),
        ("cache_consistency", "original", True),
        ("decode_equivalence", "candidate", True),
        ("batch_consistency", "candidate", True),
        ("batch_consistency", "original", True),
    }
    prefill = _check(result, "prefill_equivalence")
    # Lengths beyond the fixtures' sliding window (4) are part of the proof.
    assert any("S=10" in case.label for case in prefill.cases)
    for check in result.checks:
        assert check.max_abs_diff is not None and check.tolerance is not None
        assert check.max_abs_diff <= check.tolerance


@pytest.mark.parametrize(("name", "rtol"), [("p1_tiny", 1e-4), ("p1_tiny_fp16", 1e-2)])
def test_p1_original_defects_are_reported_and_its_rewrite_passes(name: str, rtol: float) -> None:
    result = verify(FIXTURES / f"{name}.onnx", _rewritten(name))
    assert result.passed, result.summary()
    assert _check(result, "cache_consistency", "original").passed is False
    assert _check(result, "batch_consistency", "original").passed is False
    decode = _check(result, "decode_equivalence")
    assert decode.passed is None and "original not cache-consistent" in decode.detail
    cache_defect, batch_defect = result.original_defects
    assert cache_defect.startswith("cache consistency: decode step")
    assert "upper left" in cache_defect
    assert batch_defect.startswith("batch consistency: fails on ONNX Runtime")
    assert "[q_num_heads,S,T]" in batch_defect
    # The decode error of P1 is of the order of the logits, far beyond any tolerance.
    assert _check(result, "cache_consistency", "original").max_abs_diff > 0.5
    prefill = _check(result, "prefill_equivalence")
    assert prefill.tolerance is not None and prefill.max_abs_diff is not None
    # rtol relative to the logits' scale (about 1..100 here), whatever the model's error.
    assert 1 <= prefill.tolerance / rtol < 100


def test_p1_defects_say_the_rewrite_fixed_them() -> None:
    result = verify(_fixture("p1_tiny"), _rewritten("p1_tiny"))
    assert [(d.check, d.fixed_by_rewrite) for d in result.defects] == [
        ("cache_consistency", True),
        ("batch_consistency", True),
    ]
    assert all(line.endswith("; fixed by the rewrite") for line in result.original_defects)


def test_no_op_of_a_defective_original_passes_and_keeps_its_defects() -> None:
    # The candidate is the original: every failure is inherited, none is the rewrite's.
    result = verify(_fixture("p1_tiny"), _fixture("p1_tiny"))
    assert result.passed, result.summary()
    assert result.gates == []
    assert _check(result, "cache_consistency").passed is False
    assert [(d.check, d.fixed_by_rewrite) for d in result.defects] == [
        ("cache_consistency", False),
        ("batch_consistency", False),
    ]
    assert all("not fixed" in line for line in result.original_defects)


def test_partial_rewrite_of_a_defective_original_passes() -> None:
    # The full shared layer (D=16) stays on P1's Attention, so decode stays wrong there.
    def sliding_only(dtype: str, head_size: int, windowed: bool) -> FormDecision:
        return FormDecision("past") if windowed else FormDecision(None, "test: full left")

    candidate, report = pipeline.rewrite(_fixture("p1_tiny"), choose_form=sliding_only)
    assert report.rewritten == 2 and len(report.skipped) == 1
    result = verify(_fixture("p1_tiny"), candidate)
    assert result.passed, result.summary()
    assert _check(result, "prefill_equivalence").passed
    assert _check(result, "cache_consistency").passed is False
    assert {d.check: d.fixed_by_rewrite for d in result.defects}["cache_consistency"] is False


def test_p2_causal_original_has_a_decode_defect_only() -> None:
    result = verify(_fixture("p2_causal_tiny"), _rewritten("p2_causal_tiny"))
    assert result.passed, result.summary()
    (defect,) = result.original_defects
    assert defect.startswith("cache consistency:") and "upper left" in defect


# -- broken candidates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_set_attribute("local_window_size", 5), id="window+1"),
        pytest.param(_set_attribute("local_window_size", 3), id="window-1"),
        pytest.param(_set_attribute("scale", 0.5), id="scale"),
        pytest.param(_swap_key_value, id="swapped-kv"),
        pytest.param(_drop_layer, id="dropped-layer"),
    ],
)
def test_broken_candidate_fails_prefill_equivalence(edit: Callable[[ir.Model], None]) -> None:
    candidate = _rewritten("p2_tiny")
    edit(candidate)
    result = verify(_fixture("p2_tiny"), candidate)
    assert not result.passed
    prefill = _check(result, "prefill_equivalence")
    assert prefill.passed is False
    assert prefill in result.failed_checks()
    assert prefill.max_abs_diff is not None and prefill.tolerance is not None
    assert prefill.max_abs_diff > 10 * prefill.tolerance


def test_wrong_window_shows_only_beyond_the_window() -> None:
    candidate = _rewritten("p2_tiny")
    _set_attribute("local_window_size", 5)(candidate)
    result = verify(_fixture("p2_tiny"), candidate)
    by_length = {
        int(case.label.split()[0].removeprefix("S=")): case.passed
        for case in _check(result, "prefill_equivalence").cases
        if case.label.endswith(" logits")
    }
    # The fixture's window is 4: a window of 5 only differs once a query has 5 keys behind it.
    assert all(passed for length, passed in by_length.items() if length <= 4)
    assert not any(passed for length, passed in by_length.items() if length > 5)
    assert max(by_length) > 5


def test_candidate_wrong_only_for_padded_rows_fails_batch_consistency() -> None:
    candidate = _rewritten("p2_tiny")
    _seqlens_from_total_length(candidate)
    result = verify(_fixture("p2_tiny"), candidate)
    assert not result.passed
    assert [(c.name, c.model) for c in result.failed_checks()] == [
        ("batch_consistency", "candidate")
    ]
    assert "decode row 1" in _check(result, "batch_consistency").detail


def test_candidate_with_upper_left_causal_decode_fails_cache_consistency() -> None:
    # A "rewrite" that kept P1's attention: right in prefill, wrong in decode and at B=2.
    result = verify(_fixture("p2_tiny"), _fixture("p1_tiny"))
    assert not result.passed
    assert _check(result, "prefill_equivalence").passed
    assert _check(result, "cache_consistency").passed is False
    assert _check(result, "batch_consistency").passed is False
    assert result.original_defects == []
    assert result.gates[:3] == [
        "cache_consistency: the candidate fails where the original passes",
        "decode_equivalence: the candidate differs from the original",
        "batch_consistency: the candidate fails where the original passes",
    ]
    # No layer was rewritten, yet the graphs differ (P1 masks instead of P2's): the layer
    # proofs' graph diff names that too.
    assert result.layers == []
    assert result.gates[3].startswith("unchanged_outside_layers: ")


def test_non_finite_candidate_output_fails() -> None:
    candidate = _rewritten("p2_tiny")
    node = _shared_gqa_nodes(candidate)[0]
    output = node.outputs[0]
    nan = _constant(candidate, "nan", np.array(np.nan, dtype=np.float32))
    poisoned = ir.node("Add", [output, nan])
    output.replace_all_uses_with(poisoned.outputs[0])
    poisoned.replace_input_with(0, output)
    candidate.graph.insert_after(node, poisoned)
    result = verify(_fixture("p2_tiny"), candidate)
    assert not result.passed
    prefill = _check(result, "prefill_equivalence")
    assert prefill.passed is False and "non-finite" in prefill.detail


# -- feeding -----------------------------------------------------------------------------------


def _with_extra_inputs(model: ir.Model) -> ir.Model:
    """Adds inputs the verifier does not know, each consumed as zero times itself."""
    features = ir.Value(
        name="extra_features",
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape(["batch", "sequence_length", 37]),
    )
    flags = ir.Value(
        name="extra_flags", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["n_flags"])
    )
    model.graph.inputs.extend([features, flags])
    zero = _constant(model, "zero_for_extra", np.array(0, dtype=np.float32))
    (logits,) = [v for v in model.graph.outputs if v.name == "logits"]
    nodes = [ir.node("Mul", [features, zero])]
    nodes.append(ir.node("Add", [logits, nodes[-1].outputs[0]]))
    nodes.append(ir.node("Cast", [flags], attributes={"to": ir.DataType.FLOAT}))
    nodes.append(ir.node("ReduceSum", [nodes[-1].outputs[0]], attributes={"keepdims": 0}))
    nodes.append(ir.node("Mul", [nodes[-1].outputs[0], zero]))
    nodes.append(ir.node("Add", [nodes[1].outputs[0], nodes[-1].outputs[0]]))
    model.graph.extend(nodes)
    new_logits = nodes[-1].outputs[0]
    new_logits.shape, new_logits.dtype = logits.shape, logits.dtype
    model.graph.outputs[model.graph.outputs.index(logits)] = new_logits
    logits.name, new_logits.name = "logits_before_extra", "logits"
    return model


def test_unknown_extra_inputs_are_fed() -> None:
    original = _with_extra_inputs(_fixture("p2_tiny"))
    candidate, _ = pipeline.rewrite(_with_extra_inputs(_fixture("p2_tiny")))
    result = verify(original, candidate)
    assert result.passed, result.summary()


def test_input_that_cannot_be_fed_is_named() -> None:
    model = _fixture("p2_tiny")
    text = ir.Value(name="prompt_text", type=ir.TensorType(ir.DataType.STRING), shape=ir.Shape([1]))
    model.graph.inputs.append(text)
    length = ir.node("StringNormalizer", [text])
    model.graph.append(length)
    model.graph.outputs.append(length.outputs[0])
    length.outputs[0].name = "normalized_text"
    with pytest.raises(VerificationError, match="'prompt_text'") as error:
        verify(model, _rewritten("p2_tiny"))
    assert "\n" not in str(error.value)


def test_model_without_input_ids_is_refused() -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 23)], ir_version=10
    )
    with pytest.raises(VerificationError, match="input_ids"):
        verify(model, model)


# -- loading, providers, reporting --------------------------------------------------------------


def test_paths_and_in_memory_external_data(tmp_path: Path) -> None:
    candidate_path = tmp_path / "candidate.onnx"
    ir.save(_rewritten("p2_tiny"), candidate_path, external_data="candidate.onnx.data")
    assert (tmp_path / "candidate.onnx.data").is_file()
    by_path = verify(FIXTURES / "p2_tiny.onnx", str(candidate_path))
    # Loaded lazily, its weights are ExternalTensors: the verifier writes a temporary copy.
    lazy = ir.load(candidate_path)
    assert any(
        isinstance(v.const_value, ir.ExternalTensor) for v in lazy.graph.initializers.values()
    )
    in_memory = verify(onnx.load(FIXTURES / "p2_tiny.onnx"), lazy)
    assert by_path.passed and in_memory.passed
    assert _stable(by_path.to_dict()) == _stable(in_memory.to_dict())


def _stable(report: dict) -> dict:
    """A report without what changes from run to run: timings, the memory available."""
    stable = dict(report)
    stable["layers"] = [
        {k: v for k, v in layer.items() if k != "seconds"} for layer in stable["layers"]
    ]
    stable["model"] = {k: v for k, v in stable["model"].items() if k != "memory_estimate"}
    return stable


def test_model_onnx_runtime_cannot_load() -> None:
    model = _fixture("p2_tiny")
    next(iter(model.graph)).op_type = "NoSuchOperator"
    with pytest.raises(VerificationError, match="cannot load the original model"):
        verify(model, _rewritten("p2_tiny"))


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here"
)
def test_cuda_provider_unavailable_is_a_clear_error() -> None:
    with pytest.raises(VerificationError, match="provider 'cuda' is unavailable"):
        verify(FIXTURES / "p2_tiny.onnx", FIXTURES / "p2_tiny.onnx", provider="cuda")


def test_unknown_provider() -> None:
    with pytest.raises(VerificationError, match="unknown provider"):
        verify(FIXTURES / "p2_tiny.onnx", FIXTURES / "p2_tiny.onnx", provider="tpu")


def test_report_structure_and_progress() -> None:
    messages: list[str] = []
    result = verify(
        FIXTURES / "p1_tiny.onnx", _rewritten("p1_tiny"), seed=3, progress=messages.append
    )
    report = json.loads(json.dumps(result.to_dict()))
    assert set(report) == {
        "passed",
        "checks",
        "original_defects",
        "defects",
        "failed_because",
        "rests_on",
        "spread",
        "mode",
        "layers",
        "graph_diff",
        "model",
        "layer_defects",
    }
    assert [d["fixed_by_rewrite"] for d in report["defects"]] == [True, True]
    # A well-conditioned model: the twin ran only where the original's decode missed its
    # tolerance (the upper-left defect), found no spread there, and the defect stands.
    assert report["spread"]["measured"] == {"prefill rows [0] of [6] tokens": 0.0}
    assert report["rests_on"] == (
        "3 of 3 layers proven, nothing else changed; whole model equal within tolerance"
    )
    assert report["failed_because"] == []
    for check in report["checks"]:
        assert {"name", "passed", "max_abs_diff", "tolerance", "model", "detail"} <= set(check)
    skipped = [c for c in report["checks"] if c.get("skipped")]
    assert [c["name"] for c in skipped] == ["decode_equivalence"]
    assert skipped[0]["passed"] is None
    lines = result.summary().splitlines()
    per_layer = len(result.layers) + 1 + len(result.layer_defects)  # layers, graph diff
    assert len(lines) == per_layer + len(result.checks) + len(result.original_defects) + 1
    assert lines[-1] == f"verdict: PASSED ({report['rests_on']})"
    assert any("cache consistency" in m for m in messages)
    assert messages[-1] == "verdict: passed"
