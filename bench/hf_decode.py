"""CPU decode step at T=4096 of a transformers-exporter decode graph, original vs rewritten.

    python -m rewriter.fixtures.hf_export bench/cache/hf_e2b --e2b   # ~2 GB, needs torch
    python bench/hf_decode.py bench/cache/hf_e2b [--total 4096] [--calls 10] [--json OUT]

The export is ``fixtures/hf_export.py``'s Gemma 4 E2B attention sizes (35 layers, 20 KV-
shared, D 256/512, W 512, vocabulary and MLP cut as in bench/README). The decode graph is
rewritten with the tool's default (``--layers all``); both get one session each with ORT
default options, a single-token step after a random past of T-1 entries in every cache
(the export does not trim sliding caches), interleaved calls with a 50 ms pause before
each (as bench/run.py), one warm-up, medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

import rewriter


def _feeds(session: ort.InferenceSession, total: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for graph_input in session.get_inputs():
        name = graph_input.name
        if name == "input_ids":
            feeds[name] = np.array([[1]], dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.array([[total - 1]], dtype=np.int64)
        elif name.endswith("_sliding_window_tensor"):
            feeds[name] = np.array(0, dtype=np.int64)
        else:
            _, heads, _, size = graph_input.shape
            shape = (1, int(heads), total - 1, int(size))
            feeds[name] = rng.standard_normal(shape, dtype=np.float32) * 0.1
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--total", type=int, default=4096)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    original = args.export_dir / "decode.onnx"
    rewritten = args.export_dir / "decode.gqa.onnx"
    model = ir.load(original)
    nodes_before = len(model.graph)
    started = time.perf_counter()
    model, report = rewriter.rewrite(model)
    rewrite_s = time.perf_counter() - started
    ir.save(model, rewritten, external_data="decode.gqa.onnx.data")

    sessions = {
        "original": ort.InferenceSession(str(original), providers=["CPUExecutionProvider"]),
        "rewritten": ort.InferenceSession(str(rewritten), providers=["CPUExecutionProvider"]),
    }
    feeds = _feeds(sessions["original"], args.total)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    outputs = {}
    order = list(sessions)
    for call in range(args.calls + 1):
        for name in order if call % 2 == 0 else order[::-1]:
            time.sleep(0.05)
            started = time.perf_counter()
            outputs[name] = sessions[name].run(["logits"], feeds)[0]
            if call:  # the first call of each is the warm-up
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    result = {
        "onnxruntime": ort.__version__,
        "total_length": args.total,
        "calls": args.calls,
        "median_ms": medians,
        "ratio_rewritten_over_original": medians["rewritten"] / medians["original"],
        "logits_max_abs_diff": float(np.max(np.abs(outputs["original"] - outputs["rewritten"]))),
        "nodes": {"original": nodes_before, "rewritten": len(model.graph)},
        "rewritten_layers": report.rewritten,
        "skipped_layers": len(report.skipped),
        "rewrite_s": rewrite_s,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
