"""Build a real mobius export of Gemma 4 at E2B attention size, with random weights.

What it builds: mobius's own Gemma 4 text model (`gemma4_text`, the `Gemma4CausalLMModel` of
onnxruntime/mobius), from a `Gemma4Config` made here in code (mobius main's
`Gemma4Config.from_transformers` fails on transformers 5.25's `Gemma4TextConfig`), exported by
mobius's own `build_from_module` (task "gemma4-text-generation", the one mobius's `build` picks
for gemma4_text) for the execution provider you name, fp32:

- 35 layers, 4 sliding + 1 full repeating (layers 4, 9, ..., 34 full); the last 20 KV-shared
  (`num_kv_shared_layers=20`: layers 15-34 borrow the K/V of layer 13, the last own-cache sliding
  layer, or of layer 14, the last own-cache full layer);
- hidden 1536, 8 query heads, 1 KV head, head dim 256 sliding / 512 full (`global_head_dim`),
  sliding window 512, attention scale 1.0 (Gemma 4's, over RMS-normalised q and k), final logit
  softcap 30, partial rotary 0.25 on the full layers;
- per-layer embeddings as Gemma 4 E2B has them (256 per layer, gated into every layer), their
  vocabulary cut to the model's;
- vocabulary 2048 and MLP width 1024 (doubled in the KV-shared layers, `use_double_wide_mlp` as
  E2B has it), so the random weights are 2.42 GB of fp32 (2.52 GB of external data with
  mobius's rotary tables) instead of E2B's ~20 GB: attention is at real size, the rest is cut
  to fit a shared machine.

Random weights, seeded, drawn like the corpus's mobius exports (../shared/corpus/mobius-78437cd*):
every matrix normal with std 1/sqrt(its input width) (the lm head 2/sqrt(hidden)), every norm
weight 1 + N(0, 0.1), `layer_scalar` uniform in [0.5, 1), and q/k norm weights scaled by
sqrt(3/sqrt(head_dim)) so that attention logits have a standard deviation of about 3.

Written to OUT (default bench/cache/mobius-e2b-EP, git-ignored; never commit it):
`model.onnx` + `model.onnx.data` (external data), and `build_info.json` (config, EP, seed, mobius
commit, build time, sizes, attention node counts, which layers are KV-shared and from where,
input and output names). With `--package` it writes the onnxruntime-genai package instead
(mobius's `export_package`: the same model files plus `genai_config.json`).
When onnxruntime is importable it then loads the model on the CPU provider, runs one prefill
of 8 tokens and one decode step, and compares that step with one prefill of the 9 tokens
(`--check-only` does just that for an existing OUT, also from the project's venv). The same seed
gives byte-identical files.

It runs in its own virtual environment with mobius installed (not the project's: mobius needs
torch and transformers), from the repository root::

    python3 -m venv bench/cache/mobius-venv && . bench/cache/mobius-venv/bin/activate
    pip install torch==2.13.0 && pip install -e MOBIUS_SRC onnxruntime==1.32.0
    python scripts/mobius_e2b.py --mobius-src MOBIUS_SRC --ep default   # or --ep cpu
    pip install onnxruntime-genai==0.18.0   # only to run a --package build with the runtime

(install torch first: it is the CPU wheel; letting mobius's requirements pull torch would fetch a
CUDA build of several GB). MOBIUS_SRC is a checkout of onnxruntime/mobius (built and measured
at main 78437cd), e.g. `git -C MIRROR archive HEAD -- . ':!testdata' | tar -x -C
bench/cache/mobius-src` (the snapshot lacks some testdata blobs; pass `--mobius-commit 78437cd`
so build_info.json records what a plain copy cannot).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["E2B", "build", "check", "main"]

ROOT = Path(__file__).resolve().parent.parent

# Gemma 4 E2B's attention, with vocabulary and MLP cut (see the module docstring).
E2B: dict[str, Any] = {
    "num_hidden_layers": 35,
    "hidden_size": 1536,
    "intermediate_size": 1024,
    "use_double_wide_mlp": True,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "global_head_dim": 512,
    "sliding_window": 512,
    "num_kv_shared_layers": 20,
    "vocab_size": 2048,
    "hidden_size_per_layer_input": 256,
    "vocab_size_per_layer_input": 2048,
    "rms_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
    "attn_qk_norm": True,
    "rope_theta": 10_000.0,
    "global_rope_theta": 1_000_000.0,
    "global_partial_rotary_factor": 0.25,
    "final_logit_softcapping": 30.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 2,  # Gemma's ids; only genai_config.json reads them
    "eos_token_id": 1,
}
SLIDING_PER_FULL = 4  # E2B's pattern: 4 sliding layers, then 1 full, repeating
ATTENTION_LOGIT_STD = 3.0  # what the q/k norm weights aim the attention logits at
CHECK_PREFILL = 8


def _layer_types(layers: int) -> list[str]:
    period = SLIDING_PER_FULL + 1
    return [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers)
    ]


def _mobius_commit(source: Path) -> str:
    """The checkout's commit, or "unknown" for a plain copy (e.g. a `git archive`)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def _random_weight(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """One seeded random weight, drawn as the corpus's mobius exports were (module docstring)."""
    if len(shape) >= 2:
        std = 1.0 / math.sqrt(shape[-1])  # HF layout [out, in]: keeps activations at unit scale
        if name == "lm_head.weight":
            std *= 2.0  # logits of a few units, so the final softcap matters
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)
    if name.endswith("layer_scalar"):
        return rng.uniform(0.5, 1.0, shape).astype(np.float32)
    weight = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
        # q.k over unit-RMS q and k of width D has std sqrt(D) (scale 1.0): scale each side so
        # the logits have std ATTENTION_LOGIT_STD, softmax neither uniform nor one-hot.
        weight *= math.sqrt(ATTENTION_LOGIT_STD / math.sqrt(shape[0]))
    return weight.astype(np.float32)


def _layer_sharing(module: Any) -> dict[int, int]:
    """KV-shared layer -> the layer whose K/V it borrows, as mobius's module decided it."""
    sharing: dict[int, int] = {}
    for index, layer in enumerate(module.model.layers):
        source = getattr(layer.self_attn, "kv_shared_layer_index", None)
        if source is not None:
            sharing[index] = int(source)
    return sharing


def _structure(path: Path) -> dict[str, Any]:
    """Attention node counts and the graph's input and output names (no weights loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(
        f"{node.domain or 'ai.onnx'}::{node.op_type}"
        for node in model.graph.node
        if node.op_type in ("Attention", "GroupQueryAttention", "MultiHeadAttention")
    )
    consumed = {name for node in model.graph.node for name in node.input}
    inputs = [value.name for value in model.graph.input]
    return {
        "attention_ops": dict(sorted(ops.items())),
        "nodes": len(model.graph.node),
        "opset": {entry.domain or "ai.onnx": entry.version for entry in model.opset_import},
        "inputs": inputs,
        "inputs_not_consumed": [name for name in inputs if name not in consumed],
        "outputs": [value.name for value in model.graph.output],
    }


def _sizes(out: Path) -> dict[str, int]:
    """The files the build wrote (OUT also gathers what later runs put there, e.g. a rewrite)."""
    return {
        item.name: item.stat().st_size
        for item in sorted(out.iterdir())
        if item.name.startswith("model.onnx") or item.name == "genai_config.json"
    }


def build(out: Path, ep: str, mobius_src: Path | None, seed: int, package: bool) -> dict[str, Any]:
    """Build, fill with seeded random weights and save; returns what build_info.json records."""
    if mobius_src is not None:
        sys.path.insert(0, str(mobius_src / "src"))
    import torch
    from mobius import build_from_module
    from mobius._config_resolver import _default_task_for_model
    from mobius._configs import Gemma4Config
    from mobius._registry import registry

    started = time.perf_counter()
    fields = dict(E2B, layer_types=_layer_types(E2B["num_hidden_layers"]))
    config = Gemma4Config(model_type="gemma4_text", **fields)
    module = registry.get("gemma4_text")(config)
    sharing = _layer_sharing(module)
    # The task mobius's own `build` picks for gemma4_text ("gemma4-text-generation"): a KV cache
    # only for the 15 own-cache layers, each at its own head dim (256 sliding, 512 full).
    task = _default_task_for_model("gemma4_text")
    pkg = build_from_module(module, config, task=task, execution_provider=ep)
    graph_seconds = time.perf_counter() - started

    # Weights by the names mobius's graph asks for (its HF-style state dict); apply_weights
    # then runs mobius's own post-weight folds (transposed `*_t` weights, packed QKV).
    model = pkg["model"]
    rng = np.random.default_rng(seed)
    state: dict[str, torch.Tensor] = {}
    for name, value in model.graph.initializers.items():
        if value.const_value is None:
            shape = tuple(int(d) for d in value.shape)
            state[name] = torch.from_numpy(_random_weight(name, shape, rng))
    parameters = sum(int(t.numel()) for t in state.values())
    pkg.apply_weights(state)
    del state
    weights_seconds = time.perf_counter() - started - graph_seconds

    out.mkdir(parents=True, exist_ok=True)
    if package:
        from mobius.integrations.ort_genai import export_package

        if getattr(pkg, "config", None) is None:
            pkg.config = config  # export_package reads the genai_config fields from it
        # genai_config's session options: "default" is a graph form, the runtime is the CPU.
        export_package(pkg, str(out), ep=ep if ep != "default" else "cpu", progress_bar=False)
    else:
        pkg.save(str(out), progress_bar=False)
    seconds = time.perf_counter() - started
    return {
        "made_by": "scripts/mobius_e2b.py",
        "mobius_src": str(mobius_src) if mobius_src is not None else None,
        "mobius_commit": _mobius_commit(mobius_src) if mobius_src is not None else "installed",
        "torch": torch.__version__,
        "execution_provider": ep,
        "dtype": "f32",
        "seed": seed,
        "package": package,
        "task": task,
        "config": fields,
        "parameters": parameters,
        "kv_shared_from": {str(k): v for k, v in sorted(sharing.items())},
        "build_seconds": {
            "graph": round(graph_seconds, 1),
            "weights": round(weights_seconds, 1),
            "total": round(seconds, 1),
        },
    }


def check(out: Path, threads: int = 2) -> dict[str, Any]:
    """One prefill of CHECK_PREFILL tokens and one decode step on onnxruntime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    started = time.perf_counter()
    session = ort.InferenceSession(
        str(out / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    load_seconds = time.perf_counter() - started
    inputs = {value.name: value for value in session.get_inputs()}
    outputs = [value.name for value in session.get_outputs()]
    rng = np.random.default_rng(1)
    vocab = int(E2B["vocab_size"])

    def feeds(tokens: np.ndarray, past: dict[str, np.ndarray], past_len: int) -> dict[str, Any]:
        seq = tokens.shape[1]
        feed: dict[str, Any] = {"input_ids": tokens}
        if "attention_mask" in inputs:
            feed["attention_mask"] = np.ones((1, past_len + seq), dtype=np.int64)
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(past_len, past_len + seq, dtype=np.int64)[None]
        for name, value in inputs.items():
            if name.startswith("past_key_values."):
                heads, width = value.shape[1], value.shape[3]
                # KV-shared layers' past inputs have no present to come from: fed empty-shaped.
                feed[name] = past.get(name, np.zeros((1, heads, past_len, width), np.float32))
        return feed

    prompt = rng.integers(0, vocab, (1, CHECK_PREFILL), dtype=np.int64)
    started = time.perf_counter()
    first = dict(zip(outputs, session.run(None, feeds(prompt, {}, 0)), strict=True))
    prefill_seconds = time.perf_counter() - started
    past = {
        name.replace("present.", "past_key_values.", 1): value
        for name, value in first.items()
        if name.startswith("present.")
    }
    token = np.argmax(first["logits"][:, -1], axis=-1).astype(np.int64)[:, None]
    started = time.perf_counter()
    second = dict(zip(outputs, session.run(None, feeds(token, past, CHECK_PREFILL)), strict=True))
    decode_seconds = time.perf_counter() - started
    logits = second["logits"]
    if not np.all(np.isfinite(first["logits"])) or not np.all(np.isfinite(logits)):
        raise SystemExit("check failed: non-finite logits")
    # The decode step against one prefill of the same 9 tokens: the export's own consistency.
    whole = session.run(["logits"], feeds(np.concatenate([prompt, token], axis=1), {}, 0))[0]
    decode_vs_prefill = float(np.abs(whole[:, -1] - logits[:, -1]).max())
    return {
        "onnxruntime": ort.__version__,
        "threads": threads,
        "session_seconds": round(load_seconds, 1),
        "prefill": {
            "tokens": CHECK_PREFILL,
            "seconds": round(prefill_seconds, 3),
            "logits_shape": list(first["logits"].shape),
            "present_shapes": {
                k: list(v.shape) for k, v in first.items() if k.startswith("present.")
            },
        },
        "decode": {
            "seconds": round(decode_seconds, 3),
            "logits_shape": list(logits.shape),
            "last_logits_abs_max": round(float(np.abs(logits).max()), 3),
            "last_logits_std": round(float(logits.std()), 3),
            "vs_prefill_of_9_max_abs_diff": decode_vs_prefill,
        },
    }


def _report(info: dict[str, Any]) -> None:
    structure = info.get("structure", {})
    sizes = info.get("files", {})
    print(f"attention ops: {structure.get('attention_ops')}")
    print(f"kv-shared layers (layer: source): {info.get('kv_shared_from')}")
    print(f"inputs ({len(structure.get('inputs', []))}): {structure.get('inputs')}")
    print(f"inputs not consumed: {structure.get('inputs_not_consumed')}")
    print(f"outputs ({len(structure.get('outputs', []))}): {structure.get('outputs')}")
    for name, size in sizes.items():
        print(f"file {name}: {size / 1e9:.3f} GB ({size} bytes)")
    if "parameters" in info:
        print(f"parameters: {info['parameters']} ({info['parameters'] * 4 / 1e9:.3f} GB fp32)")
    if "build_seconds" in info:
        print(f"build seconds: {info['build_seconds']}")
    if "check" in info:
        print(f"check: {json.dumps(info['check'])}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mobius-src", type=Path, help="a checkout of onnxruntime/mobius")
    parser.add_argument("--out", type=Path, help="default: bench/cache/mobius-e2b-EP")
    parser.add_argument("--ep", choices=("default", "cpu"), default="default")
    parser.add_argument("--dtype", choices=("f32",), default="f32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mobius-commit", help="recorded when --mobius-src is a plain copy, not a git checkout"
    )
    parser.add_argument(
        "--package", action="store_true", help="write the onnxruntime-genai package"
    )
    parser.add_argument(
        "--check-only", action="store_true", help="only load and run an existing OUT"
    )
    args = parser.parse_args(argv)
    out: Path = args.out or ROOT / "bench" / "cache" / f"mobius-e2b-{args.ep}"
    info_path = out / "build_info.json"

    if args.check_only:
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
    else:
        if args.mobius_src is None:
            print("note: --mobius-src not given; using the installed mobius", file=sys.stderr)
        info = build(out, args.ep, args.mobius_src, args.seed, args.package)
        if info["mobius_commit"] == "unknown" and args.mobius_commit:
            info["mobius_commit"] = args.mobius_commit
    info["structure"] = _structure(out / "model.onnx")
    info["files"] = _sizes(out)
    try:
        info["check"] = check(out)
    except ImportError:
        print("onnxruntime is not installed here: skipped the run check", file=sys.stderr)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    _report(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
