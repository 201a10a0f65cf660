"""Time onnxruntime-genai on an original and a rewritten package: the workload users see.

    python bench/genai_bench.py ORIGINAL_PKG REWRITTEN_PKG --prompts 512 2048 4000 \\
        --new-tokens 64 --rounds 5 --json bench/results/results_genai.json

Per prompt length: time to first token (``append_tokens`` plus the first
``generate_next_token``: the prefill and the first pick) and decode ms/token (the other
``new_tokens - 1`` steps, each running the model on one token), greedy, batch 1, each package
in the share-buffer mode its own config declares. Rounds are interleaved, the order reversed
every round, so drift in the machine's load is spread over both packages; medians with min and
max per package. Ratios are rewritten / original: ``genai_prefill_ratio_l<L>``,
``genai_decode_ratio_l<L>``.

Wall clock: genai runs ORT's thread pool (``--threads``, default 1 so that another job on a
shared machine costs both packages alike). Do not run E2B-size packages on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import commit

__all__ = ["main", "measure"]


def _model(package: Path, threads: int) -> Any:
    import onnxruntime_genai as og

    config = og.Config(str(package))
    session = {"intra_op_num_threads": threads, "log_severity_level": 3}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    return og.Model(config)


def _prompt(config: dict[str, Any], length: int, seed: int) -> np.ndarray:
    model = config["model"]
    eos = model.get("eos_token_id")
    special = {model.get("pad_token_id"), model.get("bos_token_id")}
    special |= set(eos) if isinstance(eos, list) else {eos}
    ordinary = np.array([t for t in range(int(model["vocab_size"])) if t not in special])
    return np.random.default_rng(seed).choice(ordinary, size=(1, length)).astype(np.int32)


def _one_generation(model: Any, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds per decode step)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = prompt.shape[1] + new_tokens
    # min_length: an end-of-sequence token must not cut a generation short.
    params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=1)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt)
    generator.generate_next_token()
    first = time.perf_counter()
    steps = 0
    while not generator.is_done():
        generator.generate_next_token()
        steps += 1
    end = time.perf_counter()
    if steps != new_tokens - 1:
        raise RuntimeError(f"generated {steps + 1} tokens, expected {new_tokens}")
    return first - start, (end - first) / max(steps, 1)


def _summary(samples: list[float], scale: float) -> dict[str, Any]:
    return {
        "median": statistics.median(samples) * scale,
        "min": min(samples) * scale,
        "max": max(samples) * scale,
        "samples": [round(s * scale, 4) for s in samples],
    }


def measure(
    packages: dict[str, Path],
    prompts: list[int],
    *,
    new_tokens: int,
    rounds: int,
    threads: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Timings per prompt length and package label; the first label is the baseline."""
    import onnxruntime as ort
    import onnxruntime_genai as og

    configs = {
        label: json.loads((path / "genai_config.json").read_text())
        for label, path in packages.items()
    }
    models = {label: _model(path, threads) for label, path in packages.items()}
    baseline = next(iter(packages))
    raw: dict[int, dict[str, dict[str, list[float]]]] = {
        length: {label: {"prefill": [], "decode": []} for label in packages} for length in prompts
    }
    order = list(packages)
    for round_index in range(rounds + 1):  # round 0 warms every session up, untimed
        for length in prompts:
            prompt = _prompt(configs[baseline], length, seed + length)
            for label in order:
                ttft, per_token = _one_generation(models[label], prompt, new_tokens)
                if round_index:
                    raw[length][label]["prefill"].append(ttft)
                    raw[length][label]["decode"].append(per_token)
        order.reverse()
    results: dict[str, Any] = {
        "onnxruntime": ort.__version__,
        "onnxruntime_genai": og.__version__,
        "machine": platform.platform(),
        "threads": threads,
        "rounds": rounds,
        "new_tokens": new_tokens,
        "packages": {
            label: {
                "path": str(path),
                "past_present_share_buffer": configs[label]
                .get("search", {})
                .get("past_present_share_buffer", False),
            }
            for label, path in packages.items()
        },
        "prompts": {},
    }
    for length in prompts:
        per_package = {
            label: {
                "prefill_s": _summary(raw[length][label]["prefill"], 1.0),
                "decode_ms_per_token": _summary(raw[length][label]["decode"], 1e3),
            }
            for label in packages
        }
        results["prompts"][str(length)] = per_package
        base = per_package[baseline]
        for label in packages:
            if label == baseline:
                continue
            # The first rewritten package (the CLI's default) gets the plain keys.
            suffix = "" if label == "rewritten" else f"_{label}"
            mine = per_package[label]
            results[f"genai_prefill_ratio_l{length}{suffix}"] = (
                mine["prefill_s"]["median"] / base["prefill_s"]["median"]
            )
            results[f"genai_decode_ratio_l{length}{suffix}"] = (
                mine["decode_ms_per_token"]["median"] / base["decode_ms_per_token"]["median"]
            )
            for phase in ("prefill", "decode"):
                ratios = np.array(raw[length][label][phase]) / np.array(
                    raw[length][baseline][phase]
                )
                mine[f"{phase}_round_ratio_min"] = float(ratios.min())
                mine[f"{phase}_round_ratio_max"] = float(ratios.max())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("original", type=Path, help="the package as exported (the baseline)")
    parser.add_argument("rewritten", type=Path, nargs="+", help="rewritten package(s)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[512, 2048, 4000])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    packages = {"original": args.original}
    for index, path in enumerate(args.rewritten):
        packages["rewritten" if index == 0 else f"rewritten{index + 1}"] = path
    load_before = os.getloadavg()
    results = measure(
        packages,
        args.prompts,
        new_tokens=args.new_tokens,
        rounds=args.rounds,
        threads=args.threads,
    )
    results["commit"] = commit()
    results["command"] = " ".join(["python", "bench/genai_bench.py", *(argv or sys.argv[1:])])
    results["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results["load_average_before"] = load_before
    results["load_average_after"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    for length, per_package in results["prompts"].items():
        for label, timing in per_package.items():
            print(
                f"prompt {length:>5} {label:<12} first token "
                f"{timing['prefill_s']['median'] * 1e3:9.2f} ms  decode "
                f"{timing['decode_ms_per_token']['median']:8.3f} ms/token"
            )
    for key, value in results.items():
        if key.startswith("genai_"):
            print(f"{key}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
