"""The fold (rules._speed_choice.fold) behind ``If(S == 1: fold, else: gqa)``: each layer's
proof covers it, a corrupted fold fails its own layer's proof, and the CLI's default on CPU
writes it without timing anything."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from rewriter import cli, rewrite
from rewriter.metadata import SPEED_KEY
from rewriter.rules import SpeedChoice, always_past
from rewriter.rules._speed_choice import SPEED_FORM_KEY
from rewriter.speed import FOLD_ON_CPU
from rewriter.verification import verify

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FOLD = SpeedChoice("fold", "gqa", "test")
# Every scenario of a layer proof (rewriter.verification._layer_reference.scenarios).
_SCENARIOS = {"prefill", "decode", "chunk", "batch_prefill", "batch_decode"}


def _folded(name: str, **options) -> ir.Model:
    model, report = rewrite(
        ir.load(FIXTURES / f"{name}.onnx"),
        choose_form=always_past,
        choose_speed=lambda _: FOLD,
        **options,
    )
    assert report.rewritten == 3
    assert {r.speed_form for r in report.rewrites} == {FOLD.label}
    return model


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("p2_tiny", {}),
        ("p1_tiny", {}),
        ("p1_tiny_fp16", {}),
        ("p2_causal_tiny", {}),
        ("p2_tiny", {"exact_padding": True}),
        ("p1_tiny", {"exact_padding": True}),
        ("p2_tiny", {"window_slice": False}),
    ],
)
def test_each_folded_layer_is_proven_in_every_scenario(name: str, options: dict) -> None:
    result = verify(ir.load(FIXTURES / f"{name}.onnx"), _folded(name, **options), mode="layers")
    assert result.passed, result.summary()
    assert len(result.layers) == 3
    for layer in result.layers:
        assert not layer.reason
        ran = {c.name for c in layer.checks if c.model == "candidate" and c.passed is True}
        assert ran == _SCENARIOS, layer.summary()
        decode = next(c for c in layer.checks if c.model == "candidate" and c.name == "decode")
        # Decode lengths around the window: W - 1, W, W + 1 (and 2W + 1).
        window = 4  # the fixtures' W; a full layer is proven at the model's largest W
        labels = {case.label for case in decode.cases}
        for total in (window - 1, window, window + 1):
            assert f"decode T={total} output" in labels


def _fold_scores(model: ir.Model, layer: int = 0) -> ir.Node:
    """The float32 fold's Q K^T product (rules._speed_choice.fold_product), which holds the
    scale."""
    phase_ifs = [n for n in model.graph if n.op_type == "If"]
    branch = phase_ifs[layer].attributes["then_branch"].as_graph()
    (scores,) = [
        n
        for n in branch
        if n.metadata_props.get(SPEED_FORM_KEY) == "fold" and n.op_type == "FusedMatMul"
    ]
    assert scores.domain == "com.microsoft"
    assert scores.attributes.get_int("transB") == 1
    return scores


def test_a_fold_with_its_scale_doubled_fails_its_layer_proof() -> None:
    model = _folded("p2_tiny")
    scores = _fold_scores(model, layer=2)  # the full-attention layer
    scale = scores.attributes["alpha"].as_float()
    scores.attributes["alpha"] = ir.AttrFloat32("alpha", 2 * scale)
    result = verify(ir.load(FIXTURES / "p2_tiny.onnx"), model, mode="layers")
    assert not result.passed
    failed = {layer.node for layer in result.layers if not layer.passed}
    assert failed == {"/model/layers.6/Attention_162"}
    (layer,) = [layer for layer in result.layers if not layer.passed]
    wrong = {c.name for c in layer.checks if c.model == "candidate" and c.passed is False}
    # Only the decode scenarios run the fold; the prefill branch is GQA, untouched.
    assert wrong == {"decode", "batch_decode"}


@pytest.mark.parametrize("shift", [-1, 1])
def test_a_fold_whose_window_is_off_by_one_fails_its_layer_proofs(shift: int) -> None:
    # A defective export (P2 bias with is_causal=1): the fold builds its own mask, key j
    # visible iff seqlens_k - j < W (GraphInputs.fold_bias).
    model = _folded("p2_causal_tiny")
    (less,) = [n for n in model.graph if n.op_type == "Less" and n.name.startswith("node_")]
    window = less.inputs[1]
    constant = window.producer()
    assert constant is not None and constant.op_type == "Constant"
    assert int(constant.attributes["value"].as_tensor().numpy()) == 4
    constant.attributes["value"] = ir.AttrTensor(
        "value", ir.tensor(np.array(4 + shift, dtype=np.int32))
    )
    _assert_sliding_layers_fail(model, "p2_causal_tiny")


def _assert_sliding_layers_fail(
    model: ir.Model, name: str, scenarios: frozenset[str] = frozenset({"decode", "batch_decode"})
) -> None:
    result = verify(ir.load(FIXTURES / f"{name}.onnx"), model, mode="layers")
    assert not result.passed
    failed = {layer.node for layer in result.layers if not layer.passed}
    sliding = {layer.node for layer in result.layers if "W=4" in layer.config}
    # The two sliding layers share the mask; the full layer has no window.
    assert len(sliding) == 2 and failed == sliding
    for layer in result.layers:
        if layer.node in failed:
            wrong = {c.name for c in layer.checks if c.model == "candidate" and not c.passed}
            assert wrong and wrong <= scenarios


def test_a_fold_over_the_export_bias_missing_a_window_key_fails_its_layer_proofs() -> None:
    # A correct export (P2, is_causal=0): the fold reads the export's own bias, sliced where
    # the window slice cuts the cache, from max(0, min_b(L_b) - W) (GQAInputs.window_start,
    # which builds min L_b - S - W + 1 as (min L_b - 1) - S - (W - 2)). One key later drops a
    # key the window still shows.
    model = _folded("p2_tiny")
    (offset,) = [
        n
        for n in model.graph
        if n.op_type == "Constant"
        and n.attributes.get("value_ints") is not None
        and list(n.attributes["value_ints"].as_ints()) == [4 - 2]
        and any(user.op_type == "Sub" and index == 1 for user, index in n.outputs[0].uses())
    ]
    offset.attributes["value_ints"] = ir.AttrInt64s("value_ints", [4 - 3])
    # GQA's chunks after a past read the same window slice.
    _assert_sliding_layers_fail(model, "p2_tiny", frozenset({"decode", "batch_decode", "chunk"}))


def test_the_cli_default_folds_kv_shared_layers_on_cpu_without_timing(tmp_path: Path) -> None:
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    argv = [str(FIXTURES / "p1_tiny.onnx"), str(out), "--quiet", "--report", str(report_path)]
    assert cli.main(argv) == 0
    report = json.loads(report_path.read_text())
    # Which form each layer got, and why.
    assert {r["speed_form"] for r in report["rewrites"]} == {FOLD_ON_CPU.label}
    assert {r["speed_reason"] for r in report["rewrites"]} == {FOLD_ON_CPU.reason}
    assert report["verification"]["passed"] is True
    assert all(not entry["timed"] for entry in report["speed"]["layers"])
    metadata = {p.key: p.value for p in onnx.load(out).metadata_props}
    recorded = json.loads(metadata[SPEED_KEY])["layers"]
    assert {(e["chosen"], e["timed"], e["reason"]) for e in recorded} == {
        (FOLD_ON_CPU.label, False, FOLD_ON_CPU.reason)
    }
