"""The transformers exporter's batch-2, multi-token decode pair at tiny size (issue 22, item 4;
``python -m rewriter.fixtures.hf_export`` writes it): the rewrite keeps what the original
runs, a batch of 2 with several new tokens after a past, without the corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from decoder_runs import chained_hf_logits

from rewriter import cli
from rewriter.fixtures.hf_export import TRANSFORMERS_BATCHED_PAIR
from rewriter.verification._tolerance import compare

PAIR = Path(__file__).resolve().parent.parent / "fixtures" / TRANSFORMERS_BATCHED_PAIR
WINDOW = 8  # the fixture's sliding window (fixtures/hf_export.py)


def test_decode_graph_keeps_batched_chunks_and_verifies(tmp_path: Path) -> None:
    out, report_path = tmp_path / "decode.onnx", tmp_path / "report.json"
    assert cli.main([str(PAIR / "decode.onnx"), str(out), "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    chunks = [record["batched_chunks"] for record in report["rewrites"]]
    assert chunks.count("query_seqlens") == 4
    assert chunks.count("if(B==1 or S==1 or S==T: past, else: split with query_seqlens)") == 4
    checks = {(c["name"], c["model"]): c for c in report["verification"]["checks"]}
    for role in ("original", "candidate"):
        batch = checks[("batch_consistency", role)]
        assert batch["passed"] is True and "chunk of 3 tokens at batch 2" in batch["detail"]
    assert report["verification"]["passed"] is True


def test_batch2_chunks_past_the_window_match_the_original(tmp_path: Path) -> None:
    for graph in ("prefill", "decode"):
        argv = [str(PAIR / f"{graph}.onnx"), str(tmp_path / f"{graph}.onnx"), "--quiet"]
        assert cli.main([*argv, "--no-verify"]) == 0
    pairs = {
        "original": (PAIR / "prefill.onnx", PAIR / "decode.onnx"),
        "rewritten": (tmp_path / "prefill.onnx", tmp_path / "decode.onnx"),
    }
    tokens = np.random.default_rng(0).integers(0, 128, (2, 32))
    lengths = (5, 3, 1, 4, 3)  # B=2 prefill, then chunks and a single step, past W=8
    logits = {
        label: chained_hf_logits(paths, tokens, lengths, WINDOW) for label, paths in pairs.items()
    }
    assert sum(lengths) > WINDOW
    for step, (reference, actual) in enumerate(
        zip(logits["original"], logits["rewritten"], strict=True)
    ):
        assert reference.shape[:2] == (2, lengths[step])
        case = compare(f"call {step}", reference, actual)
        assert case.passed, case
