"""The Markdown tables of a bench/run.py result (the README's results section)."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["markdown"]


def _ms(row: Mapping) -> str:
    return f"{row['median_ms']:.1f} ± {row['iqr_ms'] / 2:.1f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _latency_table(latency: Mapping, variants: list[str]) -> list[str]:
    lines = [
        "| scenario | original | " + " | ".join(f"{v} | ratio" for v in variants) + " |",
        "|---|---|" + "---|---|" * len(variants),
    ]
    for scenario in latency.values():
        cells = [_ms(scenario["models"]["original"])]
        for variant in variants:
            row = scenario["models"][variant]
            cells += [_ms(row), f"**{row['ratio_to_original']:.3f}**"]
        label = f"{scenario['phase']} S={scenario['query_length']} T={scenario['total_length']}"
        lines.append(
            f"| {label} ({scenario['models']['original']['repeats']} runs) | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def markdown(result: Mapping) -> str:
    machine = result["machine"]
    models = list(next(iter(result["latency"].values()))["models"])
    variants = [name for name in models if name != "original"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
        f"{machine['memory_gb']} GB RAM, {machine['os']}; onnxruntime {machine['onnxruntime']} "
        f"({machine['provider']}); {_load(result)}  ",
        f"Date: {result['date']}  ",
        f"Workload: {_workload(result['workload'])}",
        "",
        f"Latency ({result.get('clock', 'wall, default threads')}), median ± half the "
        "interquartile range (ms), original and rewritten interleaved call by call; "
        "ratio = rewritten / original:",
        "",
    ]
    lines += _latency_table(result["latency"], variants)
    if "all_attention_latency" in result:
        lines += [
            "",
            "The same model exported with every layer as Attention (e2b-all-attention), "
            f"latency only; worst ratio of `rewritten`: {result['all_attention_max_ratio']:.3f}",
            "",
        ]
        lines += _latency_table(result["all_attention_latency"], variants)
    for scenario_name, per_model in result.get("profile", {}).items():
        categories = sorted(
            {c for profile in per_model.values() for c in profile["ms_by_category"]}
        )
        lines += [
            "",
            f"Kernel time per call by layer type, ORT profiling, {scenario_name} (ms):",
            "",
            "| part | " + " | ".join(per_model) + " |",
            "|---|" + "---|" * len(per_model),
        ]
        for category in categories:
            cells = [
                f"{profile['ms_by_category'].get(category, 0.0):.1f}"
                for profile in per_model.values()
            ]
            lines.append(f"| {category} | " + " | ".join(cells) + " |")
        lines.append(
            "| **all kernels** | "
            + " | ".join(f"{profile['kernel_ms_total']:.1f}" for profile in per_model.values())
            + " |"
        )
        placement = "; ".join(
            f"{name}: {profile['nodes_by_provider']}, Memcpy {profile['memcpy_nodes']}"
            for name, profile in per_model.items()
        )
        lines.append(f"\nNodes by execution provider: {placement}")
    if "decode_rss" not in result:  # --latency-only
        return "\n".join(lines)
    rss = result["decode_rss"]
    lines += [
        "",
        f"Memory of a decode step at T={rss['total_length']} (a fresh process per model, MB):",
        "",
        "| model | RSS before the step | peak during the step | process peak (incl. load) |",
        "|---|---|---|---|",
    ]
    for name, row in rss["models"].items():
        step_peak = "-" if row["step_peak_mb"] is None else f"{row['step_peak_mb']:.0f}"
        lines.append(
            f"| {name} | {row['rss_before_step_mb']:.0f} | {step_peak} | "
            f"{row['process_peak_mb']:.0f} |"
        )
    lines += _pass_lines(result)
    lines += _node_lines(result["nodes"], variants)
    return "\n".join(lines)


def _workload(workload: Mapping) -> str:
    config = workload["config"]
    return (
        f"{workload['name']}: {config['num_layers']} layers ({config['num_kv_shared_layers']} "
        f"KV-shared), hidden {config['hidden_size']}, {config['num_heads']} query heads, "
        f"{config['num_kv_heads']} KV head, D {config['head_dim_sliding']}/"
        f"{config['head_dim_full']}, window {config['sliding_window']}, vocabulary "
        f"{config['vocab_size']}, MLP {config['intermediate_size']}, {config['dtype']}, "
        f"mask {config['mask_style']} is_causal={config['p2_is_causal']}, non-shared layers "
        f"{config['nonshared_attention']}; {workload['file_mb']['original']:.0f} MB with weights"
    )


def _pass_lines(result: Mapping) -> list[str]:
    run = result["pass"]
    lines = [
        "",
        "The pass (each in a fresh process; seconds, peak RSS in MB):",
        "",
        "| step | load | rewrite | save | total | peak RSS |",
        "|---|---|---|---|---|---|",
        f"| rewrite ({run['weights_mb']:.0f} MB of weights) | {_seconds(run['load_seconds'])} | "
        f"{_seconds(run['rewrite_seconds'])} (probe cached: "
        f"{_seconds(run['rewrite_seconds_probe_cached'])}) | {_seconds(run['save_seconds'])} | "
        f"{_seconds(run['total_seconds'])} | {run['peak_rss_mb']:.0f} |",
    ]
    wide = result.get("pass_wide_mlp")
    if wide:
        lines.append(
            f"| rewrite, same graph, MLP {wide['intermediate_size']} ({wide['weights_mb']:.0f} MB "
            f"of weights) | {_seconds(wide['load_seconds'])} | {_seconds(wide['rewrite_seconds'])} "
            f"(probe cached: {_seconds(wide['rewrite_seconds_probe_cached'])}) | "
            f"{_seconds(wide['save_seconds'])} | {_seconds(wide['total_seconds'])} | "
            f"{wide['peak_rss_mb']:.0f} |"
        )
    optimizer = result["optimizer_yardstick"]
    lines.append(
        f"| yardstick: `onnxscript.optimizer.optimize` | {_seconds(optimizer['load_seconds'])} | "
        f"{_seconds(optimizer['optimize_seconds'])} | {_seconds(optimizer['save_seconds'])} | "
        f"{_seconds(optimizer['total_seconds'])} | {optimizer['peak_rss_mb']:.0f} |"
    )
    verify = result["verify"]
    if "seconds" in verify:
        verdict = "passed" if verify["passed"] else "FAILED"
        lines.append(
            f"| verifier `rewriter.verify(original, rewritten)` ({verdict}, "
            f"{len(verify['checks'])} checks) | | | | {_seconds(verify['seconds'])} | "
            f"{verify['peak_rss_mb']:.0f} |"
        )
    else:
        lines.append(f"| verifier | {verify.get('skipped', '-')} | | | | |")
    for mode, run in result.get("verify_modes", {}).items():
        verdict = "passed" if run["passed"] else "FAILED"
        what = (
            f"{run['layers']} layers, worst max_abs_diff {run['layer_max_abs_diff']:.3g}"
            if mode == "layers" and run.get("layer_max_abs_diff") is not None
            else f"{len(run['checks'])} checks"
        )
        lines.append(
            f"| verifier `--verify {mode}` ({verdict}, {what}) | | | | "
            f"{_seconds(run['seconds'])} | {run['peak_rss_mb']:.0f} |"
        )
    for name, other in result.get("verify_variants", {}).items():
        verdict = "passed" if other["passed"] else "FAILED"
        lines.append(
            f"| verifier on variant {name} ({verdict}) | | | | {_seconds(other['seconds'])} | "
            f"{other['peak_rss_mb']:.0f} |"
        )
    return lines


def _node_lines(nodes: Mapping, variants: list[str]) -> list[str]:
    ops = sorted({op for v in variants for op in (*nodes[v]["removed"], *nodes[v]["added"])})
    lines = [
        "",
        "Nodes (whole graph):",
        "",
        "| op | original | " + " | ".join(variants) + " |",
        "|---|---|" + "---|" * len(variants),
    ]
    for op in ops:
        cells = [str(nodes[v]["ops"].get(op, 0)) for v in variants]
        lines.append(f"| {op} | {nodes['original'].get(op, 0)} | " + " | ".join(cells) + " |")
    lines.append(
        f"| **all nodes** | {nodes['original_total']} | "
        + " | ".join(str(nodes[v]["total"]) for v in variants)
        + " |"
    )
    return lines


def _load(result: Mapping) -> str:
    """The machine's load (files before the load was recorded carry a fixed note)."""
    machine = result["machine"]
    if "load_average_before" not in machine:
        return machine.get("note", "load not recorded")
    after = result.get("load_average_after")
    return (
        f"commit {result.get('commit', 'not recorded')}, load average before "
        f"{machine['load_average_before'][0]:.2f}, after {after[0] if after else float('nan'):.2f}"
    )
