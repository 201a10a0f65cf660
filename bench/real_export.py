"""A real exporter's model against its rewrite: decode and prefill latency, interleaved.

    python bench/real_export.py ORIGINAL.onnx REWRITTEN.onnx \
        --json bench/results/results_real_e2b.json
    python bench/real_export.py ORIGINAL.onnx REWRITTEN.onnx --also keep_own=OTHER.onnx ...

For exports outside the fixture generator, e.g. a mobius Gemma 4 at E2B attention size
(``scripts/mobius_e2b.py``), rewritten with the CLI's default. Both sessions get ORT's default
options; calls alternate call by call with a pause before each (``bench.timing``); a decode
step at total length T has a past of T - 1 random cache entries, batch 1. Each results file
records the onnxruntime version, the commit, the command, the date and the machine's load
before and after, and per scenario the medians, the ratio of the medians and the min / max
of the per-round ratios (rewritten call / original call of the same round).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.inference import Scenario, measure_latency
from bench.provenance import commit

__all__ = ["main"]

SCENARIOS = {
    "decode_t1024": Scenario("decode_t1024", 1, 1024, 20),
    "decode_t4096": Scenario("decode_t4096", 1, 4096, 20),
    "decode_t8192": Scenario("decode_t8192", 1, 8192, 15),
    "prefill_s512": Scenario("prefill_s512", 512, 512, 5),
    "prefill_s2048": Scenario("prefill_s2048", 2048, 2048, 3),
}


def _round_ratios(result: dict, model: str = "rewritten") -> dict[str, float]:
    original = np.array(result["models"]["original"]["samples_ms"])
    rewritten = np.array(result["models"][model]["samples_ms"])
    ratios = rewritten / original
    return {
        "ratio_of_medians": result["models"][model]["ratio_to_original"],
        "round_ratio_min": float(ratios.min()),
        "round_ratio_max": float(ratios.max()),
    }


def _named_model(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or name in ("original", "rewritten"):
        raise argparse.ArgumentTypeError(f"expected NAME=PATH with a new NAME, got {text!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original", type=Path)
    parser.add_argument("rewritten", type=Path)
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--vocab-size", type=int, default=2048, help="token ids drawn below it")
    parser.add_argument(
        "--also",
        type=_named_model,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another rewrite of the same original, timed in the same interleaved rounds",
    )
    args = parser.parse_args(argv)
    names = args.scenarios or list(SCENARIOS)
    load_before = os.getloadavg()
    others = dict(args.also)
    results = measure_latency(
        {"original": args.original, "rewritten": args.rewritten, **others},
        [SCENARIOS[name] for name in names],
        provider="cpu",
        vocab_size=args.vocab_size,
    )
    summary = {name: _round_ratios(result) for name, result in results.items()}
    also = {
        other: {name: _round_ratios(result, other) for name, result in results.items()}
        for other in others
    }
    record = {
        "onnxruntime": ort.__version__,
        "commit": commit(),
        "command": " ".join(["python", "bench/real_export.py", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "original": str(args.original),
        "rewritten": str(args.rewritten),
        "also": {name: str(path) for name, path in others.items()},
        "summary": summary,
        "summary_also": also,
        "scenarios": results,
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    for model, table in {"rewritten": summary, **also}.items():
        for name, cells in table.items():
            print(
                f"{name}: {model}/original {cells['ratio_of_medians']:.3f} "
                f"(rounds {cells['round_ratio_min']:.3f}-{cells['round_ratio_max']:.3f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
