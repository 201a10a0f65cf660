"""What the rewrite changes, measured: ``python bench/run.py [--quick] [--provider cpu|cuda]``.

    python bench/run.py --json bench/results/results.json     # E2B size, CPU, ~30 min
    python bench/run.py --quick --json /tmp/quick.json                # tiny model, seconds
    python bench/run.py --provider cuda --dtype float16 --json cuda.json   # GPU machine

Writes the JSON results and, beside them, a Markdown table (OUT.md). Measures, on the same
session options and interleaved call by call: prefill latency (S = 512, 2048), decode-step
latency (T = 1024, 4096, 8192; past of T - 1 random cache entries), rewritten/original ratios, a
per-layer-type profile, the peak memory of a decode step (one process per model), the pass
itself (load + rewrite + save, its peak memory, the verifier, onnxscript's optimizer as a
yardstick) and the node counts. No numbers are asserted here: that is for a reader.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript

from bench.inference import Scenario, categorize_nodes, measure_latency, profile_step
from bench.models import CACHE_DIR, VARIANTS, ModelPaths, ensure_models
from bench.provenance import commit
from bench.report import markdown

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent

# (name, S, T, repeats at full size). Quick mode keeps the shapes (the tiny model is cheap).
SCENARIOS = (
    ("prefill_s512", 512, 512, 5),
    ("prefill_s2048", 2048, 2048, 3),
    ("decode_t1024", 1, 1024, 20),
    ("decode_t4096", 1, 4096, 20),
    ("decode_t8192", 1, 8192, 10),
)
QUICK_REPEATS = 3


def _scenarios(quick: bool, names: Sequence[str] | None = None) -> list[Scenario]:
    return [
        Scenario(name, s, t, QUICK_REPEATS if quick else repeats)
        for name, s, t, repeats in SCENARIOS
        if names is None or name in names
    ]


def _worker(*args: object, timeout: float = 3600) -> dict:
    """Run one bench._worker measurement in a fresh process; its last stdout line is JSON."""
    command = [sys.executable, "-m", "bench._worker", *map(str, args)]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _op_counts(path: Path) -> dict[str, int]:
    model = ir.load(path)
    return dict(
        sorted(
            collections.Counter(
                n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)
            ).items()
        )
    )


def _node_counts(paths: ModelPaths) -> dict:
    original = _op_counts(paths.original)
    result: dict[str, object] = {"original": original, "original_total": sum(original.values())}
    for variant, path in paths.rewritten.items():
        counts = _op_counts(path)
        ops = sorted(set(original) | set(counts))
        result[variant] = {
            "ops": counts,
            "total": sum(counts.values()),
            "removed": {
                op: original.get(op, 0) - counts.get(op, 0)
                for op in ops
                if original.get(op, 0) > counts.get(op, 0)
            },
            "added": {
                op: counts.get(op, 0) - original.get(op, 0)
                for op in ops
                if counts.get(op, 0) > original.get(op, 0)
            },
        }
    return result


def _machine(provider: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [
                line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    memory_gb = None
    try:
        with open("/proc/meminfo") as handle:
            total_kb = int(handle.readline().split()[1])
        memory_gb = round(total_kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gb": memory_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "onnx_ir": ir.__version__,
        "onnxscript": onnxscript.__version__,
        "provider": provider,
        # The machine is shared: the load before and after says whether anything else ran.
        "load_average_before": os.getloadavg(),
    }


def _file_mb(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return size / 2**20


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    workload = "tiny" if args.quick else args.workload
    print(f"models ({workload}, {args.dtype}) in {args.cache_dir}", flush=True)
    paths = ensure_models(workload, args.variants, args.cache_dir, args.provider, dtype=args.dtype)
    config = paths.config
    models = {"original": paths.original, **paths.rewritten}
    scenarios = _scenarios(args.quick, args.scenarios)
    result: dict[str, object] = {
        "command": "python " + shlex.join(["bench/run.py", *args.argv]),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(args.provider),
        "quick": args.quick,
        "clock": "cpu time, 1 intra-op thread" if args.cpu_time else "wall, default threads",
        "workload": {
            "name": workload,
            "config": dataclasses.asdict(config),
            "file_mb": {name: _file_mb(path) for name, path in models.items()},
            "generate_seconds": paths.generate_seconds,
            "variants": {name: _describe_variant(name) for name in paths.rewritten},
        },
    }

    print("latency (interleaved, median)", flush=True)
    latency = measure_latency(
        models,
        scenarios,
        provider=args.provider,
        vocab_size=config.vocab_size,
        cpu_time=args.cpu_time,
    )
    result["latency"] = latency

    print("profiles", flush=True)
    layer_types = config.resolved_layer_types
    profiles: dict[str, dict] = {}
    for scenario in scenarios:
        if scenario.name not in args.profile:
            continue
        profiles[scenario.name] = {}
        for name, path in models.items():
            categories = categorize_nodes(ir.load(path), layer_types, config.first_shared_layer)
            runs = 1 if args.quick else 3 if scenario.phase == "prefill" else 10
            profiles[scenario.name][name] = profile_step(
                path,
                scenario,
                provider=args.provider,
                vocab_size=config.vocab_size,
                categories=categories,
                runs=runs,
            )
    result["profile"] = profiles

    result.update(_headline_ratios(latency, workload))
    if workload == "e2b" and args.all_attention:
        # The all-Attention export of the same model, where every layer is converted: its
        # worst scenario is a headline of its own (issue 13: none above 1.0).
        print("all-Attention export (latency only)", flush=True)
        whole = ensure_models(
            "e2b-all-attention", args.variants, args.cache_dir, args.provider, dtype=args.dtype
        )
        whole_latency = measure_latency(
            {"original": whole.original, **whole.rewritten},
            scenarios,
            provider=args.provider,
            vocab_size=whole.config.vocab_size,
            cpu_time=args.cpu_time,
        )
        result["all_attention_latency"] = whole_latency
        result["all_attention_max_ratio"] = _headline_ratios(whole_latency, "e2b-all-attention")[
            "all_attention_max_ratio"
        ]
    if args.latency_only:
        result["wall_seconds"] = time.perf_counter() - started
        return result

    print("decode-step memory (one process per model)", flush=True)
    longest_decode = max(
        (s for s in scenarios if s.phase == "decode"), key=lambda s: s.total_length
    )
    result["decode_rss"] = {
        "total_length": longest_decode.total_length,
        "models": {
            name: _worker(
                "decode-rss",
                path,
                "--total-length",
                longest_decode.total_length,
                "--vocab",
                config.vocab_size,
                "--provider",
                args.provider,
            )
            for name, path in models.items()
        },
    }

    print("the pass: load + rewrite + save, verifier, onnxscript optimizer", flush=True)
    scratch = args.cache_dir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    result["pass"] = _worker(
        "pass", paths.original, scratch / "pass.onnx", "--provider", args.provider
    )
    result["optimizer_yardstick"] = _worker("optimize", paths.original, scratch / "optimized.onnx")
    if args.verify:
        # The default (auto: layer proofs, and the whole model where it fits), then each
        # mode alone, so the report shows what each costs.
        result["verify"] = _worker(
            "verify", paths.original, paths.rewritten["rewritten"], "--provider", args.provider
        )
        result["verify_modes"] = {
            mode: _worker(
                "verify",
                paths.original,
                paths.rewritten["rewritten"],
                "--provider",
                args.provider,
                "--mode",
                mode,
            )
            for mode in ("layers", "model")
        }
        # The other variants are measured too, so they must compute the same thing; at full
        # size only on request (each verification opens two more sessions of the model).
        if args.quick or args.verify_variants:
            result["verify_variants"] = {
                name: _worker("verify", paths.original, path, "--provider", args.provider)
                for name, path in paths.rewritten.items()
                if name != "rewritten"
            }
    else:
        result["verify"] = {"skipped": "--no-verify"}
    if args.weight_scaling and not args.quick:
        # Same graph, ~2.3x the weights (the real E2B MLP width): the pass's peak memory
        # must not move.
        wide = ensure_models(workload, [], args.cache_dir, dtype=args.dtype, intermediate_size=6144)
        result["pass_wide_mlp"] = {
            "intermediate_size": 6144,
            "file_mb": _file_mb(wide.original),
            **_worker(
                "pass", wide.original, scratch / "pass_wide.onnx", "--provider", args.provider
            ),
        }
    for leftover in scratch.glob("*"):
        leftover.unlink()

    result["nodes"] = _node_counts(paths)
    result["rewrite_seconds"] = result["pass"]["rewrite_seconds"]
    result["rewrite_peak_rss_mb"] = result["pass"]["peak_rss_mb"]
    result["wall_seconds"] = time.perf_counter() - started
    result["load_average_after"] = os.getloadavg()
    return result


def latency_ratio(latency: dict, variant: str) -> dict[str, float]:
    return {
        name: scenario["models"][variant]["ratio_to_original"]
        for name, scenario in latency.items()
        if variant in scenario["models"]
    }


def _describe_variant(name: str) -> str:
    return VARIANTS[name][1]


def _headline_ratios(latency: dict, workload: str) -> dict[str, float | None]:
    """rewritten / original medians of the scenarios the issues set targets on; for the
    all-Attention export (every layer converted) also the worst scenario, whose target is
    no scenario above 1.0."""
    rewritten = latency_ratio(latency, "rewritten")
    headline: dict[str, float | None] = {
        f"{kind}_ratio_{length}": rewritten.get(f"{kind}_{length}")
        for kind, length in (
            ("decode", "t1024"),
            ("decode", "t4096"),
            ("decode", "t8192"),
            ("prefill", "s2048"),
        )
    }
    whole_model = workload == "e2b-all-attention" and bool(rewritten)
    headline["all_attention_max_ratio"] = max(rewritten.values()) if whole_model else None
    return headline


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats (smoke test)")
    parser.add_argument(
        "--workload",
        choices=("e2b", "e2b-all-attention"),
        default="e2b",
        help="export style at E2B size: non-shared layers GQA (default) or all Attention",
    )
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        help="models to compare with the original (default: rewritten speed-off)",
    )
    parser.add_argument(
        "--profile",
        nargs="*",
        default=["prefill_s512", "decode_t4096"],
        help="scenarios to profile per node (default: prefill_s512 decode_t4096)",
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=[name for name, *_ in SCENARIOS],
        help="measure only these (default: all; the headline keys need all)",
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="cross-check: one intra-op thread, CPU time of the calling thread (not wall time)",
    )
    parser.add_argument(
        "--latency-only",
        action="store_true",
        help="latency and profiles only: no memory, pass, verifier or node counts",
    )
    parser.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip timing the verifier"
    )
    parser.add_argument(
        "--verify-variants",
        action="store_true",
        help="also verify the variants other than 'rewritten' (always done with --quick)",
    )
    parser.add_argument(
        "--no-all-attention",
        dest="all_attention",
        action="store_false",
        help="with the e2b workload, skip the latency of its all-Attention export",
    )
    parser.add_argument(
        "--no-weight-scaling",
        dest="weight_scaling",
        action="store_false",
        help="skip the pass on a same-graph model with 2.3x the weights",
    )
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = ["rewritten", "speed-off"]
    if "rewritten" not in args.variants:
        parser.error("--variants must include 'rewritten' (the tool's default output)")
    args.argv = argv
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    args.json.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
