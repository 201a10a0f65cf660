"""Verify exports that come as separate prefill and decode graphs (transformers exporter).

    result = verify_pair(original=(prefill, decode), candidate=(prefill2, decode2))
    result.passed, result.checks, result.summary()

The prefill graph takes ``input_ids``/``position_ids`` and returns ``logits`` and the cache
(``cache.layers.i.keys``, ``output.cache.layers.i._sliding_window_tensor``); the decode graph
takes the same plus ``input.cache.layers.i.*`` and returns ``output.cache.layers.i.*``. The
decode graph is fed the prefill graph's presents, matched by name (``input.X`` <- ``X`` or
``output.X``). Checks (SPEC.md section 6), batch 1, with the verifier's fixed tolerances:

1. prefill equivalence: original vs candidate prefill, every shared output, each length;
2. cache consistency, per model: prefill of S tokens, then decode steps (one token each, and
   a chunk of several) equal one prefill of the longer sequence at those positions;
3. decode equivalence: original vs candidate decode, each fed its own prefill's presents,
   only where the original passed 2.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime

from rewriter.verification._result import Case
from rewriter.verification._session import execution_providers
from rewriter.verification._tolerance import compare

__all__ = ["PairCheck", "PairResult", "verify_pair"]


@dataclasses.dataclass(frozen=True)
class PairCheck:
    name: str
    model: str  # "original", "candidate" or "both"
    passed: bool | None  # None: skipped (precondition failed)
    cases: tuple[Case, ...]

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.cases), default=0.0)


@dataclasses.dataclass(frozen=True)
class PairResult:
    checks: tuple[PairCheck, ...]

    @property
    def passed(self) -> bool:
        """Prefill equivalence holds, the candidate is cache-consistent, and decode
        equivalence holds wherever it ran."""
        return all(c.passed is not False for c in self.checks if c.model != "original")

    def summary(self) -> str:
        lines = []
        for check in self.checks:
            verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[check.passed]
            worst = max(check.cases, key=lambda c: c.severity, default=None)
            detail = f" max_abs_diff={worst.max_abs_diff:.3g} tol={worst.tolerance:.3g}"
            lines.append(f"{verdict} {check.name} [{check.model}]" + (detail if worst else ""))
        lines.append(f"verdict: {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


class _Pair:
    """Sessions of one model's prefill and decode graphs."""

    def __init__(self, prefill, decode, providers: list[str]) -> None:
        self.prefill = _session(prefill, providers)
        self.decode = _session(decode, providers)
        self.vocab = int(self.prefill.get_outputs()[0].shape[-1])
        ids = next(i for i in self.decode.get_inputs() if i.name == "input_ids")
        # transformers' single-token decode component fixes S at 1 (multi_token_decode=False).
        self.multi_token_decode = ids.shape[1] != 1

    def run_prefill(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return _run(self.prefill, _token_feeds(self.prefill, ids, 0))

    def run_decode(self, ids: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = _token_feeds(self.decode, ids, _past_length(past))
        for graph_input in self.decode.get_inputs():
            if graph_input.name not in feeds:
                feeds[graph_input.name] = _present_for(graph_input.name, past)
        return _run(self.decode, feeds)


def verify_pair(
    original: tuple[object, object],
    candidate: tuple[object, object],
    *,
    provider: str = "cpu",
    lengths: tuple[int, ...] = (1, 3, 11, 18),
    decode_steps: int = 3,
    seed: int = 0,
) -> PairResult:
    """original/candidate: (prefill, decode), each a path or serialized ModelProto bytes."""
    providers = execution_providers(provider)
    models = {
        "original": _Pair(*original, providers),
        "candidate": _Pair(*candidate, providers),
    }
    vocab = min(m.vocab for m in models.values())
    rng = np.random.default_rng(seed)
    longest = max(lengths) + decode_steps * 2
    ids = rng.integers(0, vocab, size=(1, longest), dtype=np.int64)

    checks = [_prefill_equivalence(models, ids, lengths)]
    consistent = {}
    for name, model in models.items():
        check = _cache_consistency(name, model, ids, lengths, decode_steps)
        consistent[name] = check.passed
        checks.append(check)
    checks.append(_decode_equivalence(models, ids, lengths, decode_steps, consistent["original"]))
    return PairResult(tuple(checks))


def _prefill_equivalence(models, ids, lengths) -> PairCheck:
    cases = []
    for length in lengths:
        reference = models["original"].run_prefill(ids[:, :length])
        actual = models["candidate"].run_prefill(ids[:, :length])
        for name in sorted(set(reference) & set(actual)):
            cases.append(compare(f"S={length} {name}", reference[name], actual[name]))
    return PairCheck("prefill_equivalence", "both", all(c.passed for c in cases), tuple(cases))


def _decode_schedules(lengths, steps, models):
    """(prompt length, [tokens per call]): single-token steps, then one chunk where every
    decode graph takes several tokens."""
    chunks = all(m.multi_token_decode for m in models)
    for length in lengths:
        yield length, [1] * steps
        if chunks:
            yield length, [steps]


def _cache_consistency(name, model: _Pair, ids, lengths, steps) -> PairCheck:
    cases = []
    for length, chunks in _decode_schedules(lengths, steps, [model]):
        past = model.run_prefill(ids[:, :length])
        position = length
        full = model.run_prefill(ids[:, : length + sum(chunks)])["logits"]
        for chunk in chunks:
            out = model.run_decode(ids[:, position : position + chunk], past)
            label = f"prompt {length}, tokens {position}..{position + chunk - 1}"
            cases.append(compare(label, full[:, position : position + chunk], out["logits"]))
            past = out
            position += chunk
    return PairCheck("cache_consistency", name, all(c.passed for c in cases), tuple(cases))


def _decode_equivalence(models, ids, lengths, steps, original_consistent) -> PairCheck:
    if not original_consistent:
        return PairCheck("decode_equivalence", "both", None, ())
    cases = []
    for length, chunks in _decode_schedules(lengths, steps, models.values()):
        pasts = {name: m.run_prefill(ids[:, :length]) for name, m in models.items()}
        position = length
        for chunk in chunks:
            outs = {
                name: m.run_decode(ids[:, position : position + chunk], pasts[name])
                for name, m in models.items()
            }
            for output in sorted(set(outs["original"]) & set(outs["candidate"])):
                label = f"prompt {length}, tokens {position}..{position + chunk - 1} {output}"
                cases.append(compare(label, outs["original"][output], outs["candidate"][output]))
            pasts = outs
            position += chunk
    return PairCheck("decode_equivalence", "both", all(c.passed for c in cases), tuple(cases))


# --- feeds -------------------------------------------------------------------------------


def _session(model, providers: list[str]) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model, options, providers=providers)


def _run(session, feeds) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _token_feeds(session, ids: np.ndarray, past_length: int) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    batch, length = ids.shape
    for graph_input in session.get_inputs():
        if graph_input.name == "input_ids":
            feeds["input_ids"] = ids
        elif graph_input.name == "position_ids":
            positions = np.arange(past_length, past_length + length, dtype=np.int64)
            feeds["position_ids"] = np.broadcast_to(positions, (batch, length)).copy()
        elif graph_input.name == "attention_mask":
            feeds["attention_mask"] = np.ones((batch, past_length + length), dtype=np.int64)
        elif graph_input.name.endswith("_sliding_window_tensor") and past_length == 0:
            # Passed through Identity to the output of the same name; never read.
            feeds[graph_input.name] = np.array(0, dtype=np.int64)
    return feeds


def _present_for(input_name: str, past: dict[str, np.ndarray]) -> np.ndarray:
    base = input_name.removeprefix("input.")
    for candidate in (base, f"output.{base}"):
        if candidate in past:
            return past[candidate]
    raise KeyError(f"no prefill/decode output feeds decode input {input_name}")


def _past_length(past: dict[str, np.ndarray]) -> int:
    for name, value in past.items():
        if name.endswith(("keys", "key")) and value.ndim == 4:
            return int(value.shape[2])
    raise KeyError("no cache among the outputs fed to the decode graph")
