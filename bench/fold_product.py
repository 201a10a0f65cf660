"""The fold's product per KV head as one ``Attention`` against FusedMatMul/Softmax/MatMul.

Why: ONNX Runtime's CPU ``Attention`` gives each (batch, head) pair to one thread and runs
its GEMMs single-threaded, so a fold with Nkv = 1 at batch 1 (Gemma 4 E2B) runs on one core
whatever the session's thread count. MLAS's MatMul splits the same GEMM over the intra-op
threads. Both forms are what ``rules._speed_choice.fold_product`` emits (``attention``: the
form it writes for dtypes other than float32), built here by that function at E2B attention
size (G = 8 folded query heads, Nkv = 1): sliding D=256 over its window (513 keys), full
D=512 at T = 1024, 4096, 8192. The scale is 1/sqrt(D): with random unit-variance Q and K,
Gemma 4's scale 1 gives scores spread by sqrt(D), whose softmax underflows into denormal
probabilities that slow the P V product several times over (measured: a first version of
this script did that), which a trained model's attention does not.

Each call reads a different cache from a pool larger than the last-level cache, as a decode
step does (it reads every layer's cache once), so the timings are of memory, not of a cache
left warm by the previous call. Calls alternate round by round (``bench.timing``) in one
process; wall time with 1 and 2 intra-op threads; the two forms' outputs are compared.

    python bench/fold_product.py [--repeats 40] \
        [--json bench/results/results_1.32_fold_product.json]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnxscript.rewriter._context import TapeBuilder

from bench.provenance import commit
from bench.timing import interleaved
from rewriter.rules import _speed_choice

__all__ = ["main"]

GROUP = 8  # E2B: 8 query heads over 1 KV head
CASES = (("sliding", 256, 513), ("full", 512, 1024), ("full", 512, 4096), ("full", 512, 8192))
POOL_BYTES = 192 << 20  # caches read in turn: more than any last-level cache here


def _product_model(form: str, head_size: int, total: int) -> bytes:
    """One fold product, query [1, 1, G, D], caches [1, 1, T, D], bias [1, 1, G, T]."""
    f32 = ir.DataType.FLOAT
    query = ir.Value(
        name="query", type=ir.TensorType(f32), shape=ir.Shape([1, 1, GROUP, head_size])
    )
    key, value = (
        ir.Value(name=name, type=ir.TensorType(f32), shape=ir.Shape([1, 1, total, head_size]))
        for name in ("key", "value")
    )
    bias = ir.Value(name="bias", type=ir.TensorType(f32), shape=ir.Shape([1, 1, GROUP, total]))
    tape = TapeBuilder()
    # float32 picks FusedMatMul/Softmax/MatMul; FLOAT16 as the dtype picks Attention, which
    # is the same op for float32 inputs: the form the fold had before fold_product.
    dtype = f32 if form == "matmul" else ir.DataType.FLOAT16
    output = _speed_choice.fold_product(
        tape, query, (key, value), bias, scale=head_size**-0.5, softcap=0.0, dtype=dtype
    )
    output.name = "output"
    graph = ir.Graph(
        [query, key, value, bias],
        [output],
        nodes=tape.nodes,
        name="fold",
        opset_imports={"": 24, "com.microsoft": 1},
    )
    model = ir.Model(graph, ir_version=10)
    return ir.to_proto(model).SerializeToString()


def _session(model: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def measure(repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for kind, head_size, total in CASES:
        cache_bytes = 2 * total * head_size * 4
        pool = [
            tuple(rng.standard_normal((1, 1, total, head_size), dtype=np.float32) for _ in "kv")
            for _ in range(max(2, POOL_BYTES // cache_bytes))
        ]
        query = rng.standard_normal((1, 1, GROUP, head_size), dtype=np.float32)
        bias = np.zeros((1, 1, GROUP, total), dtype=np.float32)
        bias[..., : total // 3] = np.finfo(np.float32).min  # some keys masked, as in decode
        models = {form: _product_model(form, head_size, total) for form in ("attention", "matmul")}
        outputs = {
            form: _session(model, 1).run(
                None, {"query": query, "key": pool[0][0], "value": pool[0][1], "bias": bias}
            )[0]
            for form, model in models.items()
        }
        difference = float(np.abs(outputs["attention"] - outputs["matmul"]).max())
        for threads in (1, 2):
            calls = {}
            for form, model in models.items():
                session = _session(model, threads)
                caches = itertools.cycle(pool)

                def call(session=session, caches=caches, query=query, bias=bias) -> object:
                    key, value = next(caches)
                    return session.run(
                        None, {"query": query, "key": key, "value": value, "bias": bias}
                    )

                calls[form] = call
            timings = interleaved(calls, repeats=repeats, warmup=2, pause=0.02)
            attention = np.array(timings["attention"].samples)
            matmul = np.array(timings["matmul"].samples)
            row = {
                "layer": kind,
                "head_size": head_size,
                "keys": total,
                "threads": threads,
                "cache_mb": cache_bytes / 1e6,
                "attention": timings["attention"].to_dict(),
                "matmul": timings["matmul"].to_dict(),
                "ratio_of_medians": timings["matmul"].median / timings["attention"].median,
                "round_ratio_min": float((matmul / attention).min()),
                "round_ratio_max": float((matmul / attention).max()),
                "max_abs_difference": difference,
            }
            rows.append(row)
            print(
                f"  {kind} D={head_size} T={total} threads={threads}: attention "
                f"{timings['attention'].median * 1e3:.3f} ms, matmul "
                f"{timings['matmul'].median * 1e3:.3f} ms, ratio {row['ratio_of_medians']:.3f} "
                f"({row['round_ratio_min']:.3f}-{row['round_ratio_max']:.3f}), "
                f"max |diff| {difference:.1e}",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    rows = measure(args.repeats)
    result = {
        "what": "the fold's product per KV head: Attention vs FusedMatMul/Softmax/MatMul",
        "onnxruntime": ort.__version__,
        "commit": commit(),
        "command": "python bench/fold_product.py " + " ".join(argv or sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
