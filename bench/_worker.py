"""Measurements that need a process of their own (peak memory), one per invocation.

    python -m bench._worker decode-rss MODEL --total-length T
    python -m bench._worker pass MODEL OUT
    python -m bench._worker optimize MODEL OUT
    python -m bench._worker verify ORIGINAL CANDIDATE

Each prints one JSON object on its last stdout line. Peak memory is the kernel's ``VmHWM``
(peak resident set of this process image): for the whole process, or for one phase (the
decode step alone, without the session load) after resetting it through
``/proc/self/clear_refs``.
Sessions in one process would pollute each other's peak, hence a process per model.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(match.group(1)) if match else -1


def _reset_peak() -> bool:
    """Start VmHWM afresh (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def _phase_peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


def _process_peak_mb() -> float:
    # Not ru_maxrss: a child started by fork+exec inherits its parent's maximum there.
    return _status_kb("VmHWM") / 1024


def _gpu_memory_mb() -> float | None:
    """This process's device memory as nvidia-smi reports it (ORT's arena never shrinks, so
    after the steps this is their peak); None where nvidia-smi is unavailable."""
    import os
    import subprocess

    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in listing.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(used)
    return None


def _decode_rss(args: argparse.Namespace) -> dict:
    import numpy as np

    from bench.inference import decoder_feeds, open_session

    baseline = _rss_mb()
    session = open_session(args.model, args.provider)
    feeds = decoder_feeds(session, 1, args.total_length, np.random.default_rng(0), args.vocab)
    session.run(None, feeds)  # first run: allocator arenas and prepacked weights settle
    loaded = _rss_mb()
    load_peak = _process_peak_mb()
    reset = _reset_peak()
    for _ in range(args.steps):
        session.run(None, feeds)
    return {
        "total_length": args.total_length,
        "gpu_memory_mb": _gpu_memory_mb() if args.provider == "cuda" else None,
        "rss_before_step_mb": loaded,
        "step_peak_mb": _phase_peak_mb() if reset else None,
        "step_growth_mb": (_phase_peak_mb() - loaded) if reset else None,
        "process_peak_mb": max(load_peak, _process_peak_mb()),
        "baseline_mb": baseline,
    }


def _pass(args: argparse.Namespace) -> dict:
    import onnx_ir as ir

    from rewriter.model_io import external_data_name, load_model
    from rewriter.pipeline import rewrite

    baseline = _rss_mb()
    start = time.perf_counter()
    model = load_model(args.model)
    loaded = time.perf_counter()
    # As `python -m rewriter IN OUT` does by default: the form probe and the speed probe.
    model, report = rewrite(model, provider=args.provider, speed="auto")
    rewritten = time.perf_counter()
    ir.save(model, args.out, external_data=external_data_name(args.out))
    saved = time.perf_counter()
    peak = _process_peak_mb()
    # The first rewrite probed ORT once per (dtype, head size), as the CLI does; a second
    # rewrite in this process finds the form probe cached and does not time layers (speed
    # off): the graph work alone.
    again = load_model(args.model)
    warm_start = time.perf_counter()
    rewrite(again, provider=args.provider)
    warm_seconds = time.perf_counter() - warm_start
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)
    return {
        "load_seconds": loaded - start,
        "rewrite_seconds": rewritten - loaded,
        "save_seconds": saved - rewritten,
        "total_seconds": saved - start,
        "rewrite_seconds_probe_cached": warm_seconds,
        "peak_rss_mb": peak,
        "baseline_mb": baseline,
        "weights_mb": weights / 2**20,
        "layers_rewritten": report.rewritten,
        "nodes_removed": report.nodes_removed,
    }


def _optimize(args: argparse.Namespace) -> dict:
    import onnx_ir as ir
    import onnxscript.optimizer

    from rewriter.model_io import external_data_name, load_model

    baseline = _rss_mb()
    start = time.perf_counter()
    model = load_model(args.model)
    loaded = time.perf_counter()
    onnxscript.optimizer.optimize(model)
    optimized = time.perf_counter()
    ir.save(model, args.out, external_data=external_data_name(args.out))
    saved = time.perf_counter()
    return {
        "load_seconds": loaded - start,
        "optimize_seconds": optimized - loaded,
        "save_seconds": saved - optimized,
        "total_seconds": saved - start,
        "peak_rss_mb": _process_peak_mb(),
        "baseline_mb": baseline,
        "nodes_after": sum(1 for _ in model.graph),
    }


def _verify(args: argparse.Namespace) -> dict:
    from rewriter.verification import verify

    baseline = _rss_mb()
    start = time.perf_counter()
    result = verify(args.original, args.candidate, provider=args.provider, mode=args.mode)
    layers = [layer.to_dict() for layer in result.layers]
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": _process_peak_mb(),
        "baseline_mb": baseline,
        "mode": args.mode,
        "passed": result.passed,
        "checks": [check.to_dict() for check in result.checks],
        "original_defects": [str(defect) for defect in result.original_defects],
        "layers": len(layers),
        "layer_seconds": sum(layer["seconds"] for layer in layers),
        "layer_max_abs_diff": max(
            (
                check["max_abs_diff"]
                for layer in layers
                for check in layer["checks"]
                if check["model"] == "candidate" and isinstance(check["max_abs_diff"], float)
            ),
            default=None,
        ),
        "model": result.model,
        "summary": result.summary(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._worker")
    commands = parser.add_subparsers(dest="command", required=True)
    decode = commands.add_parser("decode-rss")
    decode.add_argument("model", type=Path)
    decode.add_argument("--total-length", type=int, required=True)
    decode.add_argument("--steps", type=int, default=3)
    decode.add_argument("--vocab", type=int, default=2)
    decode.add_argument("--provider", default="cpu")
    for name in ("pass", "optimize"):
        sub = commands.add_parser(name)
        sub.add_argument("model", type=Path)
        sub.add_argument("out", type=Path)
        sub.add_argument("--provider", default="cpu")
    check = commands.add_parser("verify")
    check.add_argument("original", type=Path)
    check.add_argument("candidate", type=Path)
    check.add_argument("--provider", default="cpu")
    check.add_argument("--mode", default="auto", choices=("auto", "layers", "model", "all"))
    args = parser.parse_args(argv)
    handler = {
        "decode-rss": _decode_rss,
        "pass": _pass,
        "optimize": _optimize,
        "verify": _verify,
    }[args.command]
    print(json.dumps(handler(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
