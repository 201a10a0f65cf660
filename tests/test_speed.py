"""Speed-aware choice (rewriter.speed): the export's KV-shared layer is kept where it is
correct and measured faster; a defective export is always rewritten."""

from __future__ import annotations

import json
from pathlib import Path

import onnx_ir as ir
import pytest
from onnxscript.rewriter import pattern

from rewriter import cli, rewrite
from rewriter.rules import KVSharedAttentionToGQA, LayerKind, RewriteLog, RuleLog
from rewriter.speed import SpeedProbe

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _apply(keep_export, name: str) -> RuleLog:
    """The KV-shared rule alone on a fixture; what it logged."""
    log = RewriteLog()
    rule = KVSharedAttentionToGQA.rule(keep_export=keep_export, log=log)
    pattern.RewriteRuleSet([rule]).apply_to_model(ir.load(FIXTURES / f"{name}.onnx"))
    return log.rule(KVSharedAttentionToGQA.__name__)


def test_a_correct_export_is_kept_where_the_keeper_says_so() -> None:
    asked: list[LayerKind] = []

    def keep(kind: LayerKind) -> str:
        asked.append(kind)
        return "kept as exported, faster: test"

    logged = _apply(keep, "p2_tiny")
    assert logged.rewrites == []
    assert {skip.reason for skip in logged.skips.values()} == {"kept as exported, faster: test"}
    # What the layer's speed depends on, read off the layer (sliding D=8 W=4, full D=16).
    assert {(k.head_size, k.local_window_size, k.num_heads, k.kv_num_heads) for k in asked} == {
        (8, 4, 4, 1),
        (16, None, 4, 1),
    }


@pytest.mark.parametrize("name", ["p1_tiny", "p2_causal_tiny"])
def test_a_defective_export_is_rewritten_whatever_the_timing(name: str) -> None:
    # is_causal=1 without past is wrong in decode: keeping it would keep the bug.
    def keep(kind: LayerKind) -> str:
        raise AssertionError("a defective export must not even be timed")

    assert len(_apply(keep, name).rewrites) == 3


def test_probe_decides_by_the_generation_it_measured() -> None:
    probe = SpeedProbe(decode_length=256, prefill_length=64, decode_steps=32, repeats=(5, 2))
    layer = LayerKind("float32", 4, 1, 16, None, scale=1.0, softcap=0.0)
    verdict = probe(layer)
    assert probe(layer) is verdict  # measured once per layer kind
    for timings in (verdict.original_ms, verdict.gqa_ms):
        assert set(timings) == {"decode", "prefill"} and min(timings.values()) > 0
    cost = {
        name: ms["prefill"] + 32 * ms["decode"]
        for name, ms in (("original", verdict.original_ms), ("gqa", verdict.gqa_ms))
    }
    assert verdict.keep_original == (cost["gqa"] > 1.1 * cost["original"])
    assert verdict.reason.startswith("kept as exported" if verdict.keep_original else "one")
    assert probe.tables()[0]["layer"]["head_size"] == 16
    assert probe.keep_export(layer) == (verdict.reason if verdict.keep_original else None)


def test_cli_reports_the_timings_its_choices_rest_on(tmp_path: Path) -> None:
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    argv = [str(FIXTURES / "p2_tiny.onnx"), str(out), "--quiet", "--report", str(report_path)]
    assert cli.main([*argv, "--speed", "auto"]) == 0
    report = json.loads(report_path.read_text())
    verdicts = {
        (entry["layer"]["head_size"], entry["layer"]["local_window_size"]): entry
        for entry in report["speed"]["layers"]
    }
    assert set(verdicts) == {(8, 4), (16, None)}
    kept = {skip["reason"] for skip in report["skipped"]}
    for entry in verdicts.values():
        assert (entry["reason"] in kept) == entry["keep_original"]
    assert report["rewritten"] + len(report["skipped"]) == 3
    assert report["verification"]["passed"] is True


def test_defaults_do_not_time(tmp_path: Path) -> None:
    _, report = rewrite(ir.load(FIXTURES / "p2_tiny.onnx"))
    assert report.speed is None and report.rewritten == 3
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    argv = [str(FIXTURES / "p2_tiny.onnx"), str(out), "--quiet", "--no-verify"]
    assert cli.main([*argv, "--report", str(report_path)]) == 0
    report_data = json.loads(report_path.read_text())
    assert report_data["speed"] is None and report_data["rewritten"] == 3
