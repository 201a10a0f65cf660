"""Smoke test of the benchmark: ``python bench/run.py --quick`` runs and writes its results.

Only the structure of the JSON is checked, never a timing: timings on a shared CI machine
prove nothing, and the numbers that matter are in bench/results/ (bench/README.md says
which file is current).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"

pytestmark = pytest.mark.skipif(not RUN.exists(), reason="bench/ is not part of this tree")


def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    done = subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--quick",
            "--json",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())

    for key in (
        "decode_ratio_t1024",
        "decode_ratio_t4096",
        "decode_ratio_t8192",
        "prefill_ratio_s2048",
        "all_attention_max_ratio",
        "rewrite_seconds",
        "rewrite_peak_rss_mb",
        "machine",
        "date",
    ):
        assert key in result, key
    assert result["quick"] is True
    assert result["all_attention_max_ratio"] is None  # the tiny workload is not all-Attention
    for key in (
        "decode_ratio_t1024",
        "decode_ratio_t4096",
        "decode_ratio_t8192",
        "prefill_ratio_s2048",
        "rewrite_seconds",
        "rewrite_peak_rss_mb",
    ):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert set(result["latency"]) == {
        "prefill_s512",
        "prefill_s2048",
        "decode_t1024",
        "decode_t4096",
        "decode_t8192",
    }
    for scenario in result["latency"].values():
        assert {"original", "rewritten", "speed-off"} <= set(scenario["models"])
        for row in scenario["models"].values():
            assert row["repeats"] == len(row["samples_ms"]) > 0
    for per_model in result["profile"].values():
        assert "attention: shared sliding" in per_model["original"]["ms_by_category"]
        # Whatever form the CLI's probe chose, its nodes are named after their layer.
        for name, profile in per_model.items():
            assert "attention: shared full" in profile["ms_by_category"], name
            assert "attention: unknown layer" not in profile["ms_by_category"], name
    assert set(result["decode_rss"]["models"]) >= {"original", "rewritten"}
    assert result["verify"]["passed"] is True
    nodes = result["nodes"]
    # The library default rewrites every KV-shared Attention of the tiny model; what the
    # CLI's default does there depends on what it measured on this machine.
    assert nodes["speed-off"]["removed"]["Attention"] == nodes["original"]["Attention"] == 3
    assert out.with_suffix(".md").read_text().startswith("Command: `python bench/run.py")
