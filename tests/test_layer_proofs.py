"""Layer proofs on the committed fixtures and the real corpus: each rewritten layer against a
float64 reference, broken layers named, defects of P1 originals reported per layer, and the
graph diff outside the layers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from rewriter.cli import main
from rewriter.fixtures.gemma4_like import build_decoder, tiny_config
from rewriter.pipeline import rewrite
from rewriter.verification import VerificationResult, _modes, verify
from rewriter.verification._layer_proofs import prove_layers

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
CORPUS = ROOT.parent.parent / "shared" / "corpus" / "mobius-a80d6ad"
if not CORPUS.is_dir():
    CORPUS = Path("/work/shared/corpus/mobius-a80d6ad")

_REWRITTEN: dict[str, tuple[onnx.ModelProto, int]] = {}


def _rewritten(path: Path) -> tuple[ir.Model, int]:
    """A fresh, editable copy of the rewrite of `path` and how many layers it rewrote."""
    key = str(path)
    if key not in _REWRITTEN:
        model, report = rewrite(ir.load(path))
        _REWRITTEN[key] = (ir.to_proto(model), report.rewritten)
    proto, count = _REWRITTEN[key]
    return ir.from_proto(proto), count


def _layers(
    name: str, edit: Callable[[ir.Model], str] | None = None
) -> tuple[VerificationResult, str | None]:
    candidate, _ = _rewritten(FIXTURES / f"{name}.onnx")
    broken = edit(candidate) if edit is not None else None
    return verify(FIXTURES / f"{name}.onnx", candidate, mode="layers"), broken


def _shared_gqa(model: ir.Model) -> ir.Node:
    """The first GQA that reads a borrowed cache (its past_key is another node's output)."""
    return next(
        node
        for node in model.graph
        if node.op_type == "GroupQueryAttention" and node.inputs[3].producer() is not None
    )


def _replaced(node: ir.Node, original: str) -> str:
    """Label of the Attention a GQA replaced (the layer entry's `node`)."""
    (attention,) = [n for n in ir.load(original).graph if n.outputs[0].name == node.outputs[0].name]
    return attention.name


def _set_attribute(name: str, value: float | int) -> Callable[[ir.Model], str]:
    def edit(model: ir.Model) -> str:
        node = _shared_gqa(model)
        if isinstance(value, float):
            node.attributes[name] = ir.AttrFloat32(name, value)
        else:
            node.attributes[name] = ir.AttrInt64(name, value)
        return node.outputs[0].name

    return edit


def _swap_key_value(model: ir.Model) -> str:
    node = _shared_gqa(model)
    key, value = node.inputs[3], node.inputs[4]
    node.replace_input_with(3, value)
    node.replace_input_with(4, key)
    return node.outputs[0].name


def _seqlens_from_total_length(model: ir.Model) -> str:
    """seqlens_k = T - 1 for every row: right at B = 1, wrong for a padded row."""
    node = _shared_gqa(model)
    total = node.inputs[6]
    one = ir.Value(name="one_i32", const_value=ir.tensor(np.array([1], dtype=np.int32)))
    one.shape, one.dtype = one.const_value.shape, one.const_value.dtype
    model.graph.register_initializer(one)
    last = ir.node("Sub", [total, one])
    rows = ir.node("Shape", [node.inputs[5]])
    expanded = ir.node("Expand", [last.outputs[0], rows.outputs[0]])
    for new in (last, rows, expanded):
        model.graph.insert_before(node, new)
    node.replace_input_with(5, expanded.outputs[0])
    return node.outputs[0].name


def _entry(result: VerificationResult, output_name: str, original: Path):
    label = next(n.name for n in ir.load(original).graph if n.outputs[0].name == output_name)
    (layer,) = [layer for layer in result.layers if layer.node == label]
    return layer


# -- correct rewrites ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        FIXTURES / "p2_tiny.onnx",
        FIXTURES / "p2_tiny_opset24_explicit.onnx",
        FIXTURES / "p2_all_attention_tiny.onnx",
        FIXTURES / "p2_causal_tiny.onnx",
        FIXTURES / "p1_tiny.onnx",
        FIXTURES / "p1_tiny_fp16.onnx",
        FIXTURES / "p1_attention_full_tiny.onnx",
        CORPUS / "p2_all_attention_default_f32.onnx",
    ],
    ids=lambda path: path.stem,
)
def test_every_rewritten_layer_is_proven(path: Path) -> None:
    candidate, rewritten = _rewritten(path)
    result = verify(path, candidate, mode="layers")
    assert result.passed, result.summary()
    assert rewritten > 0 and len(result.layers) == rewritten
    assert result.graph_diff is not None and result.graph_diff.passed
    assert result.model is not None and result.model["ran"] is False
    fp16 = "fp16" in path.stem
    for layer in result.layers:
        names = {check.name for check in layer.checks if check.model == "candidate"}
        assert {"prefill", "decode", "chunk", "batch_prefill"} <= names
        for check in layer.checks:
            if check.model != "candidate":
                continue
            assert check.passed is True
            assert check.max_abs_diff is not None and check.tolerance is not None
            # Fixed tolerances relative to outputs of order 1..5: fp32 1e-4, fp16 1e-2.
            assert check.tolerance <= (0.06 if fp16 else 6e-4)
            assert check.max_abs_diff <= check.tolerance
            assert check.max_abs_diff > 0 or check.name == "prefill"  # real numbers, not 0 == 0


@pytest.mark.parametrize("cast", ["before-unsqueeze", "last"])
def test_fp16_biases_cast_after_their_where_are_rewritten_and_proven(cast: str) -> None:
    # mobius main (78437cd) builds fp16 biases in float32 and casts them: every Attention
    # (own-cache and KV-shared) must still match P2 and be proven in fp16.
    config = tiny_config(
        mask_style="p2", dtype="float16", nonshared_attention="attention", p2_bias_cast=cast
    )
    original = build_decoder(config)
    assert any(
        node.op_type == "Cast" and node.input[0].startswith("/model/mask/")
        for node in original.graph.node
    )
    attention = sum(node.op_type == "Attention" for node in original.graph.node)
    candidate, report = rewrite(ir.from_proto(original))
    assert report.skipped == [] and report.rewritten == attention
    result = verify(original, candidate, mode="layers")
    assert result.passed, result.summary()
    assert len(result.layers) == attention
    for layer in result.layers:
        for check in layer.checks:
            if check.model == "candidate":
                assert check.passed is True
                assert check.max_abs_diff is not None and check.tolerance is not None
                assert check.tolerance <= 0.06  # the fixed fp16 tolerance, not widened


def test_a_bias_cast_to_a_non_float_type_is_not_a_p2_mask() -> None:
    config = tiny_config(
        mask_style="p2", dtype="float16", nonshared_attention="attention", p2_bias_cast="last"
    )
    model = ir.from_proto(build_decoder(config))
    # The bias's last Cast (the one the Attention reads), made an integer cast.
    casts = [
        node
        for node in model.graph
        if node.op_type == "Cast"
        and any(user.op_type == "Attention" for user, _ in node.outputs[0].uses())
    ]
    assert casts
    for node in casts:
        node.attributes["to"] = ir.AttrInt64("to", int(ir.DataType.INT32))
    _, report = rewrite(model)
    assert report.rewritten == 0
    assert all("not a float type" in skip.reason for skip in report.skipped)


def test_layers_with_their_own_cache_compare_presents() -> None:
    result, _ = _layers("p2_all_attention_tiny")
    own = [layer for layer in result.layers if layer.config.startswith("own-cache")]
    assert len(own) == 4
    labels = {case.label for check in own[0].checks for case in check.cases}
    assert any(label.endswith("present_key") for label in labels)
    assert any(label.endswith("present_value") for label in labels)


def test_p1_original_defects_are_reported_per_layer() -> None:
    result, _ = _layers("p1_tiny")
    assert result.passed, result.summary()
    for layer in result.layers:
        failed = {c.name for c in layer.checks if c.model == "original" and c.passed is False}
        assert {"decode", "chunk", "batch_prefill"} <= failed
        assert not any(c.passed is False for c in layer.checks if c.model == "candidate")
    decode = next(
        c for c in result.layers[0].checks if c.name == "decode" and c.model == "original"
    )
    assert decode.max_abs_diff is not None and decode.max_abs_diff > 0.5
    assert result.original_defects == []  # the whole-model check did not run
    defects = "\n".join(result.layer_defects)
    assert "upper left" in defects and "[q_num_heads,S,T]" in defects
    assert "/model/layers.4/" in defects


def test_identical_layers_share_one_run_and_agree_with_separate_runs() -> None:
    path = FIXTURES / "p2_all_attention_tiny.onnx"
    candidate, _ = _rewritten(path)
    shared = prove_layers(ir.load(path), candidate)
    separate = prove_layers(ir.load(path), candidate, dedupe=False)
    # Layers 2 and 3 (own cache) compute as layers 0 and 1 do.
    assert [layer.proof_shared_with is not None for layer in shared.layers].count(True) == 2
    assert all(layer.proof_shared_with is None for layer in separate.layers)
    for a, b in zip(shared.layers, separate.layers, strict=True):
        assert [c.to_dict() for c in a.checks] == [c.to_dict() for c in b.checks]


# -- broken candidates: rejected by the proof of the layer that is broken ------------------------


@pytest.mark.parametrize(
    ("edit", "failing"),
    [
        pytest.param(_set_attribute("local_window_size", 5), "prefill", id="window+1"),
        pytest.param(_set_attribute("local_window_size", 3), "prefill", id="window-1"),
        pytest.param(_set_attribute("scale", 0.5), "prefill", id="scale"),
        pytest.param(_swap_key_value, "prefill", id="swapped-kv"),
        pytest.param(_seqlens_from_total_length, "batch_decode", id="seqlens_k"),
    ],
)
def test_broken_layer_is_rejected_and_named(edit: Callable[[ir.Model], str], failing: str) -> None:
    result, output_name = _layers("p2_tiny", edit)
    assert not result.passed
    assert output_name is not None
    broken = _entry(result, output_name, FIXTURES / "p2_tiny.onnx")
    assert not broken.passed
    check = next(c for c in broken.checks if c.name == failing and c.model == "candidate")
    assert check.passed is False
    assert check.max_abs_diff is not None and check.tolerance is not None
    assert check.max_abs_diff > 10 * check.tolerance
    assert broken.node in result.summary()
    others = [layer for layer in result.layers if layer is not broken]
    assert others and all(layer.passed for layer in others)
    # The original is right in every one of these scenarios: no defect is blamed on it.
    assert result.layer_defects == []


def test_wrong_seqlens_passes_unpadded_scenarios() -> None:
    result, output_name = _layers("p2_tiny", _seqlens_from_total_length)
    assert output_name is not None
    broken = _entry(result, output_name, FIXTURES / "p2_tiny.onnx")
    by_name = {c.name: c.passed for c in broken.checks if c.model == "candidate"}
    assert by_name["prefill"] and by_name["decode"] and by_name["chunk"]
    assert by_name["batch_decode"] is False


def test_replacement_reading_another_cache_has_no_proof() -> None:
    def read_other_layer(model: ir.Model) -> str:
        node = _shared_gqa(model)
        other = next(
            v for v in model.graph.outputs if v.name == "present.3.key"
        )  # the full layer's cache, not the sliding source
        node.replace_input_with(3, other)
        return node.outputs[0].name

    result, output_name = _layers("p2_tiny", read_other_layer)
    assert not result.passed
    assert output_name is not None
    broken = _entry(result, output_name, FIXTURES / "p2_tiny.onnx")
    assert "present.3.key" in broken.reason
    assert "no proof" in result.summary()


def test_change_outside_the_layers_fails_the_graph_diff() -> None:
    def bump_a_weight(model: ir.Model) -> str:
        name, value = next(
            (n, v) for n, v in model.graph.initializers.items() if "mlp" in n or "proj" in n
        )
        array = value.const_value.numpy().copy()
        array.flat[0] += 1.0
        value.const_value = ir.tensor(array, name=name)
        return name

    result, name = _layers("p2_tiny", bump_a_weight)
    assert not result.passed
    assert all(layer.passed for layer in result.layers)
    assert result.graph_diff is not None and result.graph_diff.passed is False
    assert name is not None and name in result.graph_diff.detail


# -- modes, memory estimate, CLI -----------------------------------------------------------------


def test_auto_skips_the_model_check_when_it_does_not_fit(monkeypatch) -> None:
    monkeypatch.setattr(_modes, "available_memory", lambda: 1 << 20)
    candidate, _ = _rewritten(FIXTURES / "p2_tiny.onnx")
    messages: list[str] = []
    result = verify(FIXTURES / "p2_tiny.onnx", candidate, progress=messages.append)
    assert result.passed and result.checks == []
    assert result.model is not None and result.model["ran"] is False
    assert result.model["reason"].startswith("does not fit: estimated")
    estimate = result.model["memory_estimate"]
    assert estimate["available_bytes"] == 1 << 20
    assert estimate["estimated_bytes"] > estimate["original_weight_bytes"] > 0
    assert any(m.startswith("layer 1/3") for m in messages)
    assert messages[-1] == "verdict: passed"


def test_auto_measures_what_the_original_session_takes_before_going_on(monkeypatch) -> None:
    """The estimate lets the check start; the original's loaded session, measured, decides
    whether the candidate's and the twin's fit too."""
    from rewriter.verification import _verify

    readings = iter([1 << 30, (1 << 30) + (3 << 30)])  # the session took 3 GiB
    monkeypatch.setattr(_verify, "resident_bytes", lambda: next(readings))
    monkeypatch.setattr(_modes, "available_memory", lambda: 6 << 30)
    candidate, _ = _rewritten(FIXTURES / "p2_tiny.onnx")
    result = verify(FIXTURES / "p2_tiny.onnx", candidate)
    assert result.model is not None and result.model["ran"] is False
    reason = result.model["reason"]
    assert reason.startswith("does not fit: the original's session took 3.22 GB (measured)")
    assert result.passed and result.checks == []
    assert result.rests_on.endswith("whole-model check not run")


def test_auto_confirms_the_wiring_at_short_lengths_when_every_layer_is_proven() -> None:
    config = tiny_config(mask_style="p2", sliding_window=16)
    original = build_decoder(config)
    candidate, _ = rewrite(ir.from_proto(original))
    auto = verify(original, candidate)
    assert auto.passed and auto.model["lengths"] == "confirmation (a window of 8)"
    full = verify(original, candidate, mode="all")
    assert full.passed and full.model["lengths"] == "full"

    def longest(result: VerificationResult) -> str:
        prefill = next(c for c in result.checks if c.name == "prefill_equivalence")
        return prefill.cases[-1].label

    assert longest(auto).startswith("S=18 ") and longest(full).startswith("S=34 ")


def test_model_mode_runs_only_the_whole_model_checks() -> None:
    candidate, _ = _rewritten(FIXTURES / "p2_tiny.onnx")
    result = verify(FIXTURES / "p2_tiny.onnx", candidate, mode="model")
    assert result.passed and result.layers == [] and result.graph_diff is None
    assert result.model is not None and result.model["ran"] and result.checks


def test_unknown_mode_is_refused() -> None:
    from rewriter.verification import VerificationError

    with pytest.raises(VerificationError, match="unknown verification mode"):
        verify(FIXTURES / "p2_tiny.onnx", FIXTURES / "p2_tiny.onnx", mode="fast")


def test_cli_verify_layers_reports_every_layer(tmp_path: Path, capsys) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(
        [str(FIXTURES / "p1_tiny.onnx"), str(out), "--verify", "layers", "--report", str(report)]
    )
    assert code == 0
    verification = json.loads(report.read_text())["verification"]
    assert verification["mode"] == "layers"
    assert verification["model"]["ran"] is False
    assert len(verification["layers"]) == 3
    for layer in verification["layers"]:
        assert layer["passed"] is True
        for check in layer["checks"]:
            assert {"name", "max_abs_diff", "tolerance", "passed"} <= set(check)
    assert "layer 1/3" in capsys.readouterr().err

    code = main(["verify", str(FIXTURES / "p1_tiny.onnx"), str(out), "--verify", "all"])
    assert code == 0


def _decoder_with_large_embedding() -> ir.Model:
    from rewriter.fixtures.gemma4_like import build_decoder, tiny_config

    # A vocabulary of 8192 makes the embedding (and the lm head) weights above 1 MiB.
    return ir.from_proto(build_decoder(tiny_config(mask_style="p2", vocab_size=8192)))


def test_model_check_shares_identical_weights_between_sessions() -> None:
    original = _decoder_with_large_embedding()
    candidate, _ = rewrite(_decoder_with_large_embedding())
    result = verify(original, candidate, mode="model")
    assert result.passed, result.summary()
    assert result.model is not None and result.model["shared_weight_bytes"] >= 1 << 21
    estimate = result.model["memory_estimate"]
    assert estimate["shared_bytes"] == result.model["shared_weight_bytes"]


def test_a_changed_weight_is_not_shared_and_is_caught() -> None:
    original = _decoder_with_large_embedding()
    candidate, _ = rewrite(_decoder_with_large_embedding())
    name, value = max(
        candidate.graph.initializers.items(), key=lambda item: item[1].const_value.nbytes
    )
    array = value.const_value.numpy().copy()
    array *= 2.0
    value.const_value = ir.tensor(array, name=name)
    result = verify(original, candidate, mode="all")
    assert not result.passed
    # The candidate ran with its own (changed) weight: the whole-model prefill differs ...
    prefill = next(c for c in result.checks if c.name == "prefill_equivalence")
    assert prefill.passed is False
    # ... and the graph diff names it, while every layer's own proof holds.
    assert result.graph_diff is not None and name in result.graph_diff.detail
    assert all(layer.passed for layer in result.layers)


def test_constants_stored_as_external_data_still_cut(tmp_path: Path) -> None:
    # Some exporters write every initializer, shape constants included, as external data.
    original, candidate = tmp_path / "original.onnx", tmp_path / "candidate.onnx"
    ir.save(
        ir.load(FIXTURES / "p2_tiny.onnx"), original, external_data="o.data", size_threshold_bytes=0
    )
    model, _ = rewrite(ir.load(FIXTURES / "p2_tiny.onnx"))
    ir.save(model, candidate, external_data="c.data", size_threshold_bytes=0)
    result = verify(original, candidate, mode="layers")
    assert result.passed, result.summary()
    assert len(result.layers) == 3 and all(not layer.reason for layer in result.layers)


def test_softcap_is_proven_and_a_missing_softcap_is_caught() -> None:
    from rewriter.fixtures.gemma4_like import build_decoder, tiny_config

    original = ir.from_proto(build_decoder(tiny_config(mask_style="p2", softcap=5.0)))
    candidate, _ = rewrite(ir.from_proto(build_decoder(tiny_config(mask_style="p2", softcap=5.0))))
    result = verify(original, candidate, mode="layers")
    assert result.passed, result.summary()
    assert all("softcap 5" in layer.config for layer in result.layers)
    node = _shared_gqa(candidate)
    assert node.attributes.get_float("softcap", 0.0) == 5.0
    del node.attributes["softcap"]
    result = verify(original, candidate, mode="layers")
    assert not result.passed
    broken = [layer for layer in result.layers if not layer.passed]
    assert len(broken) == 1
    prefill = next(c for c in broken[0].checks if c.name == "prefill" and c.model == "candidate")
    assert prefill.max_abs_diff is not None and prefill.tolerance is not None
    assert prefill.max_abs_diff > 10 * prefill.tolerance


def test_layers_cut_after_the_attention_are_listed_and_left_to_the_model_check() -> None:
    # torch.onnx's 4-D layout: the GQA takes over the Reshape after the Attention.
    path = FIXTURES / "hf_torch_prefill_opset24.onnx"
    candidate, rewritten = _rewritten(path)
    layers_only = verify(path, candidate, mode="layers")
    assert not layers_only.passed
    assert len(layers_only.layers) == rewritten > 0
    assert all("after the Attention" in layer.reason for layer in layers_only.layers)
    assert layers_only.graph_diff is not None and layers_only.graph_diff.passed is None
    auto = verify(path, candidate)
    assert auto.passed, auto.summary()
    assert auto.model is not None and auto.model["ran"] and auto.model["passed"]
