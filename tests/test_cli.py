"""The command line's main flows: rewrite+verify, verify, probe, forms (exit codes, files)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from rewriter import cli
from rewriter import rewrite as library_rewrite

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "fixtures"
P1 = FIXTURE_DIR / "p1_tiny.onnx"
P2 = FIXTURE_DIR / "p2_tiny.onnx"


def test_module_entry_point_rewrites_verifies_and_reports(tmp_path: Path) -> None:
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    before = P1.read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "rewriter", str(P1), str(out), "--report", str(report_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "rewritten: 3" in result.stdout and "verdict: PASSED" in result.stdout
    assert P1.read_bytes() == before
    onnx.checker.check_model(onnx.load(out), full_check=True)
    report = json.loads(report_path.read_text())
    assert report["rewritten"] == 3 and report["skipped"] == []
    assert {r["form"] for r in report["rewrites"]} == {"past"}
    assert set(report["rewrites"][0]) >= {"node", "rule", "form", "local_window_size"}
    verification = report["verification"]
    assert verification["passed"] is True
    assert len(verification["original_defects"]) == 2  # P1: decode and batch (SPEC.md 2)
    assert report["probe"]["tables"][0]["ort_version"]


def test_failed_verification_exits_1_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def rewrite_with_wrong_window(model, **options):
        model, report = library_rewrite(model, **options)
        for node in model.graph:
            if node.op_type == "GroupQueryAttention" and "local_window_size" in node.attributes:
                node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", 5)
        return model, report

    monkeypatch.setattr(cli, "rewrite", rewrite_with_wrong_window)
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    # --speed off: every sliding layer is GQA, so the wrong window lands in each of them.
    argv = [str(P2), str(out), "--report", str(report_path), "--quiet", "--speed", "off"]
    code = cli.main(argv)
    assert code == 1
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [report_path]  # no staging leftovers
    err = capsys.readouterr().err
    assert "whole model: FAIL prefill " in err
    assert "failed because: prefill equivalence with the original does not hold" in err
    assert json.loads(report_path.read_text())["verification"]["passed"] is False


def test_no_verify_is_said_in_the_report(tmp_path: Path) -> None:
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    assert cli.main([str(P2), str(out), "--no-verify", "--report", str(report_path)]) == 0
    assert json.loads(report_path.read_text())["verification"] == {"skipped": "--no-verify"}


def test_nothing_to_rewrite_writes_an_unchanged_copy(tmp_path: Path) -> None:
    first, second = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    # --speed off: whether the first pass keeps a layer must not hang on timing.
    assert cli.main([str(P2), str(first), "--quiet", "--speed", "off"]) == 0
    report_path = tmp_path / "r.json"
    argv = [str(first), str(second), "--quiet", "--speed", "off", "--report", str(report_path)]
    assert cli.main(argv) == 0
    report = json.loads(report_path.read_text())
    assert report["rewritten"] == 0
    assert report["verification"] == {"skipped": cli._NOTHING_REWRITTEN}
    assert onnx.load(second).graph == onnx.load(first).graph


def test_nothing_to_rewrite_in_a_defective_original_is_written(tmp_path: Path) -> None:
    # --layers shared on the P1 fixture after its shared layers were made unmatchable: the
    # original's decode and batch defects must not stop an honest no-op.
    model = ir.load(P1)
    for node in model.graph:
        if node.op_type == "Attention":
            node.attributes["softcap"] = ir.AttrFloat32("softcap", 0.0)
            node.attributes["is_causal"] = ir.AttrInt64("is_causal", 0)
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    ir.save(model, source)
    report_path = tmp_path / "r.json"
    assert cli.main([str(source), str(out), "--quiet", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["rewritten"] == 0 and len(report["skipped"]) == 3
    assert all("causal" in skip["reason"] for skip in report["skipped"])
    assert onnx.load(out).graph == onnx.load(source).graph


def test_form_past_present_verifies(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert cli.main([str(P2), str(out), "--form", "past-present", "--quiet"]) == 0
    gqa = [n for n in onnx.load(out).graph.node if n.op_type == "GroupQueryAttention"]
    # The 3 rewritten layers read a borrowed cache (sliced for the sliding ones), not a past.
    shared = [n for n in gqa if not n.input[3].startswith("past_key_values.")]
    assert len(shared) == 3 and all(len(n.output) == 3 for n in shared)


def test_forced_split_is_refused_with_the_probe_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.onnx"
    assert cli.main([str(P2), str(out), "--form", "split"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rejected by the probe" in err and "batch2-decode" in err
    assert not out.exists()


def test_verify_subcommand_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.onnx"
    # --speed off: the corruption below is of GQA nodes, which every rewritten layer then is.
    assert cli.main([str(P2), str(good), "--quiet", "--no-verify", "--speed", "off"]) == 0
    assert cli.main(["verify", str(P2), str(good), "--quiet"]) == 0

    corrupted = ir.load(good)
    for node in corrupted.graph:
        if node.op_type == "GroupQueryAttention":
            node.attributes["scale"] = ir.AttrFloat32("scale", 0.5)
    bad = tmp_path / "bad.onnx"
    ir.save(corrupted, bad)
    report_path = tmp_path / "verify.json"
    assert cli.main(["verify", str(P2), str(bad), "--quiet", "--report", str(report_path)]) == 1
    failed = [
        c["name"]
        for c in json.loads(report_path.read_text())["verification"]["checks"]
        if c["passed"] is False
    ]
    assert "prefill_equivalence" in failed

    assert cli.main(["verify", str(P2), str(tmp_path / "missing.onnx")]) == 2


def test_probe_subcommand_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["probe", "--dtypes", "float32", "--head-sizes", "64"]) == 0
    table = capsys.readouterr().out
    assert "past " in table and "split-nopresent" in table
    assert cli.main(["probe", "--dtypes", "float32", "--head-sizes", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["provider"] == "cpu" and data["verdicts"]


def test_cuda_without_a_gpu_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert cli.main([str(P2), str(tmp_path / "o.onnx"), "--provider", "cuda"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_a_model_the_pass_cannot_take_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    model = ir.load(P2)
    model.opset_imports["com.microsoft"] = 2
    source = tmp_path / "ms2.onnx"
    ir.save(model, source)
    out = tmp_path / "out.onnx"
    assert cli.main([str(source), str(out), "--no-verify"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "com.microsoft opset 2" in error
    assert "\n" not in error and not out.exists()


def _subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    (subcommands,) = (a for a in parser._actions if isinstance(a.choices, dict))
    return subcommands.choices


def test_every_argument_of_every_subcommand_has_help_text() -> None:
    parsers = _subcommand_parsers()
    assert set(parsers) == {"rewrite", "verify", "probe"}
    for name, parser in parsers.items():
        for action in parser._actions:
            assert action.help, f"{name}: {action.dest} has no help text"


@pytest.mark.parametrize(
    ("argv", "usage", "options"),
    [
        (["--help"], "usage: python -m rewriter [-h] [--version] SUBCOMMAND", ["rewrite"]),
        (["rewrite", "--help"], "usage: python -m rewriter [-h]", ["--speed", "--layers"]),
        (["IN.onnx", "OUT.onnx", "--help"], "usage: python -m rewriter [-h]", ["--speed"]),
        (["verify", "--help"], "usage: python -m rewriter verify [-h]", ["--decode"]),
        (["probe", "--help"], "usage: python -m rewriter probe [-h]", ["--head-sizes"]),
    ],
)
def test_help_of_each_subcommand(
    argv: list[str], usage: str, options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(usage)
    assert all(option in out for option in options)


def test_rewrite_subcommand_is_the_default(tmp_path: Path) -> None:
    options = ["--quiet", "--no-verify", "--speed", "off"]
    named, default = tmp_path / "named.onnx", tmp_path / "default.onnx"
    assert cli.main(["rewrite", str(P2), str(named), *options]) == 0
    assert cli.main([str(P2), str(default), *options]) == 0
    assert named.read_bytes() == default.read_bytes()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "error: python -m rewriter: the following arguments are required: input, output"),
        (["a.onnx", "b.onnx", "c.onnx"], "error: python -m rewriter: unrecognized arguments: c"),
        (["probe", "extra"], "error: python -m rewriter probe: unrecognized arguments: extra"),
        (["verify", "a.onnx"], "error: python -m rewriter verify: the following arguments are"),
    ],
)
def test_usage_errors_are_one_line_from_the_subcommand(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
