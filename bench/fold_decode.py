"""One KV-shared layer's decode step in each form, against the bandwidth floor of its cache.

Why (issue 20): ONNX Runtime's CPU GroupQueryAttention and Attention loop over query heads,
each streaming the whole borrowed cache, so with N/Nkv = 8 query heads per KV head a decode
step reads the cache 8 times. The fold (``rules._speed_choice.fold``) reads it once. This
measures, at E2B attention size (N=8, Nkv=1; sliding D=256 W=512, full D=512), one decode
step (S=1) at T = 1024, 4096, 8192 in each form, interleaved round by round, CPU time of
the calling thread with one intra-op thread:

* ``original``: the export (Transpose+Reshape of the borrowed cache, Attention, P2 bias);
* ``attention-bnsh``: Attention on 4-D inputs over the BNSH cache in place;
* ``gqa-past``: the rule's GQA ``past`` form over the whole cache (no window slice);
* ``fold``: the fold alone over the whole cache, its [1, 1, G, T] bias fed;
* ``rewrite-gqa``: what ``rewriter.rewrite`` writes by default (GQA, window slice on);
* ``rewrite-fold``: what the CPU policy writes, ``If(S == 1: fold, else: gqa)`` with the
  window slice (the If, the slice and the mask built from attention_mask included).

The floor of a layer is the bytes of K and V it must read once (W keys on a sliding layer,
T on a full one) over the best copy rate measured here (``np.copyto`` of 256 MiB, one
thread; bytes copied per second, each byte read once and written once).

    python bench/fold_decode.py [--quick] [--repeats 30] \
        [--json bench/results/results_1.32_fold.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

from bench.attention_forms import LayerCase, build_form, quiet_session_options
from bench.provenance import commit
from bench.timing import interleaved
from rewriter.probe._one_layer import OneLayer, kv_shared_layer
from rewriter.rules import SpeedChoice, always_past

__all__ = ["FOLD_FORMS", "copy_bandwidth", "main", "measure"]

FOLD_FORMS = (
    "original",
    "attention-bnsh",
    "gqa-past",
    "fold",
    "rewrite-gqa",
    "rewrite-fold",
)
_NEG = float(np.finfo(np.float32).min)


def _fold_model(case: LayerCase) -> onnx.ModelProto:
    """The fold alone: Reshape, Attention on [B, Nkv, G, D], Reshape (the bias fed)."""
    n, nkv, d = case.num_heads, case.kv_num_heads, case.head_size
    group = n // nkv
    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("query_BSD", f32, ["batch", 1, n * d]),
        helper.make_tensor_value_info("key_BNSH", f32, ["batch", nkv, "T", d]),
        helper.make_tensor_value_info("value_BNSH", f32, ["batch", nkv, "T", d]),
        helper.make_tensor_value_info("bias", f32, ["batch", 1, group, "T"]),
    ]
    output = helper.make_tensor_value_info("output", f32, ["batch", 1, n * d])
    initializers = [
        helper.make_tensor("folded", TensorProto.INT64, [4], [0, nkv, group, d]),
        helper.make_tensor("merged", TensorProto.INT64, [3], [0, 1, n * d]),
    ]
    nodes = [
        helper.make_node("Reshape", ["query_BSD", "folded"], ["query_BKGD"]),
        helper.make_node(
            "Attention",
            ["query_BKGD", "key_BNSH", "value_BNSH", "bias"],
            ["output_BKGD"],
            scale=1.0,
            is_causal=0,
        ),
        helper.make_node("Reshape", ["output_BKGD", "merged"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "kv_shared_fold", inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 11
    return model


def _export(case: LayerCase, dtype: str) -> ir.Model:
    """The P2 one-layer export of `case` (rewriter.probe._one_layer)."""
    layer = OneLayer(
        num_heads=case.num_heads,
        kv_num_heads=case.kv_num_heads,
        head_size=case.head_size,
        window=case.window,
        mask_style="p2",
        scale=1.0,
        dtype=dtype,
    )
    return kv_shared_layer(layer)


def _rewritten(case: LayerCase, choice: SpeedChoice, dtype: str) -> onnx.ModelProto:
    """What the rewrite writes for the P2 one-layer export of `case` under `choice`."""
    from rewriter.pipeline import rewrite

    model, report = rewrite(
        _export(case, dtype),
        layers="shared",
        choose_form=always_past,
        choose_speed=lambda _: choice,
    )
    assert [r.speed_form for r in report.rewrites] == [choice.label], report.summary()
    return ir.to_proto(model)


def _model(case: LayerCase, form: str, dtype: str = "float32") -> onnx.ModelProto:
    if form == "rewrite-gqa":
        return _rewritten(case, SpeedChoice(), dtype)
    if form == "rewrite-fold":
        return _rewritten(case, SpeedChoice("fold", "gqa"), dtype)
    if dtype != "float32":  # the hand-built forms are float32; the export is the export
        assert form == "original", f"{form} is built in float32 only"
        return ir.to_proto(_export(case, dtype))
    if form == "fold":
        return _fold_model(case)
    return build_form(case, form)


def _feeds(case: LayerCase, form: str, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The same query and cache for every form (one seed), the lengths as each reads them."""
    export_inputs = form.startswith(("gqa", "rewrite")) or dtype != "float32"
    feeds = case.feeds("gqa" if export_inputs else form, _rng())
    if form == "fold":
        group = case.num_heads // case.kv_num_heads
        feeds["bias"] = np.ascontiguousarray(np.repeat(case.bias(), group, axis=2))
    return {
        name: value.astype(dtype) if value.dtype == np.float32 else value
        for name, value in feeds.items()
    }


def _rng() -> np.random.Generator:
    return np.random.default_rng(1)


def copy_bandwidth(megabytes: int = 256, repeats: int = 20) -> float:
    """Best bytes/second of one thread copying `megabytes` (np.copyto)."""
    source = np.ones(megabytes << 18, dtype=np.float32)  # megabytes MiB
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return source.nbytes / best


def _read_bytes(case: LayerCase, dtype: str = "float32") -> int:
    """K and V bytes a decode step must read once: the window's keys, or all T."""
    keys = case.total_length if case.window is None else min(case.window, case.total_length)
    return 2 * case.kv_num_heads * keys * case.head_size * np.dtype(dtype).itemsize


def measure(
    cases: Sequence[LayerCase],
    repeats: int,
    bandwidth: float,
    forms: Sequence[str] = FOLD_FORMS,
    dtype: str = "float32",
) -> list[dict]:
    options = quiet_session_options(threads=1)
    results = []
    for case in cases:
        sessions, feeds = {}, {}
        for form in forms:
            sessions[form] = ort.InferenceSession(
                _model(case, form, dtype).SerializeToString(),
                options,
                providers=["CPUExecutionProvider"],
            )
            feeds[form] = _feeds(case, form, dtype)
        outputs = {form: sessions[form].run(["output"], feeds[form])[0] for form in forms}
        reference = outputs["original"].astype(np.float64)
        scale = max(1.0, float(np.abs(reference).max()))
        timings = interleaved(
            {form: _call(sessions[form], feeds[form]) for form in forms},
            repeats=repeats,
            warmup=2,
            clock=time.thread_time,
        )
        floor_ms = _read_bytes(case, dtype) / bandwidth * 1e3
        rows = {}
        for form in forms:
            samples = np.array(timings[form].samples)
            row = timings[form].to_dict()
            row["max_rel_error_vs_original"] = (
                float(np.abs(outputs[form] - reference).max()) / scale
            )
            row["over_floor"] = timings[form].median * 1e3 / floor_ms
            for base in ("original", "rewrite-gqa"):
                ratios = samples / np.array(timings[base].samples)  # round by round
                row[f"ratio_to_{base}"] = {
                    "median": float(np.median(ratios)),
                    "min": float(ratios.min()),
                    "max": float(ratios.max()),
                }
            rows[form] = row
        results.append(
            {
                "case": case.label,
                "head_size": case.head_size,
                "window": case.window,
                "total_length": case.total_length,
                "dtype": dtype,
                "kv_bytes_read_once": _read_bytes(case, dtype),
                "floor_ms": floor_ms,
                "forms": rows,
            }
        )
        cells = "  ".join(f"{form} {timings[form].median * 1e3:7.3f}" for form in forms)
        print(f"{case.label:34} floor {floor_ms:6.3f}  {cells}  (ms)", flush=True)
    return results


def _call(session: ort.InferenceSession, feeds: dict[str, np.ndarray]):
    return lambda: session.run(["output"], feeds)


def markdown(results: Sequence[dict]) -> str:
    forms = list(results[0]["forms"])
    lines = [
        "| decode case | floor | " + " | ".join(forms) + " |",
        "|---|---|" + "---|" * len(forms),
    ]
    for result in results:
        cells = []
        for form in forms:
            row = result["forms"][form]
            ratio = row["ratio_to_rewrite-gqa"]
            cells.append(
                f"{row['median_ms']:.3f} ({ratio['min']:.2f}-{ratio['max']:.2f}x gqa; "
                f"{row['over_floor']:.1f}x floor)"
            )
        lines.append(f"| {result['case']} | {result['floor_ms']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cases(quick: bool) -> list[LayerCase]:
    if quick:
        return [LayerCase(64, 8, 1, 64), LayerCase(128, None, 1, 64)]
    return [
        LayerCase(head_size, window, 1, total)
        for head_size, window in ((256, 512), (512, None))
        for total in (1024, 4096, 8192)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, seconds")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="float16: only the export and what the rewrite writes (original, rewrite-*)",
    )
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth(16 if args.quick else 256)
    print(f"best one-thread copy rate: {bandwidth / 1e9:.2f} GB/s", flush=True)
    forms = FOLD_FORMS if args.dtype == "float32" else ("original", "rewrite-gqa", "rewrite-fold")
    results = measure(cases(args.quick), args.repeats, bandwidth, forms, args.dtype)
    print(markdown(results))
    if args.json:
        record = {
            "command": "python bench/fold_decode.py " + " ".join(argv or sys.argv[1:]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": commit(),
            "onnxruntime": ort.__version__,
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "note": "shared machine (2 cores, other workers' jobs running): CPU time of "
                "the calling thread with intra_op_num_threads=1, rounds interleaved",
            },
            "clock": "CPU time of the calling thread, ORT intra_op_num_threads=1",
            "copy_bandwidth_bytes_per_s": bandwidth,
            "floor": "bytes of K+V a decode step must read once (W keys sliding, T full) / "
            "copy_bandwidth_bytes_per_s",
            "repeats": args.repeats,
            "decode": results,
        }
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
