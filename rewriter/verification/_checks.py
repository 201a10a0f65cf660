"""The oracles (SPEC section 6): what "the rewrite computes the same thing" means, in numbers.

1. prefill equivalence: original vs candidate, B = 1, several S = T, beyond the window too;
2. cache consistency: prefill S, then k decode steps (and one chunked step) equal a prefill of
   S + k at those positions; on each model;
3. decode equivalence: original vs candidate decode steps, only where the original passed (2);
4. batch consistency: a right-padded batch of 2 equals each row run alone, prefill and one
   decode step; on each model.

A failure of the original in (2) or (4) is a defect of the original, with its likely cause
when the graph shows one and whether the candidate passes the same check; it never fails the
verdict (``verify`` decides what does).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from rewriter._json_values import json_float
from rewriter.rules import PaddingContract
from rewriter.verification._feeds import DecoderSignature, FeedSynthesizer, Step
from rewriter.verification._graph_facts import (
    GraphFacts,
    attention_nodes_with_3d_mask,
    attention_nodes_without_mask,
)
from rewriter.verification._result import Case, CheckResult, OriginalDefect, VerificationError
from rewriter.verification._session import LoadedModel, short_error
from rewriter.verification._spread import SPREAD_FACTOR, TWIN_SETTING, Spread
from rewriter.verification._tolerance import compare

__all__ = [
    "CANDIDATE",
    "NON_FINITE",
    "ORIGINAL",
    "PREFILL",
    "ModelRunner",
    "Plan",
    "RunFailure",
    "SpreadMeter",
    "run_checks",
]

PREFILL, CACHE, DECODE, BATCH = (
    "prefill_equivalence",
    "cache_consistency",
    "decode_equivalence",
    "batch_consistency",
)
CANDIDATE, ORIGINAL = "candidate", "original"
NON_FINITE = "non-finite output"

# Used when no GroupQueryAttention node states a window: still long enough for a few decode
# steps and a chunk to differ from their prefill counterparts.
_DEFAULT_WINDOW = 8
_DECODE_STEPS = 3
_CHUNK = 3
# Gemma's W=512 needs 2W + 2 = 1026; longer windows are capped there (Plan.for_models).
_LONGEST_PREFILL = 1026

_UPPER_LEFT_CAUSE = (
    "likely cause: Attention is_causal=1 without past inputs is aligned to the upper left "
    "(ONNX spec): a decode query of S tokens sees only keys 0..S-1"
)


class RunFailure(Exception):
    """ORT raised while running a model; the message is ORT's, on one line."""


class ModelRunner:
    """A model's session with the feeds of its own signature, called step by step."""

    def __init__(
        self, loaded: LoadedModel, signature: DecoderSignature, feeder: FeedSynthesizer
    ) -> None:
        self.loaded = loaded
        self.signature = signature
        self._feeder = feeder
        self._output_names = [arg.name for arg in loaded.session.get_outputs()]

    @property
    def role(self) -> str:
        return self.loaded.role

    def supports_batch(self, batch: int) -> bool:
        dim = self.signature.batch_dim
        return not isinstance(dim, int) or dim == batch

    def run(
        self, step: Step, past: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        feeds = self._feeder.feeds(self.signature, step, past)
        try:
            values = self.loaded.session.run(self._output_names, feeds)
        except Exception as error:
            raise RunFailure(short_error(error)) from None
        return dict(zip(self._output_names, values, strict=True))

    def next_past(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return FeedSynthesizer.next_past(self.signature, outputs)


class SpreadMeter:
    """The original's spread (``_spread``), measured only where a comparison misses the fixed
    tolerance: the original and its twin (graph optimizations disabled) run on the same
    feeds. The twin's session opens on first use, so a well-conditioned model never pays
    for it; each scenario is measured once."""

    def __init__(self, original: ModelRunner, open_twin: Callable[[], ModelRunner] | None) -> None:
        self._original = original
        self._open_twin = open_twin
        self._twin: ModelRunner | None = None
        self._memo: dict[str, Spread | None] = {}
        # Per scenario measured: the largest spread of any output (for the report).
        self.measured: dict[str, float] = {}
        self.failures: list[str] = []

    @property
    def available(self) -> bool:
        return self._open_twin is not None

    @property
    def opened(self) -> bool:
        return self._twin is not None

    def twin(self) -> ModelRunner | None:
        if self._twin is None and self._open_twin is not None:
            try:
                self._twin = self._open_twin()
            except VerificationError as error:
                # Without the twin the fixed tolerance decides, as it always did.
                self.failures.append(f"the twin session: {error}")
                self._open_twin = None
        return self._twin

    def at(
        self,
        scenario: str,
        step: Step,
        past: Mapping[str, np.ndarray] | None = None,
        original_outputs: Mapping[str, np.ndarray] | None = None,
    ) -> Spread | None:
        """The spread at ``step`` (fed ``past``); ``original_outputs``: the original's own
        outputs at these feeds, when the caller has them."""
        if not self.available:
            return None
        if scenario not in self._memo:
            self._memo[scenario] = self._measure(scenario, step, past, original_outputs)
        return self._memo[scenario]

    def after_prefill(self, scenario: str, prefill: Step, step: Step) -> Spread | None:
        """The spread of one decode ``step`` after ``prefill``, each model fed the cache of its
        own prefill: the request run twice, so the spread includes what rounding did to the
        cache (fed one cache, both would agree on it and the spread would miss that part)."""
        if not self.available:
            return None
        if scenario not in self._memo:
            self._memo[scenario] = self._measure_request(scenario, prefill, step)
        return self._memo[scenario]

    def _measure_request(self, scenario: str, prefill: Step, step: Step) -> Spread | None:
        twin = self.twin()
        if twin is None:
            return None
        try:
            outputs = [
                runner.run(step, runner.next_past(runner.run(prefill)))
                for runner in (self._original, twin)
            ]
        except RunFailure as error:
            self.failures.append(f"{scenario}: {error}")
            return None
        return self._record(scenario, Spread(*outputs), outputs[0])

    def _measure(
        self,
        scenario: str,
        step: Step,
        past: Mapping[str, np.ndarray] | None,
        original_outputs: Mapping[str, np.ndarray] | None,
    ) -> Spread | None:
        twin = self.twin()
        if twin is None:
            return None
        try:
            reference = (
                original_outputs if original_outputs is not None else self._original.run(step, past)
            )
            twins = twin.run(step, past)
        except RunFailure as error:
            self.failures.append(f"{scenario}: {error}")
            return None
        return self._record(scenario, Spread(reference, twins), reference)

    def _record(self, scenario: str, spread: Spread, reference: Mapping[str, np.ndarray]) -> Spread:
        values = [spread.at(name) for name in reference]
        self.measured[scenario] = max((v for v in values if v is not None), default=0.0)
        return spread

    def to_dict(self) -> dict[str, object]:
        return {
            "setting": TWIN_SETTING,
            "factor": SPREAD_FACTOR,
            "measured": {name: json_float(value) for name, value in self.measured.items()},
            "failures": list(self.failures),
        }


def _scenario(step: Step) -> str:
    """A prefill's name in the spread meter's memo and report (its feeds are its rows and
    lengths: the feed synthesizer draws each row's tokens once)."""
    lengths = step.attention_mask.sum(axis=1).tolist()
    return f"prefill rows {list(step.rows)} of {lengths} tokens"


def _missed_tolerance(cases: Sequence[Case]) -> bool:
    """Some case failed on a finite difference: the spread may account for it."""
    return any(not case.passed and math.isfinite(case.max_abs_diff) for case in cases)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Lengths of every scenario, derived once from the graphs of both models."""

    window: int  # largest local_window_size of either model, or _DEFAULT_WINDOW
    prefill_lengths: tuple[int, ...]
    cache_prefix: int
    batch_lengths: tuple[int, int]
    # How a right-padded row's decode token is masked, per model role: "prefix" (GQA writes
    # the new key at seqlens_k, so valid keys stay a prefix) or "append" (Attention with
    # past appends it after the padding, so the mask has a hole). Each model is fed the
    # convention of its own cache writers: a rewrite may change the convention.
    batch_decode_masks: Mapping[str, str]
    # Why the candidate's padded decode step is not checked, if it is not.
    candidate_batch_decode_skip: str = ""
    note: str = ""
    # S when the graphs declare it (a decode graph of [1, 1] input_ids): every call has
    # exactly this many tokens, so the prefills above become that many tokens at a time,
    # chained through the cache (_chained_equivalence), and no other length is fed.
    query_length: int | None = None

    @property
    def capacity(self) -> int:
        return max(
            *self.prefill_lengths,
            self.cache_prefix + max(_DECODE_STEPS, _CHUNK),
            self.batch_lengths[0] + 1,
        )

    @classmethod
    def for_models(
        cls,
        original: GraphFacts,
        candidate: GraphFacts,
        *,
        confirmation: bool = False,
        query_length: int | None = None,
    ) -> Plan:
        """``confirmation``: every rewritten layer is proven on its own, windows included, so
        the whole model only confirms how the layers are wired together: the lengths of a
        window of 8 whatever the model's (a few seconds at E2B size instead of minutes).
        ``query_length``: the S both graphs declare (``DecoderSignature.static_query_length``),
        None when it is dynamic."""
        windows = original.gqa_windows + candidate.gqa_windows
        window = max(windows) if windows else _DEFAULT_WINDOW
        if confirmation:
            window = min(window, _DEFAULT_WINDOW)
        # Decode positions cross the window edge; the longest prefill spans it twice.
        prefill = {1, 3, window + 3, 2 * window + 2}
        prefix = max(window - 1, 2)
        longest = window + 3
        limits = [rows for rows in (original.rotary_rows, candidate.rotary_rows) if rows]
        note = ""
        if max(prefill) > _LONGEST_PREFILL:
            # A prefill's cost grows with S x T: a window of thousands would make this check
            # minutes long. The layer proofs cross the window's edge at a cost linear in W.
            limits.append(_LONGEST_PREFILL)
        if limits and max(*prefill, prefix + _DECODE_STEPS, longest + 1) > min(limits):
            # Positions past the rotary cache are outside the model's range: any output is
            # meaningless there, so the lengths shrink instead.
            cap = min(limits)
            prefill = {min(length, cap) for length in prefill}
            prefix = max(1, min(prefix, cap - max(_DECODE_STEPS, _CHUNK)))
            longest = max(2, min(longest, cap - 1))
            why = (
                "rotary cache rows"
                if cap != _LONGEST_PREFILL
                else "the window's edge is proven by the layer proofs"
            )
            note = f"lengths capped at {cap} positions ({why})"
        masks = {ORIGINAL: _decode_mask(original), CANDIDATE: _decode_mask(candidate)}
        skip = ""
        appending = "Attention" in set(candidate.cache_writers.values())
        if appending and candidate.declared_padding_contract == PaddingContract.RIGHT_PADDING_ONLY:
            # GQA reads a borrowed cache as a valid prefix of seqlens_k + 1 keys; the holed
            # mask of an appending cache is outside the contract the rewrite declared (and
            # warned about), so holding it against the candidate would test a non-promise.
            # With GQA and Attention cache writers side by side no mask suits every layer.
            skip = (
                "decode step of 2 not checked: the candidate's Attention caches append after "
                "the padding (holed mask), outside the declared right-padding-only contract"
            )
        return cls(
            window=window,
            prefill_lengths=tuple(sorted(prefill)),
            cache_prefix=prefix,
            batch_lengths=(longest, max(1, longest // 2)),
            batch_decode_masks=masks,
            candidate_batch_decode_skip=skip,
            note=note,
            query_length=query_length,
        )


def _decode_mask(facts: GraphFacts) -> str:
    return "prefix" if "GroupQueryAttention" in set(facts.cache_writers.values()) else "append"


@dataclasses.dataclass
class _CacheRun:
    """Decode outputs kept for decode equivalence. The prefills are not kept: at a real
    vocabulary their logits weigh hundreds of MB each."""

    steps: list[dict[str, np.ndarray]]
    chunk: dict[str, np.ndarray]


def run_checks(
    original: ModelRunner,
    candidate: ModelRunner,
    plan: Plan,
    original_facts: GraphFacts,
    progress: Callable[[str], None],
    spread: SpreadMeter | None = None,
) -> tuple[list[CheckResult], list[OriginalDefect]]:
    """The four oracles. ``spread``: the original's twin, consulted where a comparison
    misses the fixed tolerance (``_spread``); None judges by the fixed tolerance alone."""
    meter = spread if spread is not None else SpreadMeter(original, None)
    compared = [
        name
        for name in candidate.signature.compared_outputs
        if name in original.signature.compared_outputs
    ]
    presents = [
        name
        for name in candidate.signature.present_outputs
        if name in original.signature.present_outputs
    ]
    checks: list[CheckResult] = []
    defects: list[OriginalDefect] = []

    if plan.query_length is None:
        progress(f"prefill equivalence, S in {list(plan.prefill_lengths)}")
        checks.append(_prefill_equivalence(original, candidate, plan, compared, presents, meter))
    else:
        progress(f"prefill equivalence, calls of the declared S={plan.query_length} chained")
        checks.append(_chained_equivalence(original, candidate, plan, compared, presents, meter))

    runs: dict[str, _CacheRun | None] = {}
    cache_checks: dict[str, CheckResult] = {}
    for runner in (candidate, original):
        progress(f"cache consistency on the {runner.role} model")
        if plan.query_length is not None:
            # A declared limit of the graph, not a defect: nothing to compare its calls with.
            cache_checks[runner.role], runs[runner.role] = (
                CheckResult.skip(CACHE, runner.role, _declared_query_length(plan)),
                None,
            )
        else:
            cache_checks[runner.role], runs[runner.role] = _cache_consistency(
                runner, plan, compared, meter
            )
        checks.append(cache_checks[runner.role])
    original_cache = cache_checks[ORIGINAL]
    if original_cache.passed is False:
        cause = _UPPER_LEFT_CAUSE if original_facts.upper_left_causal_nodes else ""
        description = _defect("cache consistency", original_cache, "a full prefill", cause)
        defects.append(
            _original_defect(description, original_cache, cache_checks[CANDIDATE], cause)
        )

    progress("decode equivalence")
    checks.append(_decode_equivalence(runs, original_cache, plan, compared, presents, meter))

    batch_checks: dict[str, CheckResult] = {}
    for runner in (candidate, original):
        progress(f"batch consistency on the {runner.role} model")
        batch_checks[runner.role] = _batch_consistency(runner, plan, compared, meter)
        checks.append(batch_checks[runner.role])
    original_batch = batch_checks[ORIGINAL]
    if original_batch.passed is False:
        nodes = attention_nodes_with_3d_mask(original.loaded.model)
        cause = ""
        if nodes:
            cause = (
                f"likely cause: {len(nodes)} Attention node(s) take a 3-D [B,S,T] attn_mask, "
                "which ONNX reads as [q_num_heads,S,T]"
            )
        elif unmasked := attention_nodes_without_mask(original.loaded.model):
            cause = (
                f"likely cause: {len(unmasked)} Attention node(s) have no mask and "
                "is_causal=0, so a padded row reads its cache's keys at the padding too"
            )
        description = _defect("batch consistency", original_batch, "the row run alone", cause)
        defects.append(
            _original_defect(description, original_batch, batch_checks[CANDIDATE], cause)
        )
    if plan.note:
        for check in checks:
            check.detail = f"{check.detail}; {plan.note}" if check.detail else plan.note
    return checks, defects


def _prefill_equivalence(
    original: ModelRunner,
    candidate: ModelRunner,
    plan: Plan,
    compared: Sequence[str],
    presents: Sequence[str],
    meter: SpreadMeter,
) -> CheckResult:
    cases: list[Case] = []
    for length in plan.prefill_lengths:
        step = Step.prefill([0], [length], length)
        try:
            reference = original.run(step)
        except RunFailure as error:
            return CheckResult.error(PREFILL, CANDIDATE, f"original failed at S={length}: {error}")
        try:
            actual = candidate.run(step)
        except RunFailure as error:
            return CheckResult.error(PREFILL, CANDIDATE, f"S={length}: {error}")
        label = f"S={length}"
        these = _compare_outputs(label, reference, actual, compared, presents)
        if _missed_tolerance(these) and meter.available:
            spread = meter.at(_scenario(step), step, original_outputs=reference)
            these = _compare_outputs(label, reference, actual, compared, presents, spread)
        cases += these
    context = f"reference: original; sliding window {plan.window}"
    return CheckResult.from_cases(PREFILL, CANDIDATE, cases, context)


def _declared_query_length(plan: Plan) -> str:
    return (
        f"the graph declares S={plan.query_length} per call: no prefill of another length to "
        "compare with (a declared limit, not a defect); prefill equivalence chains its calls"
    )


def _chained_equivalence(
    original: ModelRunner,
    candidate: ModelRunner,
    plan: Plan,
    compared: Sequence[str],
    presents: Sequence[str],
    meter: SpreadMeter,
) -> CheckResult:
    """Prefill equivalence for a graph that declares S: calls of exactly S tokens from an
    empty past, each model chained through its own cache, every call compared with the
    original's, as far as the longest prefill of the plan reaches (past the window twice)."""
    s = plan.query_length
    assert s is not None
    chained = original.signature.has_full_cache and candidate.signature.has_full_cache
    calls = max(1, max(plan.prefill_lengths) // s) if chained else 1
    cases: list[Case] = []
    original_past: dict[str, np.ndarray] | None = None
    candidate_past: dict[str, np.ndarray] | None = None
    for call in range(calls):
        total = (call + 1) * s
        step = Step((0,), np.ones((1, total), dtype=np.int64), s)
        try:
            reference = original.run(step, original_past)
        except RunFailure as error:
            return CheckResult.error(
                PREFILL, CANDIDATE, f"original failed at call {call + 1} of S={s}: {error}"
            )
        try:
            actual = candidate.run(step, candidate_past)
        except RunFailure as error:
            return CheckResult.error(PREFILL, CANDIDATE, f"call {call + 1} of S={s}: {error}")
        label = f"call {call + 1} (positions {total - s}..{total - 1})"
        these = _compare_outputs(label, reference, actual, compared, presents)
        if _missed_tolerance(these) and meter.available:
            scenario = f"call {call + 1} of S={s} chained from an empty past"
            spread = meter.at(scenario, step, original_past, reference)
            these = _compare_outputs(label, reference, actual, compared, presents, spread)
        cases += these
        if chained:
            original_past = original.next_past(reference)
            candidate_past = candidate.next_past(actual)
    context = (
        f"reference: original; {calls} call(s) of the declared S={s}, chained from an empty "
        f"past; sliding window {plan.window}"
    )
    return CheckResult.from_cases(PREFILL, CANDIDATE, cases, context)


def _cache_consistency(
    runner: ModelRunner, plan: Plan, compared: Sequence[str], meter: SpreadMeter
) -> tuple[CheckResult, _CacheRun | None]:
    if not runner.signature.has_full_cache:
        return CheckResult.skip(
            CACHE, runner.role, "no past inputs paired with present outputs"
        ), None
    prefix = plan.cache_prefix
    full_length = prefix + max(_DECODE_STEPS, _CHUNK)
    full_step = Step.prefill([0], [full_length], full_length)
    try:
        full = runner.run(full_step)
        prefill = runner.run(Step.prefill([0], [prefix], prefix))
        past = runner.next_past(prefill)
        steps = []
        for j in range(_DECODE_STEPS):
            step = Step((0,), np.ones((1, prefix + j + 1), dtype=np.int64), 1)
            steps.append(runner.run(step, past))
            past = runner.next_past(steps[-1])
        chunk_step = Step((0,), np.ones((1, prefix + _CHUNK), dtype=np.int64), _CHUNK)
        chunk = runner.run(chunk_step, runner.next_past(prefill))
    except RunFailure as error:
        return CheckResult.error(CACHE, runner.role, str(error)), None
    run = _CacheRun(steps, chunk)

    def judged(spread: Spread | None) -> list[Case]:
        cases: list[Case] = []
        for name in compared:
            reference = full[name]

            def at(positions: slice, name: str = name) -> float | None:
                return spread.at(name, positions) if spread is not None else None

            head = slice(0, prefix)
            cases.append(
                compare(f"prefill S={prefix}", reference[:, head], prefill[name], at(head))
            )
            for j, outputs in enumerate(steps):
                position = slice(prefix + j, prefix + j + 1)
                label = f"decode step {j + 1} (position {prefix + j})"
                cases.append(compare(label, reference[:, position], outputs[name], at(position)))
            tail = slice(prefix, prefix + _CHUNK)
            label = f"chunk of {_CHUNK} (positions {prefix}..{prefix + _CHUNK - 1})"
            cases.append(compare(label, reference[:, tail], chunk[name], at(tail)))
        return cases

    cases = judged(None)
    if _missed_tolerance(cases) and meter.available:
        # The full prefill is the reference of every case: its spread, position by position.
        original_full = full if runner.role == ORIGINAL else None
        cases = judged(meter.at(_scenario(full_step), full_step, None, original_full))
    if runner.role == CANDIDATE:
        cases += _non_finite_cases([full, prefill, *steps, chunk])
    context = f"prefill {prefix} + {_DECODE_STEPS} decode steps vs one prefill of {full_length}"
    return CheckResult.from_cases(CACHE, runner.role, cases, context), run


def _decode_equivalence(
    runs: Mapping[str, _CacheRun | None],
    original_cache: CheckResult,
    plan: Plan,
    compared: Sequence[str],
    presents: Sequence[str],
    meter: SpreadMeter,
) -> CheckResult:
    original, candidate = runs.get(ORIGINAL), runs.get(CANDIDATE)
    if plan.query_length is not None:
        return CheckResult.skip(
            DECODE,
            CANDIDATE,
            f"the graph declares S={plan.query_length}: its chained calls are compared with "
            "the original's in prefill equivalence",
        )
    if original_cache.skipped or original is None or candidate is None:
        return CheckResult.skip(DECODE, CANDIDATE, "no decode runs to compare")
    if not original_cache.passed:
        return CheckResult.skip(DECODE, CANDIDATE, "original not cache-consistent")
    prefix = plan.cache_prefix
    full_length = prefix + max(_DECODE_STEPS, _CHUNK)

    def judged(spread: Spread | None) -> list[Case]:
        cases: list[Case] = []
        pairs = zip(original.steps, candidate.steps, strict=True)
        for j, (reference, actual) in enumerate(pairs):
            cases += _compare_outputs(
                f"decode step {j + 1}",
                reference,
                actual,
                compared,
                presents,
                spread,
                slice(prefix + j, prefix + j + 1),
            )
        cases += _compare_outputs(
            f"chunk of {_CHUNK}",
            original.chunk,
            candidate.chunk,
            compared,
            presents,
            spread,
            slice(prefix, prefix + _CHUNK),
        )
        return cases

    cases = judged(None)
    if _missed_tolerance(cases) and meter.available:
        # The original's decode outputs equal its full prefill's at those positions (it is
        # cache-consistent): that prefill's spread is theirs.
        full_step = Step.prefill([0], [full_length], full_length)
        cases = judged(meter.at(_scenario(full_step), full_step))
    return CheckResult.from_cases(DECODE, CANDIDATE, cases, "reference: original")


def _batch_consistency(
    runner: ModelRunner, plan: Plan, compared: Sequence[str], meter: SpreadMeter
) -> CheckResult:
    if not runner.supports_batch(2):
        return CheckResult.skip(
            BATCH, runner.role, f"the graph declares batch {runner.signature.batch_dim}"
        )
    if plan.query_length is not None:
        # Rows of two lengths in one call need S to vary; the graph fixes it.
        return CheckResult.skip(BATCH, runner.role, _declared_query_length(plan))
    if runner.signature.attention_mask is None:
        # No padding to express: rows of one length, as a batched generation without a
        # mask runs them, and a chunk of several tokens after the past.
        return _unpadded_batch(runner, plan, compared, meter)
    lengths = plan.batch_lengths
    padded = lengths[0]
    alone_steps = [Step.prefill([row], [n], n) for row, n in enumerate(lengths)]
    try:
        batch = runner.run(Step.prefill([0, 1], lengths, padded))
        alone = [runner.run(step) for step in alone_steps]
    except RunFailure as error:
        return CheckResult.error(BATCH, runner.role, f"right-padded prefill of 2: {error}")

    def judged(row: int, spread: Spread | None) -> list[Case]:
        n = lengths[row]
        label = f"prefill row {row} ({n} of {padded} tokens)"
        return _row_cases(label, alone[row], batch, row, compared, spread, n)

    cases: list[Case] = []
    for row in range(2):
        these = judged(row, None)
        if _missed_tolerance(these) and meter.available:
            mine = alone[row] if runner.role == ORIGINAL else None
            step = alone_steps[row]
            these = judged(row, meter.at(_scenario(step), step, None, mine))
        cases += these
    outputs = [batch, *alone]
    decode_skip = plan.candidate_batch_decode_skip if runner.role == CANDIDATE else ""
    if not runner.signature.has_full_cache:
        decode_skip = "no decode step: no past inputs paired with present outputs"
    if not decode_skip:
        try:
            decode_cases, decode_outputs = _batch_decode(
                runner, plan, compared, batch, alone, meter
            )
        except RunFailure as error:
            return CheckResult.error(
                BATCH, runner.role, f"decode step of 2 after a right-padded prefill: {error}"
            )
        cases += decode_cases
        outputs += decode_outputs
    if runner.role == CANDIDATE:
        cases += _non_finite_cases(outputs)
    context = f"rows of {lengths[0]} and {lengths[1]} tokens, right-padded"
    if not decode_skip:
        context += f", prefill and one decode step ({plan.batch_decode_masks[runner.role]} mask)"
    result = CheckResult.from_cases(BATCH, runner.role, cases, context)
    if decode_skip:
        result.detail = f"{result.detail}; {decode_skip}"
    return result


def _unpadded_batch(
    runner: ModelRunner, plan: Plan, compared: Sequence[str], meter: SpreadMeter
) -> CheckResult:
    """A batch of 2 rows of one length (prefill, then a chunk of several tokens after that
    past) against each row run alone: a graph without attention_mask cannot pad, but a
    dynamic batch takes several rows, and what the original runs the candidate must run."""
    length = plan.batch_lengths[0]
    rows = (0, 1)
    prefill = Step(rows, np.ones((2, length), dtype=np.int64), length)
    alone_prefills = [Step((row,), np.ones((1, length), dtype=np.int64), length) for row in rows]
    chained = runner.signature.has_full_cache
    chunk = Step(rows, np.ones((2, length + _CHUNK), dtype=np.int64), _CHUNK)
    alone_chunks = [
        Step((row,), np.ones((1, length + _CHUNK), dtype=np.int64), _CHUNK) for row in rows
    ]
    try:
        batch = runner.run(prefill)
        alone = [runner.run(step) for step in alone_prefills]
    except RunFailure as error:
        return CheckResult.error(BATCH, runner.role, f"prefill of 2 rows of {length}: {error}")
    pairs: list[tuple[str, Mapping[str, np.ndarray], list[Mapping[str, np.ndarray]], Step]] = [
        (f"prefill of {length}", batch, alone, prefill)
    ]
    if chained:
        try:
            batch_chunk = runner.run(chunk, runner.next_past(batch))
            alone_chunk = [
                runner.run(step, runner.next_past(alone[row]))
                for row, step in zip(rows, alone_chunks, strict=True)
            ]
        except RunFailure as error:
            why = f"chunk of {_CHUNK} at batch 2 after a past of {length}: {error}"
            return CheckResult.error(BATCH, runner.role, why)
        pairs.append((f"chunk of {_CHUNK} after {length}", batch_chunk, alone_chunk, chunk))
    cases: list[Case] = []
    for label, together, separate, step in pairs:
        for row in rows:

            def judged(
                spread: Spread | None,
                row: int = row,
                label: str = label,
                together: Mapping[str, np.ndarray] = together,
                separate: list[Mapping[str, np.ndarray]] = separate,
            ) -> list[Case]:
                return _row_cases(
                    f"{label} row {row}", separate[row], together, row, compared, spread
                )

            these = judged(None)
            if _missed_tolerance(these) and meter.available:
                one_row = alone_prefills[row]
                if step is prefill:
                    these = judged(meter.at(_scenario(one_row), one_row))
                else:
                    scenario = f"chunk after {_scenario(one_row)}"
                    these = judged(meter.after_prefill(scenario, one_row, alone_chunks[row]))
            cases += these
    if runner.role == CANDIDATE:
        outputs = [batch, *alone] + ([batch_chunk, *alone_chunk] if chained else [])
        cases += _non_finite_cases(outputs)
    context = f"2 unpadded rows of {length} tokens (no attention_mask to pad with)"
    if chained:
        context += f", then a chunk of {_CHUNK} tokens at batch 2 after that past"
    return CheckResult.from_cases(BATCH, runner.role, context=context, cases=cases)


def _batch_decode(
    runner: ModelRunner,
    plan: Plan,
    compared: Sequence[str],
    batch: Mapping[str, np.ndarray],
    alone: Sequence[Mapping[str, np.ndarray]],
    meter: SpreadMeter,
) -> tuple[list[Case], list[dict[str, np.ndarray]]]:
    """One decode step at B=2 after the right-padded prefill, against each row decoded alone."""
    lengths = plan.batch_lengths
    padded = lengths[0]
    convention = plan.batch_decode_masks[runner.role]
    mask = np.zeros((2, padded + 1), dtype=np.int64)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        mask[row, n if convention == "prefix" else padded] = 1
    decoded = runner.run(Step((0, 1), mask, 1), runner.next_past(batch))
    alone_steps = [
        Step((row,), np.ones((1, n + 1), dtype=np.int64), 1) for row, n in enumerate(lengths)
    ]
    decoded_alone = [runner.run(alone_steps[row], runner.next_past(alone[row])) for row in range(2)]
    cases: list[Case] = []
    for row, n in enumerate(lengths):

        def judged(spread: Spread | None, row: int = row) -> list[Case]:
            label = f"decode row {row} ({convention} mask)"
            return _row_cases(label, decoded_alone[row], decoded, row, compared, spread)

        these = judged(None)
        if _missed_tolerance(these) and meter.available:
            prefill = Step.prefill([row], [n], n)
            scenario = f"decode after {_scenario(prefill)}"
            these = judged(meter.after_prefill(scenario, prefill, alone_steps[row]))
        cases += these
    return cases, [decoded, *decoded_alone]


def _row_cases(
    label: str,
    alone: Mapping[str, np.ndarray],
    batch: Mapping[str, np.ndarray],
    row: int,
    compared: Sequence[str],
    spread: Spread | None,
    length: int | None = None,
) -> list[Case]:
    """Row ``row`` of a batched call (its first ``length`` positions) against the row run
    alone, output by output."""
    return [
        compare(
            label,
            alone[name],
            batch[name][row : row + 1, :length],
            spread.at(name) if spread is not None else None,
        )
        for name in compared
    ]


def _compare_outputs(
    label: str,
    reference: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    compared: Sequence[str],
    presents: Sequence[str],
    spread: Spread | None = None,
    positions: slice | None = None,
) -> list[Case]:
    def at(name: str) -> float | None:
        return spread.at(name, positions) if spread is not None else None

    cases = [
        compare(f"{label} {name}", reference[name], actual[name], at(name)) for name in compared
    ]
    present_cases = [compare(name, reference[name], actual[name], at(name)) for name in presents]
    if present_cases:
        worst = max(present_cases, key=lambda case: case.severity)
        cases.append(dataclasses.replace(worst, label=f"{label} presents (worst: {worst.label})"))
    cases += _non_finite_cases([actual])
    return cases


def _non_finite_cases(runs: Sequence[Mapping[str, np.ndarray]]) -> list[Case]:
    """Any NaN/inf in a candidate output fails, compared or not (padding rows included)."""
    bad = sorted(
        {
            name
            for outputs in runs
            for name, value in outputs.items()
            if value.dtype.kind == "f" and not np.all(np.isfinite(value))
        }
    )
    if not bad:
        return []
    return [Case(NON_FINITE, np.inf, 0.0, False, f"NaN/inf in {', '.join(bad)}")]


def _original_defect(
    description: str, original: CheckResult, candidate: CheckResult, cause: str
) -> OriginalDefect:
    fixed = None if candidate.skipped else bool(candidate.passed)
    return OriginalDefect(original.name, description, fixed, named_cause=bool(cause))


def _defect(check: str, result: CheckResult, reference: str, cause: str) -> str:
    if result.detail.startswith("error: "):
        text = f"{check}: fails on ONNX Runtime: {result.detail[len('error: ') :]}"
    else:
        worst = max(result.cases, key=lambda case: case.severity)
        if worst.note:
            text = f"{check}: {worst.label}: {worst.note}"
        else:
            text = (
                f"{check}: {worst.label} logits differ from {reference} by "
                f"{worst.max_abs_diff:.3g} (tolerance {worst.tolerance:.3g})"
            )
    return f"{text}; {cause}" if cause else text
