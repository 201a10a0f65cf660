"""Speed-aware choice for KV-shared layers (experimental, ``--speed auto``): where
GroupQueryAttention is slower on the target provider than the export's own layer, and that
layer is correct, keep the export's layer.

Known limit, measured on onnxruntime 1.32.0 CPU, quiet 2-core machine, E2B attention size:
timed alone, the full D=512 layer decodes at T=4096 in 31 ms as exported vs 58 ms through
GQA, so it is kept; in the whole model those 4 layers cost 14.2 vs 18.0 ms of kernel time,
and two whole-model runs ranked "keep them" and "rewrite them" in opposite orders (README,
"the window slice"). The one-layer timing does not represent the layer in context, which is
why this is not the default.

Why: on ONNX Runtime's CPU provider GQA is not always faster. Measured on 1.32.0 (E2B
attention size, one thread): a full-attention KV-shared layer at D=512 decodes at T=4096 in
61 ms through GQA against 35 ms through the export's Attention (prefill S=512: 222 vs 268 ms),
and at whole-model size keeping those 4 layers took decode from 1.07 to 0.85 of the original.
Sliding layers, whose borrowed cache the rewrite cuts to the window, are faster through GQA
in both phases. So the choice is measured per layer kind on the installed runtime, never
assumed.

A layer kind (dtype, N, Nkv, D, W, scale, softcap) is timed as the one-layer export of
``rewriter.probe._one_layer`` and as what the KV-shared rule writes for it, both phases,
interleaved, medians. They are weighed as one generation: one prefill of ``prefill_length``
tokens plus ``decode_steps`` decode steps at ``decode_length``. The export's layer is kept when
GQA costs more than ``margin`` times as much; ties go to GQA (it removes the mask chain and the
cache copies, which matters more on providers where those ops fall back to the CPU).

Only layers whose export is correct may be kept: a P1 layer (``is_causal=1`` without past is
aligned to the upper left, wrong in decode) or a P2 bias with ``is_causal=1`` is always
rewritten, and the report says the rewrite is a correctness fix there.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from rewriter.probe._one_layer import (
    CACHE_KEY,
    CACHE_VALUE,
    OneLayer,
    kv_shared_layer,
    rewritten_layer,
)
from rewriter.rules import LayerKind
from rewriter.verification._session import execution_providers

__all__ = ["SpeedProbe", "SpeedVerdict"]


@dataclasses.dataclass(frozen=True)
class SpeedVerdict:
    layer: LayerKind
    keep_original: bool
    original_ms: dict[str, float]  # "prefill", "decode": medians per call
    gqa_ms: dict[str, float]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": dataclasses.asdict(self.layer),
            "keep_original": self.keep_original,
            "original_ms": self.original_ms,
            "gqa_ms": self.gqa_ms,
            "reason": self.reason,
        }


class SpeedProbe:
    """Times each layer kind once per process and provider; a callable for the rule."""

    def __init__(
        self,
        provider: str = "cpu",
        *,
        decode_length: int = 4096,
        prefill_length: int = 512,
        decode_steps: int = 256,
        margin: float = 1.1,
        repeats: tuple[int, int] = (15, 3),  # decode, prefill calls after one warm-up
    ) -> None:
        self.provider = provider
        self.decode_length = decode_length
        self.prefill_length = prefill_length
        self.decode_steps = decode_steps
        self.margin = margin
        self.repeats = repeats
        self.verdicts: dict[LayerKind, SpeedVerdict] = {}

    def __call__(self, layer: LayerKind) -> SpeedVerdict:
        if layer not in self.verdicts:
            self.verdicts[layer] = self._measure(layer)
        return self.verdicts[layer]

    def keep_export(self, layer: LayerKind) -> str | None:
        """A rules.ExportKeeper: the reason to keep the layer as exported, or None."""
        verdict = self(layer)
        return verdict.reason if verdict.keep_original else None

    def tables(self) -> list[dict[str, Any]]:
        return [verdict.to_dict() for verdict in self.verdicts.values()]

    def _measure(self, kind: LayerKind) -> SpeedVerdict:
        # Only correct exports are ever kept, and P2 with is_causal=0 is the correct one.
        layer = OneLayer(
            num_heads=kind.num_heads,
            kv_num_heads=kind.kv_num_heads,
            head_size=kind.head_size,
            window=kind.local_window_size,
            mask_style="p2",
            scale=kind.scale,
            softcap=kind.softcap,
            dtype=kind.dtype,
        )
        original = kv_shared_layer(layer)
        rewritten, _ = rewritten_layer(kv_shared_layer(layer), "past", window_slice=True)
        sessions = {"original": _session(original, self.provider)}
        sessions["gqa"] = _session(rewritten, self.provider)
        phases = {
            "decode": (_feeds(layer, 1, self.decode_length), self.repeats[0]),
            "prefill": (_feeds(layer, self.prefill_length, self.prefill_length), self.repeats[1]),
        }
        medians: dict[str, dict[str, float]] = {"original": {}, "gqa": {}}
        for phase, (feeds, repeats) in phases.items():
            calls = {name: _call(session, feeds) for name, session in sessions.items()}
            for name, seconds in _interleaved(calls, repeats).items():
                medians[name][phase] = seconds * 1e3
        cost = {
            name: ms["prefill"] + self.decode_steps * ms["decode"] for name, ms in medians.items()
        }
        keep = cost["gqa"] > self.margin * cost["original"]
        generation = (
            f"one prefill of {self.prefill_length} + {self.decode_steps} decode steps at "
            f"T={self.decode_length} on {self.provider}: export {cost['original']:.1f} ms, "
            f"GroupQueryAttention {cost['gqa']:.1f} ms"
        )
        reason = f"kept as exported, faster: {generation}" if keep else generation
        return SpeedVerdict(kind, keep, medians["original"], medians["gqa"], reason)


def _session(model: ir.Model, provider: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        ir.to_proto(model).SerializeToString(),
        options,
        providers=execution_providers(provider),
    )


def _feeds(layer: OneLayer, query_length: int, total_length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    dtype = np.dtype(layer.dtype)
    cache = (1, layer.kv_num_heads, total_length, layer.head_size)
    return {
        "query": rng.standard_normal((1, query_length, layer.num_heads * layer.head_size)).astype(
            dtype
        ),
        "attention_mask": np.ones((1, total_length), dtype=np.int64),
        CACHE_KEY: rng.standard_normal(cache).astype(dtype),
        CACHE_VALUE: rng.standard_normal(cache).astype(dtype),
    }


def _call(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    return lambda: session.run(None, feeds)


def _interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call, the candidates alternating call by call after a warm-up, so a
    busy machine slows both alike."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}
