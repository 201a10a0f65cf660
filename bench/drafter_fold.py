"""One drafter layer, as exported vs the fold the rewrite writes (issue 22 part 2).

A speculative-decoding drafter's layers read the target's cache (graph inputs, BNSH) through
Transpose+Reshape (a copy of T keys per layer per call); the fold
(``rules._speed_choice.fold_unmasked``) reads it in place with the query heads of each KV
head folded into the query axis. This times one layer of each kind, export vs
``rewriter.rewrite``'s output, interleaved round by round, CPU time of the calling thread
with one intra-op thread (other jobs on a shared machine cannot inflate it):

* ``full``: no mask, is_causal=0 (``UnmaskedSharedAttentionToFold``);
* ``sliding``: is_causal=0 with a [B, 1, S, T] float bias fed as an input
  (``DrafterBiasAttentionToFold``; the export's own bias chain is left out of both).

    python bench/drafter_fold.py [--repeats 30] \
        [--json bench/results/results_1.32_drafter_fold.json]
"""

from __future__ import annotations

import argparse
import dataclasses
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

from bench.attention_forms import quiet_session_options
from bench.provenance import commit
from bench.timing import interleaved
from rewriter import rewrite
from rewriter.rules import always_past

__all__ = ["DrafterLayer", "main", "measure"]


@dataclasses.dataclass(frozen=True)
class DrafterLayer:
    label: str
    kind: str  # "full" or "sliding"
    num_heads: int
    kv_num_heads: int
    head_size: int
    total: int  # T
    length: int  # S

    def export(self) -> onnx.ModelProto:
        n, nkv, d = self.num_heads, self.kv_num_heads, self.head_size
        cache = f"shared_kv.{self.kind}_attention"
        float_ = TensorProto.FLOAT
        inputs = [
            helper.make_tensor_value_info("query", float_, ["batch", "q_len", n * d]),
            helper.make_tensor_value_info(f"{cache}.key", float_, ["batch", nkv, "kv_len", d]),
            helper.make_tensor_value_info(f"{cache}.value", float_, ["batch", nkv, "kv_len", d]),
        ]
        nodes = []
        for part in ("key", "value"):
            nodes.append(
                helper.make_node(
                    "Transpose", [f"{cache}.{part}"], [f"{part}_BSND"], perm=[0, 2, 1, 3]
                )
            )
            nodes.append(helper.make_node("Reshape", [f"{part}_BSND", "merged"], [f"{part}_BSD"]))
        attention_inputs = ["query", "key_BSD", "value_BSD"]
        if self.kind == "sliding":
            inputs.append(
                helper.make_tensor_value_info("bias", float_, ["batch", 1, "q_len", "kv_len"])
            )
            attention_inputs.append("bias")
        nodes.append(
            helper.make_node(
                "Attention",
                attention_inputs,
                ["output"],
                q_num_heads=n,
                kv_num_heads=nkv,
                scale=1.0,
                is_causal=0,
            )
        )
        merged = helper.make_tensor("merged", TensorProto.INT64, [3], [0, 0, -1])
        graph = helper.make_graph(
            nodes,
            self.label,
            inputs,
            [helper.make_tensor_value_info("output", float_, ["batch", "q_len", n * d])],
            initializer=[merged],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])

    def fold(self) -> onnx.ModelProto:
        model, report = rewrite(ir.serde.deserialize_model(self.export()), choose_form=always_past)
        assert report.rewritten == 1 and report.rewrites[0].speed_form == "fold", report.summary()
        return ir.serde.serialize_model(model)

    def feeds(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        n, nkv, d, t, s = self.num_heads, self.kv_num_heads, self.head_size, self.total, self.length
        cache = f"shared_kv.{self.kind}_attention"
        feeds = {
            "query": rng.standard_normal((1, s, n * d)).astype(np.float32),
            f"{cache}.key": rng.standard_normal((1, nkv, t, d)).astype(np.float32),
            f"{cache}.value": rng.standard_normal((1, nkv, t, d)).astype(np.float32),
        }
        if self.kind == "sliding":
            # The last S keys' window of 512 (as mobius's bias computes it, right-aligned).
            query = np.arange(t - s, t)[:, None]
            distance = query - np.arange(t)[None, :]
            visible = (distance >= 0) & (distance < 512)
            bias = np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32)
            feeds["bias"] = bias[None, None]
        return feeds


def measure(layer: DrafterLayer, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    feeds = layer.feeds(rng)
    sessions = {
        form: ort.InferenceSession(
            model.SerializeToString(),
            quiet_session_options(threads=1),
            providers=["CPUExecutionProvider"],
        )
        for form, model in (("export", layer.export()), ("fold", layer.fold()))
    }
    outputs = {form: session.run(None, feeds)[0] for form, session in sessions.items()}
    difference = float(np.max(np.abs(outputs["export"] - outputs["fold"])))
    timings = interleaved(
        {form: (lambda s=session: s.run(None, feeds)) for form, session in sessions.items()},
        repeats=repeats,
        warmup=2,
        clock=time.thread_time,
    )
    # Per interleaved round: is the fold faster than the export?
    rounds = zip(timings["export"].samples, timings["fold"].samples, strict=True)
    fold_wins = sum(fold < export for export, fold in rounds)
    return {
        "layer": dataclasses.asdict(layer),
        "max_abs_diff_fold_vs_export": difference,
        "timings": {form: timing.to_dict() for form, timing in timings.items()},
        "fold_faster_rounds": fold_wins,
        "rounds": repeats,
    }


def layers() -> list[DrafterLayer]:
    out = []
    for total in (1024, 4096):
        for length in (1, 4):
            # The corpus drafter's attention size, and E2B's (N=8, Nkv=1).
            out.append(DrafterLayer("corpus-full", "full", 4, 2, 64, total, length))
            out.append(DrafterLayer("corpus-sliding", "sliding", 4, 2, 32, total, length))
            out.append(DrafterLayer("e2b-full", "full", 8, 1, 512, total, length))
            out.append(DrafterLayer("e2b-sliding", "sliding", 8, 1, 256, total, length))
    return out


def _cell(timing: dict) -> str:
    samples = timing["samples_ms"]
    return f"{timing['median_ms']:.3f} ({min(samples):.3f}/{max(samples):.3f})"


def markdown(results: Sequence[dict]) -> str:
    lines = [
        "| layer | T | S | export median ms (min/max) | fold median ms (min/max) "
        "| fold faster rounds |",
        "|---|---|---|---|---|---|",
    ]
    for entry in results:
        layer, timings = entry["layer"], entry["timings"]
        lines.append(
            f"| {layer['label']} | {layer['total']} | {layer['length']} | "
            f"{_cell(timings['export'])} | {_cell(timings['fold'])} | "
            f"{entry['fold_faster_rounds']}/{entry['rounds']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = [measure(layer, args.repeats) for layer in layers()]
    document = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "onnxruntime": ort.__version__,
        "platform": platform.platform(),
        "commit": commit(),
        "clock": "thread CPU time, intra_op_num_threads=1, interleaved rounds",
        "note": "shared machine (2 cores, other jobs running); CPU time, not wall time",
        "results": results,
    }
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(document, indent=1) + "\n")
        args.json.with_suffix(".md").write_text(markdown(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
