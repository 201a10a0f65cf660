"""The own-cache fold in a whole model (rules._speed_choice.own_cache_fold): what the CLI's
default gives every float32 layer with its own cache on CPU, proven layer by layer, and a
model whose every decode step follows the export's cache convention.

A failure here points at the own-cache fold or at the verifier's reading of it; the rule on
one layer is tested by tests/test_properties_own_cache_fold.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from rewriter.pipeline import rewrite
from rewriter.rules import SpeedChoice
from rewriter.speed import FOLD_ON_CPU
from rewriter.verification import verify

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ALL_ATTENTION = FIXTURES / "p2_all_attention_tiny.onnx"  # P2, every layer Attention


def _rewritten() -> ir.Model:
    model, report = rewrite(ir.load(ALL_ATTENTION), speed="auto")
    forms = {record.speed_form for record in report.rewrites}
    # Precondition: the CPU defaults of rewriter.speed.fixed_choice.
    assert forms == {"if(S==1: fold, else: gqa)"}
    return model


def _own_cache_ifs(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "If" and len(n.outputs) == 3]


def _reverse_concat(model: ir.Model) -> str:
    """The new key before the past in the first own-cache layer's decode branch."""
    phase_if = _own_cache_ifs(model)[0]
    branch = phase_if.attributes["then_branch"].as_graph()
    concat = next(n for n in branch if n.op_type == "Concat")
    past, new = concat.inputs
    concat.replace_input_with(0, new)
    concat.replace_input_with(1, past)
    return phase_if.outputs[0].name or ""


def _widen_window(model: ir.Model) -> str:
    """The first sliding own-cache layer's fold reads one key fewer than its window."""
    for phase_if in _own_cache_ifs(model):
        branch = phase_if.attributes["then_branch"].as_graph()
        slices = [n for n in branch if n.op_type == "Slice"]
        if slices:
            start = slices[0].inputs[1]
            assert start is not None
            one = ir.Value(name=f"{start.name}_plus_one")
            add = ir.node("Add", [start, ir.Value(name="one_i64")], outputs=[one])
            constant = ir.node(
                "Constant",
                [],
                {"value": ir.tensor(np.array([1], dtype=np.int64))},
                outputs=[add.inputs[1]],
            )
            branch.insert_before(slices[0], [constant, add])
            for node in slices:
                node.replace_input_with(1, one)
            return phase_if.outputs[0].name or ""
    raise AssertionError("no sliding own-cache layer")


@pytest.mark.parametrize(
    "corrupt",
    [pytest.param(_reverse_concat, id="concat-order"), pytest.param(_widen_window, id="window")],
)
def test_a_corrupted_own_cache_fold_is_refused_by_its_layer_proof(
    corrupt: Callable[[ir.Model], str],
) -> None:
    candidate = _rewritten()
    broken_output = corrupt(candidate)
    result = verify(ir.load(ALL_ATTENTION), candidate, mode="layers")
    assert not result.passed
    broken = [layer for layer in result.layers if not layer.passed]
    assert len(broken) == 1
    replaced = next(n for n in ir.load(ALL_ATTENTION).graph if n.outputs[0].name == broken_output)
    assert broken[0].node == replaced.name


def test_the_default_rewrite_is_proven_including_a_decode_step_after_the_padding() -> None:
    result = verify(ir.load(ALL_ATTENTION), _rewritten(), mode="layers")
    assert result.passed
    appended = [
        case
        for layer in result.layers
        for check in layer.checks
        for case in check.cases
        if "appended after the padding" in case.label and check.model == "candidate"
    ]
    # Every layer (its own cache: the fold over Concat; KV-shared: the fold over the export's
    # bias) takes the padded step as the export does, and is proven on it.
    takes_it = {
        layer.node
        for layer in result.layers
        if any("appended after the padding" in c.label for k in layer.checks for c in k.cases)
    }
    assert len(result.layers) == 7 and takes_it == {layer.node for layer in result.layers}
    assert appended and all(case.passed for case in appended)


def _decode_feeds(session: ort.InferenceSession, lengths: tuple[int, int], total: int) -> dict:
    """One batched decode step after a right-padded prompt, in the export's convention: a
    row's mask is its prompt, padding, then the new token at slot T - 1."""
    rng = np.random.default_rng(0)
    mask = np.zeros((2, total), dtype=np.int64)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        mask[row, total - 1] = 1
    feeds: dict[str, np.ndarray] = {
        "input_ids": rng.integers(0, 30, (2, 1)).astype(np.int64),  # the fixture's vocab: 37
        "attention_mask": mask,
        "position_ids": np.array([[lengths[0]], [lengths[1]]], dtype=np.int64),
    }
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            _, heads, _, head_size = value.shape
            feeds[value.name] = rng.standard_normal((2, heads, total - 1, head_size)).astype(
                np.float32
            )
    return feeds


def test_batched_decode_after_a_right_padded_prompt_equals_the_original() -> None:
    """Every layer of the default rewrite decodes in the export's convention (the own-cache
    fold appends after the padding, the KV-shared fold reads the export's bias), so a padded
    batch's decode step gives the original's logits and presents, where GroupQueryAttention
    (the new key right after a row's valid keys) could not."""
    original = ort.InferenceSession(str(ALL_ATTENTION), providers=["CPUExecutionProvider"])
    candidate = ort.InferenceSession(
        ir.to_proto(_rewritten()).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feeds = _decode_feeds(original, (7, 3), 9)
    names = [value.name for value in original.get_outputs()]
    expected, actual = original.run(None, feeds), candidate.run(None, feeds)
    for name, want, got in zip(names, expected, actual, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=name)


def test_the_export_prefill_variant_is_proven_too() -> None:
    """``If(S == 1: fold, else: export)``: the prefill branch the export's own node, a choice
    a caller's choose_speed may make (the CPU default prefills through GQA)."""
    keep_export_prefill = SpeedChoice("fold", "export", "test")
    model, report = rewrite(
        ir.load(ALL_ATTENTION),
        speed="auto",
        choose_speed=lambda kind: keep_export_prefill if kind.own_cache else FOLD_ON_CPU,
    )
    own = [r for r in report.rewrites if r.rule.startswith("NonShared")]
    assert len(own) == 4 and {r.speed_form for r in own} == {keep_export_prefill.label}
    prefill = _own_cache_ifs(model)[0].attributes["else_branch"].as_graph()
    assert [n.op_type for n in prefill] == ["Attention"]
    result = verify(ir.load(ALL_ATTENTION), model, mode="layers")
    assert result.passed and len(result.layers) == 7
