"""One layer with its own cache, one decode step: GQA against ``Concat`` + the fold.

Why (issue 20, part 4): a layer that owns its cache appends this step's key/value and attends
over the result. GQA does both in one kernel, looping over query heads (the cache streamed
once per head); the fold reads it once, but needs the appended cache as a tensor:
``Concat(past, new)``, which is also the layer's present output. Whether that pays depends on
how the runtime holds the cache:

* past and present as separate tensors (``InferenceSession.run``, the exporter's one-layer
  model): the original's Attention and GQA copy the past into the present too, so the
  Concat costs nothing extra;
* one buffer for past and present (onnxruntime-genai binds GQA that way): GQA writes only the
  new token into the buffer, and the Concat is a copy of the whole cache the original does
  not make.

Forms, at E2B attention size (N=8, Nkv=1; sliding D=256 W=512, full D=512), B=1, S=1, past
T-1, CPU time of the calling thread with one intra-op thread, rounds interleaved:

* ``export``: the one-layer own-cache export (Attention with past, P2 bias);
* ``gqa``: what the rewrite writes for it (GQA's native form: past in, presents out);
* ``gqa-shared-buffer``: the same GQA node with past and present bound to one buffer of T
  slots (``past_present_share_buffer``; IOBinding, the buffer reused call after call);
* ``concat-fold``: ``Concat(past, new)`` as the presents, the fold over all T keys;
* ``concat-fold-window`` (sliding only): the same, the fold over the last W keys.

    python bench/own_cache_decode.py [--quick] [--repeats 30] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

from bench.attention_forms import quiet_session_options
from bench.fold_decode import _commit
from bench.timing import interleaved
from rewriter.probe._one_layer import (
    CACHE_KEY,
    CACHE_VALUE,
    NEW_KEY,
    NEW_VALUE,
    OneLayer,
    own_cache_layer,
)
from rewriter.rules import always_past

__all__ = ["main", "measure"]

_NEG = float(np.finfo(np.float32).min)
_F32 = TensorProto.FLOAT


class Case:
    def __init__(self, head_size: int, window: int | None, total: int, heads: int = 8) -> None:
        self.head_size, self.window, self.total = head_size, window, total
        self.num_heads, self.kv_num_heads = heads, 1

    @property
    def label(self) -> str:
        kind = "full" if self.window is None else f"W={self.window}"
        return f"D={self.head_size} {kind} own-cache decode T={self.total}"

    def forms(self) -> list[str]:
        forms = ["export", "gqa", "gqa-shared-buffer", "concat-fold"]
        return forms + (["concat-fold-window"] if self.window is not None else [])

    def layer(self) -> OneLayer:
        return OneLayer(self.num_heads, self.kv_num_heads, self.head_size, self.window, "p2")

    def data(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(1)
        n, nkv, d, t = self.num_heads, self.kv_num_heads, self.head_size, self.total
        return {
            "query": rng.standard_normal((1, 1, n * d), dtype=np.float32),
            NEW_KEY: rng.standard_normal((1, 1, nkv * d), dtype=np.float32),
            NEW_VALUE: rng.standard_normal((1, 1, nkv * d), dtype=np.float32),
            CACHE_KEY: rng.standard_normal((1, nkv, t - 1, d), dtype=np.float32),
            CACHE_VALUE: rng.standard_normal((1, nkv, t - 1, d), dtype=np.float32),
        }

    def bias(self, keys: int) -> np.ndarray:
        """[1, 1, G, keys]: the last `keys` of T, the query at slot T - 1."""
        positions = np.arange(self.total - keys, self.total)
        allowed = np.ones(keys, dtype=bool)
        if self.window is not None:
            allowed &= (self.total - 1 - positions) < self.window
        group = self.num_heads // self.kv_num_heads
        row = np.where(allowed, 0.0, _NEG).astype(np.float32)
        return np.ascontiguousarray(np.broadcast_to(row, (1, 1, group, keys)))


def _model(nodes, inputs, outputs, initializers, name: str) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 11
    return model.SerializeToString()


def _concat_fold(case: Case, window: bool) -> bytes:
    n, nkv, d = case.num_heads, case.kv_num_heads, case.head_size
    group = n // nkv
    inputs = [
        helper.make_tensor_value_info("query", _F32, [1, 1, n * d]),
        helper.make_tensor_value_info(NEW_KEY, _F32, [1, 1, nkv * d]),
        helper.make_tensor_value_info(NEW_VALUE, _F32, [1, 1, nkv * d]),
        helper.make_tensor_value_info(CACHE_KEY, _F32, [1, nkv, "past", d]),
        helper.make_tensor_value_info(CACHE_VALUE, _F32, [1, nkv, "past", d]),
        helper.make_tensor_value_info("bias", _F32, [1, 1, group, "keys"]),
    ]
    outputs = [
        helper.make_tensor_value_info("output", _F32, [1, 1, n * d]),
        helper.make_tensor_value_info("present_key", _F32, [1, nkv, "total", d]),
        helper.make_tensor_value_info("present_value", _F32, [1, nkv, "total", d]),
    ]
    initializers = [
        # S == 1: [B, 1, Nkv*D] is [B, Nkv, 1, D] as it lies in memory.
        helper.make_tensor("new_BNSD", TensorProto.INT64, [4], [0, nkv, 1, d]),
        helper.make_tensor("folded", TensorProto.INT64, [4], [0, nkv, group, d]),
        helper.make_tensor("merged", TensorProto.INT64, [3], [0, 1, n * d]),
        helper.make_tensor("window_start", TensorProto.INT64, [1], [-(case.window or 1)]),
        helper.make_tensor("end", TensorProto.INT64, [1], [np.iinfo(np.int64).max]),
        helper.make_tensor("time_axis", TensorProto.INT64, [1], [2]),
    ]
    nodes = []
    for name, cache, present in (
        (NEW_KEY, CACHE_KEY, "present_key"),
        (NEW_VALUE, CACHE_VALUE, "present_value"),
    ):
        nodes += [
            helper.make_node("Reshape", [name, "new_BNSD"], [f"{name}_BNSD"]),
            helper.make_node("Concat", [cache, f"{name}_BNSD"], [present], axis=2),
        ]
    read = ["present_key", "present_value"]
    if window:
        nodes += [
            helper.make_node("Slice", [p, "window_start", "end", "time_axis"], [f"{p}_window"])
            for p in read
        ]
        read = [f"{p}_window" for p in read]
    nodes += [
        helper.make_node("Reshape", ["query", "folded"], ["query_BKGD"]),
        helper.make_node(
            "Attention", ["query_BKGD", *read, "bias"], ["output_BKGD"], scale=1.0, is_causal=0
        ),
        helper.make_node("Reshape", ["output_BKGD", "merged"], ["output"]),
    ]
    return _model(nodes, inputs, outputs, initializers, "own_cache_concat_fold")


def _gqa_node(case: Case) -> bytes:
    """GQA alone, with seqlens_k/total fed (for the shared-buffer binding)."""
    n, nkv, d = case.num_heads, case.kv_num_heads, case.head_size
    inputs = [
        helper.make_tensor_value_info("query", _F32, [1, 1, n * d]),
        helper.make_tensor_value_info(NEW_KEY, _F32, [1, 1, nkv * d]),
        helper.make_tensor_value_info(NEW_VALUE, _F32, [1, 1, nkv * d]),
        helper.make_tensor_value_info(CACHE_KEY, _F32, [1, nkv, "max", d]),
        helper.make_tensor_value_info(CACHE_VALUE, _F32, [1, nkv, "max", d]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [1]),
    ]
    outputs = [
        helper.make_tensor_value_info("output", _F32, [1, 1, n * d]),
        helper.make_tensor_value_info("present_key", _F32, [1, nkv, "max", d]),
        helper.make_tensor_value_info("present_value", _F32, [1, nkv, "max", d]),
    ]
    attributes = {"num_heads": n, "kv_num_heads": nkv, "scale": 1.0, "do_rotary": 0}
    if case.window is not None:
        attributes["local_window_size"] = case.window
    node = helper.make_node(
        "GroupQueryAttention",
        [i.name for i in inputs],
        [o.name for o in outputs],
        domain="com.microsoft",
        **attributes,
    )
    return _model([node], inputs, outputs, [], "own_cache_gqa_shared_buffer")


def _rewritten(case: Case) -> bytes:
    from rewriter.pipeline import rewrite

    model, report = rewrite(own_cache_layer(case.layer()), layers="all", choose_form=always_past)
    assert report.rewritten == 1, report.summary()
    return ir.to_proto(model).SerializeToString()


def _calls(
    case: Case, options: ort.SessionOptions
) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], list[np.ndarray]]]]:
    """Per form: a timed call, and a call returning (output, present_key, present_value)."""
    data = case.data()
    mask = {"attention_mask": np.ones((1, case.total), dtype=np.int64)}
    timed: dict[str, Callable[[], object]] = {}
    results: dict[str, Callable[[], list[np.ndarray]]] = {}
    providers = ["CPUExecutionProvider"]
    names = ["output", "present_key", "present_value"]
    for form in case.forms():
        if form in ("export", "gqa"):
            model = (
                onnx.load_from_string(_rewritten(case)).SerializeToString()
                if form == "gqa"
                else ir.to_proto(own_cache_layer(case.layer())).SerializeToString()
            )
            session = ort.InferenceSession(model, options, providers=providers)
            feeds = {**data, **mask}
            timed[form] = _run(session, names, feeds)
            results[form] = _run(session, names, feeds)
        elif form.startswith("concat-fold"):
            window = form == "concat-fold-window"
            session = ort.InferenceSession(_concat_fold(case, window), options, providers=providers)
            keys = case.window if window and case.window is not None else case.total
            feeds = {**data, "bias": case.bias(min(keys, case.total))}
            timed[form] = _run(session, names, feeds)
            results[form] = _run(session, names, feeds)
        else:  # gqa-shared-buffer
            session = ort.InferenceSession(_gqa_node(case), options, providers=providers)
            timed[form], results[form] = _shared_buffer(case, session, data)
    return timed, results


def _run(session: ort.InferenceSession, names: list[str], feeds: dict[str, np.ndarray]):
    return lambda: session.run(names, feeds)


def _shared_buffer(case: Case, session: ort.InferenceSession, data: dict[str, np.ndarray]):
    """Past and present bound to one [1, Nkv, T, D] buffer per K and V: GQA writes slot T-1.
    Every call writes the same new token at the same slot, so the buffer stays valid."""
    shape = (1, case.kv_num_heads, case.total, case.head_size)
    buffers = {}
    for name, past in ((CACHE_KEY, data[CACHE_KEY]), (CACHE_VALUE, data[CACHE_VALUE])):
        full = np.zeros(shape, dtype=np.float32)
        full[:, :, : case.total - 1] = past
        buffers[name] = ort.OrtValue.ortvalue_from_numpy(full)
    binding = session.io_binding()
    for name in ("query", NEW_KEY, NEW_VALUE):
        binding.bind_cpu_input(name, data[name])
    binding.bind_cpu_input("seqlens_k", np.array([case.total - 1], dtype=np.int32))
    binding.bind_cpu_input("total_sequence_length", np.array([case.total], dtype=np.int32))
    binding.bind_output("output")  # first: get_outputs() lists them in binding order
    for past, present in ((CACHE_KEY, "present_key"), (CACHE_VALUE, "present_value")):
        binding.bind_ortvalue_input(past, buffers[past])
        binding.bind_ortvalue_output(present, buffers[past])

    def call() -> None:
        session.run_with_iobinding(binding)

    def result() -> list[np.ndarray]:
        session.run_with_iobinding(binding)
        return [
            binding.get_outputs()[0].numpy(),
            buffers[CACHE_KEY].numpy().copy(),
            buffers[CACHE_VALUE].numpy().copy(),
        ]

    return call, result


def measure(cases: Sequence[Case], repeats: int) -> list[dict]:
    options = quiet_session_options(threads=1)
    rows = []
    for case in cases:
        timed, results = _calls(case, options)
        outputs = {form: results[form]() for form in timed}
        reference = outputs["export"]
        timings = interleaved(timed, repeats=repeats, warmup=2, clock=time.thread_time)
        forms = {}
        for form, timing in timings.items():
            samples = np.array(timing.samples)
            row = timing.to_dict()
            row["max_abs_diff_vs_export"] = [
                float(np.abs(got - want).max())
                for got, want in zip(outputs[form], reference, strict=True)
            ]
            for base in ("export", "gqa", "gqa-shared-buffer"):
                ratios = samples / np.array(timings[base].samples)
                row[f"ratio_to_{base}"] = {
                    "median": float(np.median(ratios)),
                    "min": float(ratios.min()),
                    "max": float(ratios.max()),
                }
            forms[form] = row
        rows.append({"case": case.label, "forms": forms})
        cells = "  ".join(f"{form} {timings[form].median * 1e3:7.3f}" for form in timings)
        print(f"{case.label:36} {cells}  (ms)", flush=True)
    return rows


def markdown(rows: Sequence[dict]) -> str:
    forms = ["export", "gqa", "gqa-shared-buffer", "concat-fold", "concat-fold-window"]
    lines = ["| case | " + " | ".join(forms) + " |", "|---|" + "---|" * len(forms)]
    for row in rows:
        cells = []
        for form in forms:
            entry = row["forms"].get(form)
            if entry is None:
                cells.append("")
                continue
            ratio = entry["ratio_to_gqa-shared-buffer"]
            cells.append(
                f"{entry['median_ms']:.3f} ({ratio['min']:.2f}-{ratio['max']:.2f}x shared-buffer)"
            )
        lines.append(f"| {row['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        cases = [Case(64, 8, 64), Case(128, None, 64)]
    else:
        cases = [Case(d, w, t) for d, w in ((256, 512), (512, None)) for t in (1024, 4096, 8192)]
    rows = measure(cases, args.repeats)
    print(markdown(rows))
    if args.json:
        record = {
            "command": "python bench/own_cache_decode.py " + " ".join(argv or sys.argv[1:]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": _commit(),
            "onnxruntime": ort.__version__,
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "note": "shared machine (2 cores, other workers' jobs running): CPU time of "
                "the calling thread with intra_op_num_threads=1, rounds interleaved",
            },
            "repeats": args.repeats,
            "decode": rows,
        }
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
