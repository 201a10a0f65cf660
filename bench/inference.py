"""Running the decoders: sessions, feeds, interleaved latency, per-layer-type profiles.

Both models of a comparison get their own ``InferenceSession`` built from the same
``SessionOptions`` (ORT defaults: all graph optimizations, default thread count; only the
log level is raised). Feeds are batch 1; a decode step at total length T carries a past of
T - 1 positions of random cache data; a prefill of S tokens has an empty past (T = S).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from bench.timing import Timing, interleaved
from rewriter.providers import PROVIDERS
from rewriter.rules._speed_choice import SPEED_FORM_KEY

__all__ = [
    "Scenario",
    "categorize_nodes",
    "decoder_feeds",
    "make_call",
    "measure_latency",
    "open_session",
    "profile_step",
]


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One call shape: S new tokens at total length T (prefill: S == T)."""

    name: str
    query_length: int
    total_length: int
    repeats: int

    @property
    def phase(self) -> str:
        return "prefill" if self.query_length == self.total_length else "decode"


def session_options(*, profile_dir: str | None = None, threads: int = 0) -> ort.SessionOptions:
    """ORT's defaults (threads 0 = ORT's choice); only the log level is raised."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "profile")
    return options


def open_session(
    path: str | os.PathLike[str],
    provider: str = "cpu",
    *,
    profile_dir: str | None = None,
    threads: int = 0,
) -> ort.InferenceSession:
    session = ort.InferenceSession(
        os.fspath(path),
        session_options(profile_dir=profile_dir, threads=threads),
        providers=list(PROVIDERS[provider]),
    )
    if provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise RuntimeError(f"CUDA provider unavailable; session uses {session.get_providers()}")
    return session


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def decoder_feeds(
    session: ort.InferenceSession,
    query_length: int,
    total_length: int,
    rng: np.random.Generator,
    vocab_size: int,
) -> dict[str, np.ndarray]:
    """Batch-1 feeds for the fixture decoders' signature (input_ids, mask, positions, pasts)."""
    past_length = total_length - query_length
    feeds: dict[str, np.ndarray] = {
        "input_ids": rng.integers(0, vocab_size, (1, query_length), dtype=np.int64),
        "attention_mask": np.ones((1, total_length), dtype=np.int64),
        "position_ids": np.arange(past_length, total_length, dtype=np.int64)[None],
    }
    for arg in session.get_inputs():
        if arg.name.startswith("past_key_values."):
            dtype = _NUMPY_TYPES[arg.type]
            shape = (1, arg.shape[1], past_length, arg.shape[3])
            feeds[arg.name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return feeds


def make_call(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], provider: str
) -> Callable[[], object]:
    """One decoder call. On CUDA, inputs and outputs stay on the device (I/O binding), so the
    timing is the graph's, not PCIe copies of the caches."""
    if provider != "cuda":
        return lambda: session.run(None, dict(feeds))
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
    for arg in session.get_outputs():
        binding.bind_output(arg.name, "cuda")
    return lambda: session.run_with_iobinding(binding)


def measure_latency(
    models: Mapping[str, Path],
    scenarios: Sequence[Scenario],
    *,
    provider: str,
    vocab_size: int,
    warmup: int = 1,
    pause: float = 0.05,
    cpu_time: bool = False,
) -> dict[str, dict]:
    """Per scenario: every model's Timing, interleaved call by call, with ratios to the first
    (see bench.timing.interleaved for `pause`).

    `cpu_time`: one intra-op thread and the calling thread's CPU time instead of wall time,
    a cross-check that other jobs on a shared machine cannot inflate.
    """
    threads = 1 if cpu_time else 0
    sessions = {
        name: open_session(path, provider, threads=threads) for name, path in models.items()
    }
    baseline = next(iter(models))
    results: dict[str, dict] = {}
    for scenario in scenarios:
        calls = {}
        for name, session in sessions.items():
            feeds = decoder_feeds(
                session,
                scenario.query_length,
                scenario.total_length,
                np.random.default_rng(0),
                vocab_size,
            )
            calls[name] = make_call(session, feeds, provider)
        timings: dict[str, Timing] = interleaved(
            calls,
            repeats=scenario.repeats,
            warmup=warmup,
            pause=pause,
            clock=time.thread_time if cpu_time else time.perf_counter,
        )
        base = timings[baseline].median
        results[scenario.name] = {
            "phase": scenario.phase,
            "query_length": scenario.query_length,
            "total_length": scenario.total_length,
            "models": {
                name: {**timing.to_dict(), "ratio_to_original": timing.median / base}
                for name, timing in timings.items()
            },
        }
        cells = ", ".join(
            f"{name} {timing.median * 1e3:.1f} ms" for name, timing in timings.items()
        )
        print(f"  {scenario.name}: {cells}", flush=True)
        del calls
    return results


# --- profiles --------------------------------------------------------------------------------

_LAYER = re.compile(r"layers\.(\d+)/")
_FOLD_LAYER = re.compile(r"layers\.(\d+)\.")


def categorize_nodes(model: ir.Model, layer_types: Sequence[str], first_shared: int) -> dict:
    """Node name -> what it belongs to, for the fixture decoders' naming scheme.

    Attention and GroupQueryAttention nodes go by layer (a rewritten layer's GQA node is
    found through its output, which keeps the Attention output's name); the borrowed-cache
    Transpose/Reshape and the mask chain are named by the generator; the few nodes the
    rewrite adds (lengths, empty K/V) are "rewrite glue"; everything else is "rest".
    """
    categories = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        name = node.name or ""
        # The fold's float32 product is several nodes (rules._speed_choice.fold_product),
        # each marked, and named after the layer's replaced output ("...layers.N.self_attn...").
        if node.op_type in ("Attention", "GroupQueryAttention") or (
            node.metadata_props.get(SPEED_FORM_KEY) == "fold"
        ):
            match = (
                _LAYER.search(name)
                or _LAYER.search(node.outputs[0].name or "")
                or _FOLD_LAYER.search(name)
            )
            if match is None:
                categories[name] = "attention: unknown layer"
                continue
            layer = int(match.group(1))
            role = "shared" if layer >= first_shared else "own-cache"
            categories[name] = f"attention: {role} {layer_types[layer]}"
        elif "/borrowed_" in name:
            categories[name] = "borrowed K/V Transpose+Reshape"
        elif "/model/mask/" in name:
            categories[name] = "mask chain"
        elif "/model/gqa_lengths" in name or not name.startswith("/"):
            categories[name] = "lengths + rewrite glue"
        else:
            categories[name] = "rest (projections, MLP, norms)"
    return categories


def profile_step(
    path: Path,
    scenario: Scenario,
    *,
    provider: str,
    vocab_size: int,
    categories: Mapping[str, str],
    runs: int,
) -> dict:
    """Median per-node kernel time over `runs` profiled calls (after one unprofiled-in-effect
    warm-up), summed by category; plus where ORT placed the nodes and how many Memcpy ran.

    An If node's kernel time includes its branch, whose nodes the profile also lists one by
    one: it is reported apart (`if_ms_with_branches`) and not summed, or the branch would
    count twice."""
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as directory:
        session = open_session(path, provider, profile_dir=directory)
        feeds = decoder_feeds(
            session,
            scenario.query_length,
            scenario.total_length,
            np.random.default_rng(0),
            vocab_size,
        )
        call = make_call(session, feeds, provider)
        for _ in range(runs + 1):
            call()
        profile_path = session.end_profiling()
        with open(profile_path) as handle:
            events = json.load(handle)
    durations: dict[str, list[float]] = collections.defaultdict(list)
    op_of: dict[str, str] = {}
    provider_of: dict[str, str] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        node = event["name"][: -len("_kernel_time")]
        durations[node].append(event["dur"] / 1e3)
        op_of[node] = event["args"].get("op_name", "")
        provider_of[node] = event["args"].get("provider", "")
    by_category: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, float] = collections.defaultdict(float)
    if_ms = 0.0
    for node, values in durations.items():
        median = float(np.median(values[1:] if len(values) > 1 else values))
        if op_of[node] == "If":
            if_ms += median
            continue
        by_category[categories.get(node, "rest (projections, MLP, norms)")] += median
        by_op[op_of[node]] += median
    placement = collections.Counter(provider_of.values())
    memcpy = sum(1 for op in op_of.values() if op.startswith("Memcpy"))
    return {
        "scenario": scenario.name,
        "runs": runs,
        "ms_by_category": dict(sorted(by_category.items())),
        "ms_by_op": dict(sorted(by_op.items(), key=lambda item: -item[1])),
        "kernel_ms_total": sum(by_category.values()),
        "if_ms_with_branches": if_ms,
        "nodes_by_provider": dict(placement),
        "memcpy_nodes": memcpy,
    }
