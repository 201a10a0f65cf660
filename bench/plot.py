"""Decode-step latency against the total length T, one line per model, from a bench JSON.

    python bench/plot.py bench/results/results.json bench/results/decode_latency_vs_t.png

Needs matplotlib (not a dependency of the package: ``pip install matplotlib``). Points are
the medians of the interleaved calls, bars half the interquartile range, as in the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/plot.py", description=__doc__)
    parser.add_argument("results", type=Path, help="a JSON written by bench/run.py")
    parser.add_argument("png", type=Path, help="where to write the plot")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    result = json.loads(args.results.read_text())
    decode = sorted(
        (scenario for scenario in result["latency"].values() if scenario["phase"] == "decode"),
        key=lambda scenario: scenario["total_length"],
    )
    if not decode:
        parser.error(f"{args.results} has no decode scenarios")
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for model in decode[0]["models"]:
        lengths = [scenario["total_length"] for scenario in decode]
        rows = [scenario["models"][model] for scenario in decode]
        axes.errorbar(
            lengths,
            [row["median_ms"] for row in rows],
            yerr=[row["iqr_ms"] / 2 for row in rows],
            marker="o",
            capsize=3,
            label=model,
        )
    machine = result.get("machine", {})
    runtime = f"onnxruntime {machine.get('onnxruntime', '?')} ({machine.get('provider', '?')})"
    axes.set_title(f"Decode step, {result.get('workload', {}).get('name', '')}: {runtime}")
    axes.set_xlabel("total length T (past + 1)")
    axes.set_ylabel(f"median {result.get('clock', 'wall')} per step (ms)")
    axes.set_xscale("log", base=2)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
