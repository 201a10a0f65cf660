"""What the verdict claims (issue 21): a candidate that ONNX Runtime refuses to run never
passes, a layer without its own proof is said to rest on the whole-model check, and the
default console is short enough to read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from rewriter import cli
from rewriter.metadata import VERIFICATION_KEY

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
P1 = FIXTURES / "p1_tiny.onnx"
HF_PREFILL = FIXTURES / "hf_transformers_s1_decode" / "prefill.onnx"


def test_a_candidate_onnx_runtime_cannot_run_fails_even_where_the_original_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The `kv` form errors in decode; the P1 original fails decode too (upper-left), which
    used to excuse the candidate. An error is never excused by a different defect."""
    out = tmp_path / "out.onnx"
    argv = [str(P1), str(out), "--form", "kv", "--force", "--speed", "off"]
    assert cli.main(argv) == 1
    assert not out.exists()
    err = capsys.readouterr().err
    assert "cache_consistency: ONNX Runtime cannot run the candidate" in err
    assert "query and key must have the same sequence length" in err
    assert err.strip().endswith("verdict: FAILED")


def test_layers_without_a_proof_say_the_verdict_rests_on_the_whole_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    assert cli.main([str(HF_PREFILL), str(out), "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    layers = report["verification"]["layers"]
    assert layers and not any(layer["passed"] for layer in layers)
    claim = f"on the whole model only for {len(layers)} layer(s); 0 of {len(layers)} layers proven"
    assert report["verification"]["rests_on"] == claim
    assert f"verdict: PASSED ({claim})" in capsys.readouterr().out
    assert json.loads(ir.load(out).metadata_props[VERIFICATION_KEY])["rests_on"] == claim
    # Every check the verdict rests on held at its fixed tolerance: nothing within a spread.
    assert not any(c.get("within_spread") for c in report["verification"]["checks"])


def test_without_the_whole_model_check_unproven_layers_fail(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert cli.main([str(HF_PREFILL), str(out), "--verify", "layers", "--quiet"]) == 1
    assert not out.exists()


def test_default_console_is_one_line_per_layer_and_one_per_defect_class(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "rewriter", str(P1), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    # header, layer table (title + 3 layers), whole model, defects (title + 2 classes),
    # verdict, wrote
    assert len(lines) == 11, result.stdout
    assert [line.split()[0] for line in lines[2:5]] == [
        "/model/layers.4/Attention_116",
        "/model/layers.5/Attention_132",
        "/model/layers.6/Attention_157",
    ]
    assert all(" proven " in line for line in lines[2:5])
    defects = [line for line in lines if line.startswith("  ")]
    assert len(defects) == 2 and all("(fixed by the rewrite)" in line for line in defects)
    assert lines[-2].startswith("verdict: PASSED (3 of 3 layers proven")
    # Progress: one line per layer and step, not per case.
    assert not any(line.startswith("  verifying:     ") for line in result.stderr.splitlines())


def test_verbose_prints_every_check(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "rewriter", str(P1), str(out), "--verbose"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "FAIL cache_consistency [original]" in result.stdout
    assert "PASS prefill_equivalence [candidate]" in result.stdout
    assert "PASS decode [candidate]" in result.stderr  # a layer's case, in the progress


def test_report_dash_writes_the_json_to_standard_output(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "rewriter", str(P1), str(out), "--report", "-"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rewritten"] == 3 and report["verification"]["passed"] is True
    assert "verdict: PASSED" in result.stderr
    assert not (Path.cwd() / "-").exists()


def _attention_inside_an_if(path: Path) -> str:
    """p2_tiny with its first KV-shared Attention moved into both branches of an If."""
    model = ir.load(FIXTURES / "p2_tiny.onnx")
    attention = next(node for node in model.graph if node.op_type == "Attention")
    output = attention.outputs[0]

    def branch(name: str) -> ir.Graph:
        inner = ir.node(
            "Attention",
            list(attention.inputs),
            attributes={key: attr.value for key, attr in attention.attributes.items()},
            name=f"{attention.name}_{name}",
        )
        inner.outputs[0].name = f"{output.name}_{name}"
        return ir.Graph([], [inner.outputs[0]], nodes=[inner], name=name)

    condition = ir.Value(name="branch_condition", const_value=ir.tensor(np.array(True)))
    condition.shape, condition.dtype = condition.const_value.shape, condition.const_value.dtype
    model.graph.register_initializer(condition)
    layer_if = ir.node(
        "If",
        [condition],
        attributes={"then_branch": branch("then"), "else_branch": branch("else")},
        name="layer_if",
    )
    model.graph.insert_after(attention, layer_if)
    output.replace_all_uses_with(layer_if.outputs[0])
    model.graph.remove(attention, safe=True)
    layer_if.outputs[0].name = output.name
    ir.save(model, path)
    return attention.name


def test_an_attention_inside_an_if_is_left_alone_with_its_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rewriting it and then refusing to write would leave --no-verify as the only way out."""
    source, out = tmp_path / "if.onnx", tmp_path / "out.onnx"
    name = _attention_inside_an_if(source)
    report_path = tmp_path / "report.json"
    assert cli.main([str(source), str(out), "--report", str(report_path), "--speed", "off"]) == 0
    report = json.loads(report_path.read_text())
    skipped = {entry["node"]: entry["reason"] for entry in report["skipped"]}
    assert set(skipped) == {f"{name}_then", f"{name}_else"}
    assert all(reason.startswith("inside a subgraph") for reason in skipped.values())
    assert report["rewritten"] == 2 and report["verification"]["passed"] is True
    branches = next(n for n in ir.load(out).graph if n.op_type == "If").attributes
    for key in ("then_branch", "else_branch"):
        assert [n.op_type for n in branches[key].as_graph()] == ["Attention"]
