"""Speculative-decoding drafters (issue 22 part 2) on the generator's drafter
(fixtures/drafter_like.py): every layer borrows the target's cache from graph inputs, the
token input is ``inputs_embeds``. Every layer becomes the fold at any S, with no If: the full
layer (no mask, is_causal=0) without a mask, the sliding layers with the export's own bias
repeated over the folded heads. Each proof covers every scenario, a corrupted fold fails its
own layer's proof, the rewritten model computes what the original computes for batched calls
of several tokens (what GroupQueryAttention refuses after a past), and the verifier drives
the drafter's own inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from rewriter import cli, rewrite
from rewriter.fixtures.drafter_like import DrafterConfig, build_drafter
from rewriter.rules import always_past
from rewriter.rules._speed_choice import SPEED_FORM_KEY
from rewriter.verification import verify
from rewriter.verification._tolerance import compare

# Every scenario of a layer proof (rewriter.verification._layer_reference.scenarios).
_SCENARIOS = {"prefill", "decode", "chunk", "batch_prefill", "batch_decode"}
_FULL_LAYER = 3  # layer types s s s F


def _drafter(**overrides) -> ir.Model:
    return ir.serde.deserialize_model(build_drafter(DrafterConfig(**overrides)))


def _rewritten(**overrides) -> tuple[ir.Model, ir.Model]:
    original = _drafter(**overrides)
    model, report = rewrite(_drafter(**overrides), choose_form=always_past)
    assert report.rewritten == 4 and not report.skipped
    styles = {int(r.node.split("/")[2].split(".")[1]): r.mask_style for r in report.rewrites}
    assert styles == {0: "export", 1: "export", 2: "export", _FULL_LAYER: "none"}
    assert {(r.speed_form, r.form) for r in report.rewrites} == {("fold", "fold")}
    return original, model


def _fold_scores(model: ir.Model, layer: int) -> ir.Node:
    """The float32 fold's Q K^T product (rules._speed_choice.fold_product): query, key cache,
    and the scale."""
    (scores,) = [
        n
        for n in model.graph
        if n.metadata_props.get(SPEED_FORM_KEY) == "fold"
        and n.op_type == "FusedMatMul"
        and n.name.startswith(f"/model/layers.{layer}/")
    ]
    assert scores.domain == "com.microsoft"
    return scores


def _fold_ops_after(scores: ir.Node) -> list[ir.Node]:
    """The fold's nodes from its scores to its P V product: [Add (the bias)?, Softmax, MatMul]."""
    chain = []
    node = scores
    while node.op_type != "MatMul":
        (node,) = {user for user, _ in node.outputs[0].uses()}
        chain.append(node)
    return chain


def test_every_layer_becomes_one_fold_without_an_if() -> None:
    _, model = _rewritten()
    assert not [n for n in model.graph if n.op_type in ("If", "GroupQueryAttention")]
    full = _fold_scores(model, _FULL_LAYER)
    # No mask, no causal mask: exact at any S (rules._speed_choice.fold_unmasked).
    assert [n.op_type for n in _fold_ops_after(full)] == ["Softmax", "MatMul"]
    # It reads the target's cache, a graph input, in place.
    values = _fold_ops_after(full)[-1]
    assert [full.inputs[1].name, values.inputs[1].name] == [
        "shared_kv.full_attention.key",
        "shared_kv.full_attention.value",
    ]
    for layer in range(_FULL_LAYER):
        sliding = _fold_scores(model, layer)
        after = _fold_ops_after(sliding)
        # The export's bias [B, 1, S, T], repeated over the folded heads, added to the scores.
        assert [n.op_type for n in after] == ["Add", "Softmax", "MatMul"]
        assert [sliding.inputs[1].name, after[-1].inputs[1].name] == [
            "shared_kv.sliding_attention.key",
            "shared_kv.sliding_attention.value",
        ]


@pytest.mark.parametrize(("num_heads", "kv_num_heads"), [(4, 2), (4, 1), (2, 2)])
def test_the_fold_is_proven_in_every_scenario(num_heads: int, kv_num_heads: int) -> None:
    original, model = _rewritten(num_heads=num_heads, kv_num_heads=kv_num_heads)
    result = verify(original, model, mode="layers")
    assert result.passed, result.summary()
    assert len(result.layers) == 4
    for layer in result.layers:
        assert not layer.reason
        ran = {c.name for c in layer.checks if c.model == "candidate" and c.passed is True}
        assert ran == _SCENARIOS, layer.summary()
    configs = {layer.node.split("/")[2]: layer.config for layer in result.layers}
    # The sliding layers are proven at their window (4), the full one as non-causal.
    assert configs["layers.0"].endswith("W=4, scale 1, float32"), configs
    assert "full non-causal" in configs[f"layers.{_FULL_LAYER}"], configs


def _with_boolean_masks(model: ir.Model) -> ir.Model:
    """The drafter with each sliding layer's bias replaced by the boolean mask it was made
    from (``Unsqueeze(Where(mask, 0, lowest))`` -> ``Unsqueeze(mask)``), which ONNX Attention
    takes as well (True: attend)."""
    for node in list(model.graph):
        if node.op_type != "Attention" or len(node.inputs) < 4 or node.inputs[3] is None:
            continue
        unsqueeze = node.inputs[3].producer()
        assert unsqueeze is not None and unsqueeze.op_type == "Unsqueeze"
        where = unsqueeze.inputs[0].producer()
        assert where is not None and where.op_type == "Where"
        boolean = ir.node("Unsqueeze", [where.inputs[0], unsqueeze.inputs[1]])
        boolean.outputs[0].name = f"{node.name}/boolean_mask"
        model.graph.insert_before(node, boolean)
        node.replace_input_with(3, boolean.outputs[0])
    return model


def test_a_boolean_mask_is_folded_and_proven() -> None:
    # The float32 fold adds its mask to the scores (rules._speed_choice.fold_product): a
    # boolean mask becomes Where(mask, 0, lowest) first, as ORT's Attention reads it.
    original = _with_boolean_masks(_drafter())
    model, report = rewrite(_with_boolean_masks(_drafter()), choose_form=always_past)
    assert report.rewritten == 4 and not report.skipped
    for layer in range(_FULL_LAYER):
        after = _fold_ops_after(_fold_scores(model, layer))
        assert [n.op_type for n in after] == ["Add", "Softmax", "MatMul"]
        converted = after[0].inputs[1].producer()
        assert converted is not None and converted.op_type == "Where"
    result = verify(original, model, mode="layers")
    assert result.passed, result.summary()
    assert len(result.layers) == 4


def _corrupt_scale(model: ir.Model, layer: int) -> None:
    scores = _fold_scores(model, layer)
    scale = scores.attributes["alpha"].as_float()
    scores.attributes["alpha"] = ir.AttrFloat32("alpha", 2 * scale)


def _swap_key_value(model: ir.Model, layer: int) -> None:
    scores = _fold_scores(model, layer)
    values = _fold_ops_after(scores)[-1]
    key, value = scores.inputs[1], values.inputs[1]
    scores.replace_input_with(1, value)
    values.replace_input_with(1, key)


@pytest.mark.parametrize("layer", [0, _FULL_LAYER])
@pytest.mark.parametrize("corrupt", [_corrupt_scale, _swap_key_value])
def test_a_corrupted_fold_fails_its_own_proof(corrupt, layer: int) -> None:
    original, model = _rewritten()
    corrupt(model, layer)
    result = verify(original, model, mode="layers")
    assert not result.passed
    failed = [entry for entry in result.layers if not entry.passed]
    assert [entry.node.split("/")[2] for entry in failed] == [f"layers.{layer}"]
    wrong = {c.name for c in failed[0].checks if c.model == "candidate" and c.passed is False}
    # Every scenario runs the fold: there is no other branch.
    assert wrong == _SCENARIOS, failed[0].summary()


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize(("batch", "length", "total"), [(1, 1, 9), (2, 1, 9), (2, 3, 9), (2, 5, 5)])
def test_the_rewritten_drafter_runs_every_call_the_original_runs(
    batch: int, length: int, total: int
) -> None:
    # B=2 with S=3 after 6 cached keys: GroupQueryAttention refuses it, the fold does not.
    original, model = _rewritten()
    cfg = DrafterConfig()
    rng = np.random.default_rng(7)
    feeds = {
        "inputs_embeds": rng.standard_normal((batch, length, cfg.hidden_size)).astype(np.float32),
        "position_ids": np.tile(np.arange(total - length, total), (batch, 1)),
        "attention_mask": np.ones((batch, total), dtype=np.int64),
    }
    for kind, dim in (("sliding", cfg.sliding_head_dim), ("full", cfg.full_head_dim)):
        for part in ("key", "value"):
            shape = (batch, cfg.kv_num_heads, total, dim)
            feeds[f"shared_kv.{kind}_attention.{part}"] = rng.standard_normal(shape).astype(
                np.float32
            )
    case = compare("logits", _run(original, feeds), _run(model, feeds))
    assert case.passed, case


def test_the_cli_rewrites_and_verifies_a_drafter(tmp_path: Path) -> None:
    source, out, report_path = tmp_path / "drafter.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    ir.save(_drafter(), source)
    argv = [str(source), str(out), "--quiet", "--report", str(report_path)]
    assert cli.main(argv) == 0
    report = json.loads(report_path.read_text())
    assert report["rewritten"] == 4
    assert report["padding_contract"] == "unchanged"
    assert not report["warnings"]
    verification = report["verification"]
    assert verification["passed"] is True, verification
    checks = {(c["name"], c["model"]): c for c in verification["checks"]}
    # The drafter has no cache of its own: prefill equivalence over its own inputs, and
    # batch consistency; no decode chain.
    assert checks[("prefill_equivalence", "candidate")]["passed"] is True
    assert checks[("cache_consistency", "candidate")]["skipped"] is True
    # The original's full layer reads the padding keys of a padded row's cache (no mask):
    # the verifier names that cause, and the rewrite keeps it exactly.
    (defect,) = verification["defects"]
    assert defect["check"] == "batch_consistency"
    assert "no mask and is_causal=0" in defect["description"]
    original_batch = checks[("batch_consistency", "original")]
    candidate_batch = checks[("batch_consistency", "candidate")]
    assert candidate_batch["max_abs_diff"] <= original_batch["max_abs_diff"]
    assert out.exists()
