"""Speed-aware choice (``--speed auto``): each kind of layer whose export is correct runs, per
phase, the fastest form measured on the installed runtime and provider.

Why: GroupQueryAttention is not the fastest kernel everywhere. Measured on onnxruntime 1.32.0
CPU at E2B attention size (``bench/attention_forms.py``, wall medians): a full D=512 layer
decodes at T=4096 in 14.1 ms through GQA, 7.1 ms as exported and 5.9 ms as Attention reading
the borrowed BNSH cache in place, while its prefill at S=2048 takes 468 ms through GQA and
674-703 ms through either Attention. Sliding D=256 layers, whose borrowed cache the rewrite
cuts to the window, are fastest through GQA in both phases.

How: a layer kind (dtype, N, Nkv, D, W, scale, softcap) is built as the one-layer export of
``rewriter.probe._one_layer`` and rewritten by the rule itself into each candidate of
``rules._speed_choice``: ``gqa`` (with the window slice), ``attention-bnsh``, and the export
kept as it is. Each is timed in decode (S=1 at T=``decode_length``) and prefill
(S=T=``prefill_length``), the candidates alternating call by call, medians of wall time.
Per phase the fastest wins, but another form beats GQA only if it is faster by more than
``margin`` in the medians and in at least 80% of the interleaved rounds (GQA also removes the
mask chain and cache copies, which matter more where those ops fall back to the CPU). When
the phases pick different forms, the ``If`` on S == 1 between them is built and timed
too, and the layer gets whichever of GQA, the two winners and their If is cheapest over one
generation (``prefill_length`` tokens of prefill plus ``decode_steps`` decode steps), GQA
again on ties within ``margin``; when both phases have the same winner, the layer gets it.
Calls are 50 ms apart: each session's thread pool spins a while after its call, and on a small
machine that would slow the next candidate's call.

What the one-layer timing leaves out: in a model, the export's Transpose+Reshape of a borrowed
cache may be shared by the layers reading one source (timed here per layer, so the export is
charged more than in context), and the window slice is made once per source (charged per
layer here, so GQA is). The report and the model metadata keep every timing the choice rests
on.

Only layers whose export is correct are timed: a P1 layer (``is_causal=1`` without past is
aligned to the upper left, wrong in decode) or a P2 bias with ``is_causal=1`` always becomes
GQA (or the fold in decode, which reads nothing of the export), and its Attention can appear
in no phase.

Fixed choices, not timed per run (``fixed_choice``): on CPU a float32 KV-shared layer gets
``If(S == 1: fold, else: gqa)``. The fold reads the borrowed cache once per step instead of
once per query head, and was measured faster in decode than every other form at every E2B
layer type and length (onnxruntime 1.32.0, ``bench/fold_decode.py``,
``bench/results/results_1.32_fold.json``); prefill stays GQA, the fastest prefill measured. So the
CLI's default spends no time on a model whose only Attention layers are KV-shared; layers
with their own cache, other dtypes and other providers are timed as above (CUDA keeps GQA
until measured on a GPU).
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

from rewriter._error_text import first_line
from rewriter._rewrite_steps import rewrite_layers
from rewriter.probe._one_layer import (
    CACHE_KEY,
    CACHE_VALUE,
    NEW_KEY,
    NEW_VALUE,
    OneLayer,
    kv_shared_layer,
    own_cache_layer,
)
from rewriter.rules import (
    DEFECTIVE_EXPORT_REASON,
    LayerDecisions,
    LayerKind,
    SpeedChoice,
    always_past,
)
from rewriter.verification._session import execution_providers

__all__ = [
    "FOLD_ON_CPU",
    "OWN_CACHE_FOLD_ON_CPU",
    "SpeedProbe",
    "SpeedVerdict",
    "fixed_choice",
]

_PHASES = ("decode", "prefill")
# A phase's winner other than GQA must beat it (by the margin) in this share of the rounds.
_CONSISTENT = 0.8
_SPIN_PAUSE_SECONDS = 0.05

FOLD_ON_CPU = SpeedChoice(
    "fold",
    "gqa",
    "if(S==1: fold, else: gqa): fixed CPU choice for float32 KV-shared layers, not timed per "
    "run: the fold reads the cache once per decode step, not once per query head, measured "
    "faster in decode than GQA, the export and Attention on the BNSH cache at every E2B layer "
    "type and T (bench/results/results_1.32_fold.json); GQA is the fastest prefill measured",
)


# Layers with their own cache, float32 on CPU. Per-run timing followed the machine's noise,
# so the choice is fixed from measurements. Decode appends the new key/value (Concat, the
# presents) and folds the query heads over them with the export's bias; prefill is GQA's
# native form (rules._speed_choice.own_cache_fold). One layer in decode, Concat + fold took
# 0.44-0.97x of the export's time in every round at E2B size
# (bench/results/results_1.32_own_cache_fold.json). In prefill GQA beats the export: on the
# real E2B export with own-cache layers as GQA a prefill of 2048 took 0.692 of the original
# against 0.748 kept (bench/results/results_1.32_own_cache_choice.json), and under
# onnxruntime-genai every layer GQA reached its first token of 4000 in 0.535 of the original
# against 0.735 with the export's prefill (bench/results/results_1.32_genai_e2b_5rounds.json).
OWN_CACHE_FOLD_ON_CPU = SpeedChoice(
    "fold",
    "gqa",
    "if(S==1: fold, else: gqa): fixed CPU choice for float32 layers with their own cache, "
    "not timed per run: decode appends the new key/value (Concat, the presents, as the export "
    "writes them) and reads the cache once per step, not once per query head "
    "(bench/results/results_1.32_own_cache_fold.json); prefill is GQA's native form, faster "
    "than the export's (bench/results/results_1.32_genai_e2b_5rounds.json)",
)


def fixed_choice(layer: LayerKind, provider: str) -> SpeedChoice | None:
    """The choice for `layer` that no run needs to time, or None: time it."""
    if provider == "cpu" and not layer.own_cache and layer.dtype == "float32":
        return FOLD_ON_CPU
    if provider == "cpu" and layer.own_cache and layer.dtype == "float32" and layer.export_correct:
        return OWN_CACHE_FOLD_ON_CPU
    if not layer.export_correct:
        # Only the export-free forms may replace it, and of those only GQA is timed.
        return SpeedChoice(reason=DEFECTIVE_EXPORT_REASON)
    return None


@dataclasses.dataclass(frozen=True)
class SpeedVerdict:
    layer: LayerKind
    choice: SpeedChoice
    ms: dict[str, dict[str, float]]  # candidate label -> phase -> median ms per call
    generation_ms: dict[str, float]  # candidate label -> one generation's cost
    failed: dict[str, str]  # candidate label -> why it could not be timed
    phase_winners: dict[str, str]  # phase -> the form that won it
    timed: bool = True  # False: a fixed choice (fixed_choice), nothing was measured

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": dataclasses.asdict(self.layer),
            "timed": self.timed,
            "decode": self.choice.decode,
            "prefill": self.choice.prefill,
            "chosen": self.choice.label,
            "ms": {label: dict(phases) for label, phases in self.ms.items()},
            "generation_ms": dict(self.generation_ms),
            "failed": dict(self.failed),
            "phase_winners": dict(self.phase_winners),
            "reason": self.choice.reason,
        }


class SpeedProbe:
    """Times each layer kind once per probe; a ``rules.SpeedChooser``."""

    def __init__(
        self,
        provider: str = "cpu",
        *,
        decode_length: int = 4096,
        prefill_length: int = 2048,
        decode_steps: int = 256,
        margin: float = 1.1,
        repeats: tuple[int, int] = (15, 3),  # decode, prefill calls after one warm-up
        progress: Callable[[str], None] | None = None,
        fixed: bool = True,
    ) -> None:
        self.provider = provider
        self.decode_length = decode_length
        self.prefill_length = prefill_length
        self.decode_steps = decode_steps
        self.margin = margin
        self.repeats = dict(zip(_PHASES, repeats, strict=True))
        self.verdicts: dict[LayerKind, SpeedVerdict] = {}
        self.progress = progress
        # False: time every layer kind, even where fixed_choice knows the answer.
        self.fixed = fixed

    def __call__(self, layer: LayerKind) -> SpeedChoice:
        return self.verdict(layer).choice

    def verdict(self, layer: LayerKind) -> SpeedVerdict:
        fixed = fixed_choice(layer, self.provider) if self.fixed else None
        if layer not in self.verdicts and fixed is not None:
            phases = {"decode": fixed.decode, "prefill": fixed.prefill}
            self.verdicts[layer] = SpeedVerdict(layer, fixed, {}, {}, {}, phases, timed=False)
        if layer not in self.verdicts:
            if self.progress is not None:
                self.progress(f"speed probe: timing {layer.describe()} on {self.provider}")
            self.verdicts[layer] = self._measure(layer)
        return self.verdicts[layer]

    def tables(self) -> list[dict[str, Any]]:
        return [verdict.to_dict() for verdict in self.verdicts.values()]

    def _measure(self, kind: LayerKind) -> SpeedVerdict:
        # Only correct exports get a speed choice, and P2 with is_causal=0 is the correct one.
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
        own = kind.own_cache
        feeds = {
            "decode": _feeds(layer, 1, self.decode_length, own_cache=own),
            "prefill": _feeds(layer, self.prefill_length, self.prefill_length, own_cache=own),
        }
        # A layer with its own cache is GQA or kept: no in-place form, no If (its presents
        # would have to leave both branches).
        forms = ("gqa", "export") if own else ("gqa", "attention-bnsh", "export")
        candidates = {
            choice.label: choice for choice in (SpeedChoice(form, form) for form in forms)
        }
        ms, samples, failed = self._time(layer, list(candidates.values()), feeds, own_cache=own)
        decode, prefill = (self._phase_winner(ms, samples, phase) for phase in _PHASES)
        if decode != prefill and not own:
            # One form per phase: the If itself is measured, not assumed to cost nothing.
            phase_if = SpeedChoice(decode, prefill)
            candidates[phase_if.label] = phase_if
            more, _, more_failed = self._time(layer, [phase_if], feeds, own_cache=False)
            ms.update(more)
            failed.update(more_failed)
        generation = {
            label: phases["prefill"] + self.decode_steps * phases["decode"]
            for label, phases in ms.items()
        }
        if decode == prefill:
            chosen = decode
        else:
            # Weighed over a generation: only forms that won a phase, GQA, and their If.
            pool = {"gqa", decode, prefill, SpeedChoice(decode, prefill).label} & set(ms)
            chosen = self._fastest({label: generation[label] for label in pool})
        choice = candidates[chosen]
        measured = (
            f"over one prefill of {self.prefill_length} + {self.decode_steps} decode steps at "
            f"T={self.decode_length} on {self.provider}: "
            + ", ".join(f"{label} {cost:.1f} ms" for label, cost in generation.items())
            + f" (GQA unless another is faster by more than {self.margin - 1:.0%})"
        )
        if chosen == "export":
            reason = f"kept as exported, faster {measured}"
        else:
            reason = f"{choice.label}, fastest {measured}"
        return SpeedVerdict(
            kind,
            dataclasses.replace(choice, reason=reason),
            ms,
            generation,
            failed,
            {"decode": decode, "prefill": prefill},
        )

    def _phase_winner(
        self,
        ms: dict[str, dict[str, float]],
        samples: dict[str, dict[str, list[float]]],
        phase: str,
    ) -> str:
        """The fastest candidate of `phase`; GQA unless another beats it by more than the
        margin in the medians and in most of the interleaved rounds (noise on a layer of a few
        microseconds picks nothing)."""
        fastest = self._fastest({label: phases[phase] for label, phases in ms.items()})
        if fastest == "gqa":
            return fastest
        rounds = list(zip(samples[fastest][phase], samples["gqa"][phase], strict=True))
        won = sum(mine * self.margin < theirs for mine, theirs in rounds)
        return fastest if won >= _CONSISTENT * len(rounds) else "gqa"

    def _fastest(self, cost: dict[str, float]) -> str:
        """The cheapest candidate, GQA unless another is cheaper by more than the margin."""
        fastest = min(cost, key=cost.__getitem__)
        if "gqa" in cost and cost["gqa"] <= self.margin * cost[fastest]:
            return "gqa"
        return fastest

    def _time(
        self,
        layer: OneLayer,
        choices: list[SpeedChoice],
        feeds: dict[str, dict[str, np.ndarray]],
        *,
        own_cache: bool,
    ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]], dict[str, str]]:
        """Per candidate label: median ms per phase, every sample (ms) per phase; and the
        candidates that could not run, with why."""
        sessions: dict[str, ort.InferenceSession] = {}
        failed: dict[str, str] = {}
        for choice in choices:
            try:
                session = _session(_candidate(layer, choice, own_cache), self.provider)
                for phase_feeds in feeds.values():
                    session.run(None, phase_feeds)  # also the warm-up
            except Exception as error:  # a kernel this provider lacks for the dtype
                if choice.label == "gqa":
                    raise  # the form probe found it runs: not a choice to drop silently
                failed[choice.label] = first_line(str(error))
                continue
            sessions[choice.label] = session
        ms: dict[str, dict[str, float]] = {label: {} for label in sessions}
        samples: dict[str, dict[str, list[float]]] = {label: {} for label in sessions}
        for phase in _PHASES:
            calls = {label: _call(s, feeds[phase]) for label, s in sessions.items()}
            for label, seconds in _interleaved(calls, self.repeats[phase]).items():
                samples[label][phase] = [value * 1e3 for value in seconds]
                ms[label][phase] = statistics.median(samples[label][phase])
        return ms, samples, failed


def _candidate(layer: OneLayer, choice: SpeedChoice, own_cache: bool) -> ir.Model:
    """What the rules write for the one-layer export under `choice`."""
    export = own_cache_layer(layer) if own_cache else kv_shared_layer(layer)
    if choice.label == "export":
        return export
    log = rewrite_layers(
        export,
        LayerDecisions.asking(always_past, lambda _: choice),
        layers="all" if own_cache else "shared",
    )
    if len(log.rewrites) != 1 or log.rewrites[0].speed_form != choice.label:
        raise RuntimeError(
            f"the KV-shared rule did not write {choice.label} for the one-layer export: "
            + ("; ".join(log.skip_reasons()) or "no reason given")
        )
    return export


def _session(model: ir.Model, provider: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        ir.to_proto(model).SerializeToString(),
        options,
        providers=execution_providers(provider),
    )


def _feeds(
    layer: OneLayer, query_length: int, total_length: int, *, own_cache: bool
) -> dict[str, np.ndarray]:
    """One call of S = `query_length` at T = `total_length`: a borrowed cache of T, or an
    own past of T - S and this call's key/value."""
    rng = np.random.default_rng(0)
    dtype = np.dtype(layer.dtype)
    n, nkv, d = layer.num_heads, layer.kv_num_heads, layer.head_size
    cache_length = total_length - query_length if own_cache else total_length
    cache = (1, nkv, cache_length, d)
    feeds = {
        "query": rng.standard_normal((1, query_length, n * d)).astype(dtype),
        "attention_mask": np.ones((1, total_length), dtype=np.int64),
        CACHE_KEY: rng.standard_normal(cache).astype(dtype),
        CACHE_VALUE: rng.standard_normal(cache).astype(dtype),
    }
    if own_cache:
        for name in (NEW_KEY, NEW_VALUE):
            feeds[name] = rng.standard_normal((1, query_length, nkv * d)).astype(dtype)
    return feeds


def _call(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    return lambda: session.run(None, feeds)


def _interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call, the candidates alternating call by call (after the warm-up the
    caller ran), so a busy machine slows all of them alike; round i of each list is one."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            # Each session has its own intra-op pool, which spins a while after its call: on
            # a small machine it would slow the next session's call (bench/inference.py).
            time.sleep(_SPIN_PAUSE_SECONDS)
            started = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - started)
    return samples
