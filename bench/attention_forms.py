"""One KV-shared layer's attention, in each candidate form, timed side by side.

Why: the whole-model numbers say *whether* the rewrite pays; this says *which layer type and
form* costs what. Each form is a single-layer model fed the same query [1, S, N*D] and
borrowed cache [1, Nkv, T, D], and the lengths as the form reads them (an additive bias for
the hand-built Attention forms, ``attention_mask`` for the GQA forms). Forms:

* ``original``: the export's subgraph: Transpose+Reshape of the borrowed K and V (in a real
  model one pair per source layer and step, shared by the layers that borrow it), then
  ``Attention`` on 3-D inputs with the float bias.
* ``attention-3d``: the same Attention node alone (K/V already 3-D): the kernel's own cost.
* ``attention-bnsh``: ``Attention`` on 4-D inputs reading the borrowed BNSH cache in place
  (only the query and the output are transposed; no copy of the cache).
* ``gqa-past``: the rewrite's ``past`` form (empty key/value, borrowed cache as past, no
  present outputs).
* ``gqa-past-present``: the same with the (unused) present outputs, which copy the cache.

The GQA forms are what the KV-shared rule writes for the one-layer export
(``rewriter.probe._one_layer``), so this times the rule's own construction; without the window
slice, so that the form alone is timed (``bench/run.py`` times the whole rewrite).

    python bench/attention_forms.py [--quick] [--cpu-time] [--phase decode] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
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

from bench.timing import Timing, interleaved
from rewriter.probe._one_layer import (
    CACHE_KEY,
    CACHE_VALUE,
    OneLayer,
    kv_shared_layer,
    rewritten_layer,
)

__all__ = ["FORMS", "LayerCase", "build_form", "main", "measure_forms", "quiet_session_options"]

FORMS = ("original", "attention-3d", "attention-bnsh", "gqa-past", "gqa-past-present")

_NEG = float(np.finfo(np.float32).min)
_MS = "com.microsoft"


class LayerCase:
    """One layer shape and one call shape: N query heads, Nkv KV heads, D, W (None = full)."""

    def __init__(
        self,
        head_size: int,
        window: int | None,
        query_length: int,
        total_length: int,
        num_heads: int = 8,
        kv_num_heads: int = 1,
    ) -> None:
        self.head_size = head_size
        self.window = window
        self.query_length = query_length
        self.total_length = total_length
        self.num_heads = num_heads
        self.kv_num_heads = kv_num_heads

    @property
    def label(self) -> str:
        kind = "full" if self.window is None else f"W={self.window}"
        phase = "decode" if self.query_length == 1 else "prefill"
        return f"D={self.head_size} {kind} {phase} S={self.query_length} T={self.total_length}"

    def feeds(self, form: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
        s, t, d = self.query_length, self.total_length, self.head_size
        query = rng.standard_normal((1, s, self.num_heads * d), dtype=np.float32)
        key = rng.standard_normal((1, self.kv_num_heads, t, d), dtype=np.float32)
        value = rng.standard_normal((1, self.kv_num_heads, t, d), dtype=np.float32)
        if form.startswith("gqa"):
            # The one-layer export's inputs; the rewrite derives the lengths from the mask.
            mask = np.ones((1, t), dtype=np.int64)
            return {"query": query, "attention_mask": mask, CACHE_KEY: key, CACHE_VALUE: value}
        return {"query_BSD": query, "key_BNSH": key, "value_BNSH": value, "bias": self.bias()}

    def bias(self) -> np.ndarray:
        """The P2 export's additive mask [1, 1, S, T] for a right-aligned query block."""
        s, t = self.query_length, self.total_length
        q_pos = np.arange(t - s, t)[:, None]
        k_pos = np.arange(t)[None, :]
        allowed = q_pos >= k_pos
        if self.window is not None:
            allowed &= (q_pos - k_pos) < self.window
        return np.where(allowed, 0.0, _NEG).astype(np.float32)[None, None]


def build_form(case: LayerCase, form: str) -> onnx.ModelProto:
    """The single-layer model of `form` for `case` (opset 23)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
    if form.startswith("gqa-"):
        return _rewritten_layer(case, form.removeprefix("gqa-"))
    n, nkv, d = case.num_heads, case.kv_num_heads, case.head_size
    f32 = TensorProto.FLOAT
    query = helper.make_tensor_value_info("query_BSD", f32, ["batch", "S", n * d])
    key = helper.make_tensor_value_info("key_BNSH", f32, ["batch", nkv, "T", d])
    value = helper.make_tensor_value_info("value_BNSH", f32, ["batch", nkv, "T", d])
    bias = helper.make_tensor_value_info("bias", f32, [1, 1, "S", "T"])
    output = helper.make_tensor_value_info("output", f32, ["batch", "S", n * d])
    inputs = [query, key, value, bias]
    initializers = [
        helper.make_tensor("shape_3d", TensorProto.INT64, [3], [0, 0, -1]),
        helper.make_tensor("shape_4d", TensorProto.INT64, [4], [0, 0, n, d]),
    ]
    nodes: list[onnx.NodeProto] = []
    attention_attrs = {"scale": 1.0, "is_causal": 0}
    if form in ("original", "attention-3d"):
        # attention-3d is fed K/V already 3-D: the Attention kernel without the copies.
        if form == "original":
            for name in ("key", "value"):
                nodes += [
                    helper.make_node(
                        "Transpose", [f"{name}_BNSH"], [f"{name}_BSNH"], perm=[0, 2, 1, 3]
                    ),
                    helper.make_node("Reshape", [f"{name}_BSNH", "shape_3d"], [f"{name}_BSD"]),
                ]
        else:
            inputs[1] = helper.make_tensor_value_info("key_BSD", f32, ["batch", "T", nkv * d])
            inputs[2] = helper.make_tensor_value_info("value_BSD", f32, ["batch", "T", nkv * d])
        nodes.append(
            helper.make_node(
                "Attention",
                ["query_BSD", "key_BSD", "value_BSD", "bias"],
                ["output"],
                q_num_heads=n,
                kv_num_heads=nkv,
                **attention_attrs,
            )
        )
    else:  # attention-bnsh
        nodes += [
            helper.make_node("Reshape", ["query_BSD", "shape_4d"], ["query_BSNH"]),
            helper.make_node("Transpose", ["query_BSNH"], ["query_BNSH"], perm=[0, 2, 1, 3]),
            helper.make_node(
                "Attention",
                ["query_BNSH", "key_BNSH", "value_BNSH", "bias"],
                ["output_BNSH"],
                **attention_attrs,
            ),
            helper.make_node("Transpose", ["output_BNSH"], ["output_BSNH"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["output_BSNH", "shape_3d"], ["output"]),
        ]
    graph = helper.make_graph(nodes, f"kv_shared_{form}", inputs, [output], initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(_MS, 1)]
    )
    model.ir_version = 11
    return model


def _rewritten_layer(case: LayerCase, form: str) -> onnx.ModelProto:
    """What the KV-shared rule writes in `form` for the P2 one-layer export of `case`."""
    layer = OneLayer(
        num_heads=case.num_heads,
        kv_num_heads=case.kv_num_heads,
        head_size=case.head_size,
        window=case.window,
        mask_style="p2",
        scale=1.0,
    )
    model, _ = rewritten_layer(kv_shared_layer(layer), form, window_slice=False)
    return ir.to_proto(model)


def quiet_session_options(threads: int = 0) -> ort.SessionOptions:
    """ORT defaults (all graph optimizations; threads 0 = ORT's default), warnings off."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # unused-initializer warnings would drown the table
    options.intra_op_num_threads = threads
    return options


def _feeds_for(case: LayerCase, form: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = case.feeds(form, rng)
    if form == "attention-3d":
        for name in ("key", "value"):
            cache = feeds.pop(f"{name}_BNSH")
            feeds[f"{name}_BSD"] = np.ascontiguousarray(cache.transpose(0, 2, 1, 3)).reshape(
                1, case.total_length, -1
            )
    return feeds


def measure_forms(
    cases: Sequence[LayerCase],
    forms: Sequence[str] = FORMS,
    *,
    repeats: int = 20,
    warmup: int = 2,
    profile_runs: int = 5,
    cpu_time: bool = False,
) -> list[dict]:
    """Time every form of every case, interleaved; check each against `original` too.

    Wall time per call includes ORT's per-call overhead and whatever the machine's other
    jobs cost us; `kernel_ms_by_op` (ORT profiling, median per node over `profile_runs`
    calls, summed by op type) is the kernels' own time. With `cpu_time`, sessions run on one
    thread and the calling thread's CPU time is measured: the work, without the noise of a
    shared machine (and without the second core).
    """
    options = quiet_session_options(threads=1 if cpu_time else 0)
    results = []
    for case in cases:
        sessions, feeds, models = {}, {}, {}
        for form in forms:
            models[form] = build_form(case, form).SerializeToString()
            sessions[form] = ort.InferenceSession(
                models[form], options, providers=["CPUExecutionProvider"]
            )
            feeds[form] = _feeds_for(case, form, np.random.default_rng(1))
        reference = sessions[forms[0]].run(["output"], feeds[forms[0]])[0]
        errors = {}
        for form in forms:
            got = sessions[form].run(["output"], feeds[form])[0]
            scale = max(1.0, float(np.abs(reference).max()))
            errors[form] = float(np.abs(got - reference).max()) / scale
        timings = interleaved(
            {form: _call(sessions[form], feeds[form]) for form in forms},
            repeats=repeats,
            warmup=warmup,
            clock=time.thread_time if cpu_time else time.perf_counter,
        )
        base = timings[forms[0]].median
        rows = {
            form: {
                **timings[form].to_dict(),
                "ratio_to_original": timings[form].median / base,
                "max_rel_error_vs_original": errors[form],
                "kernel_ms_by_op": _kernel_ms(models[form], feeds[form], profile_runs, options),
            }
            for form in forms
        }
        results.append(
            {
                "case": case.label,
                "head_size": case.head_size,
                "window": case.window,
                "query_length": case.query_length,
                "total_length": case.total_length,
                "forms": rows,
            }
        )
        print(_case_line(case, timings, forms), flush=True)
    return results


def _kernel_ms(
    model: bytes, feeds: dict[str, np.ndarray], runs: int, base: ort.SessionOptions
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-forms-") as directory:
        options = quiet_session_options(threads=base.intra_op_num_threads)
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(directory, "profile")
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(["output"], feeds)
        with open(session.end_profiling()) as handle:
            events = json.load(handle)
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    op_of = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node[event["name"]].append(event["dur"] / 1e3)
            op_of[event["name"]] = event["args"].get("op_name", "")
    by_op: dict[str, float] = collections.defaultdict(float)
    for node, values in per_node.items():
        by_op[op_of[node]] += float(np.median(values[1:] or values))
    return dict(sorted(by_op.items(), key=lambda item: -item[1]))


def _call(session: ort.InferenceSession, feeds: dict[str, np.ndarray]):
    return lambda: session.run(["output"], feeds)


def _case_line(case: LayerCase, timings: dict[str, Timing], forms: Sequence[str]) -> str:
    cells = "  ".join(f"{form} {timings[form].median * 1e3:8.2f}" for form in forms)
    return f"{case.label:38}  {cells}  (ms, median)"


def default_cases(quick: bool) -> list[LayerCase]:
    if quick:
        return [LayerCase(64, 8, 1, 64), LayerCase(128, None, 1, 64), LayerCase(128, None, 16, 16)]
    cases = []
    for head_size, window in ((256, 512), (512, None)):
        for query_length, total_length in ((1, 1024), (1, 4096), (512, 512), (2048, 2048)):
            cases.append(LayerCase(head_size, window, query_length, total_length))
    return cases


def markdown(results: Sequence[dict]) -> str:
    """One row per case and form: median wall ms per call, its ratio to the original, the
    profiled kernel time of the attention node and of the Transpose/Reshape copies, and the
    form's largest relative deviation from the original's output."""
    if not results:
        return ""
    forms = list(results[0]["forms"])
    head = "| case | " + " | ".join(forms) + " |"
    rule = "|---|" + "---|" * len(forms)
    lines = [head, rule]
    for result in results:
        cells = []
        for form in forms:
            row = result["forms"][form]
            kernels = row["kernel_ms_by_op"]
            attention = sum(v for op, v in kernels.items() if "Attention" in op)
            copies = sum(v for op, v in kernels.items() if op in ("Transpose", "Reshape"))
            cells.append(
                f"{row['median_ms']:.2f} ({row['ratio_to_original']:.2f}x); kernels: "
                f"attention {attention:.2f}, copies {copies:.2f}; "
                f"err {row['max_rel_error_vs_original']:.0e}"
            )
        lines.append(f"| {result['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, seconds")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="one thread, CPU time of the calling thread (robust on a busy machine)",
    )
    parser.add_argument(
        "--phase", choices=("decode", "prefill", "both"), default="both", help="which cases"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 20)
    cases = [
        case
        for case in default_cases(args.quick)
        if args.phase == "both" or (case.query_length == 1) == (args.phase == "decode")
    ]
    results = measure_forms(cases, repeats=repeats, cpu_time=args.cpu_time)
    print(f"clock: {'CPU time, 1 thread' if args.cpu_time else 'wall time, default threads'}")
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
