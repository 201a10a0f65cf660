"""The whole-model check: open both models once, synthesize feeds, run the oracles, give
the verdict. ``verify(mode=...)`` (``_modes``) runs it beside the layer proofs; it is not a
public entry point of its own."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence

from rewriter.verification._checks import (
    CANDIDATE,
    NON_FINITE,
    ORIGINAL,
    PREFILL,
    ModelRunner,
    Plan,
    SpreadMeter,
    run_checks,
)
from rewriter.verification._feeds import DecoderSignature, FeedSynthesizer
from rewriter.verification._graph_facts import read_graph_facts
from rewriter.verification._memory import resident_bytes
from rewriter.verification._result import (
    CheckResult,
    OriginalDefect,
    VerificationError,
    VerificationResult,
)
from rewriter.verification._session import ModelSource, execution_providers, open_session
from rewriter.verification._shared_weights import SharedWeights
from rewriter.verification._spread import TWIN_SETTING

__all__ = ["ModelCheckSkipped", "verdict_gates", "verify_whole_model"]


class ModelCheckSkipped(Exception):
    """The whole-model check stopped before running: the rest would not fit in memory."""


# Token ids when neither model states its vocabulary: 0 and 1 exist in any vocabulary.
_FALLBACK_VOCAB = 2


def verify_whole_model(
    original: ModelSource,
    candidate: ModelSource,
    *,
    provider: str = "cpu",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    shared_weights: SharedWeights | None = None,
    confirmation: bool = False,
    memory_gate: Callable[[int], str] | None = None,
) -> VerificationResult:
    """Run ``original`` and ``candidate`` on ONNX Runtime and decide whether they compute the
    same thing (SPEC section 6). Defects of the original are reported, not held against the
    candidate. ``shared_weights``: one copy of the weights for both sessions.
    ``confirmation``: short lengths (``Plan.for_models``), where layer proofs carry the rest.
    ``memory_gate``: called with the bytes the original's session took once it is loaded;
    a non-empty answer (why the rest would not fit) stops the check there
    (``ModelCheckSkipped``).

    Raises:
        VerificationError: an input cannot be fed, a model does not load on ONNX Runtime, or
            the provider is unavailable.
    """
    report = progress if progress is not None else _ignore
    execution_providers(provider)  # fail before the expensive part
    with contextlib.ExitStack() as stack:
        report("loading the original model")
        before = resident_bytes()
        original_model = open_session(original, "original", provider, shared_weights)
        stack.callback(original_model.close)
        if memory_gate is not None and before is not None:
            after = resident_bytes()
            why = memory_gate(max(0, (after or before) - before))
            if why:
                raise ModelCheckSkipped(why)
        report("loading the candidate model")
        candidate_model = open_session(candidate, "candidate", provider, shared_weights)
        stack.callback(candidate_model.close)

        original_signature = DecoderSignature.from_session(original_model.session, "original")
        candidate_signature = DecoderSignature.from_session(candidate_model.session, "candidate")
        if not set(original_signature.compared_outputs) & set(candidate_signature.compared_outputs):
            raise VerificationError(
                "the models share no output to compare: original has "
                f"{list(original_signature.compared_outputs)}, candidate has "
                f"{list(candidate_signature.compared_outputs)}"
            )
        original_facts = read_graph_facts(original_model.model)
        candidate_facts = read_graph_facts(candidate_model.model)
        plan = Plan.for_models(
            original_facts,
            candidate_facts,
            confirmation=confirmation,
            query_length=_declared_query_length(original_signature, candidate_signature),
        )
        vocab_sizes = [
            size
            for size in (
                original_signature.vocab_size,
                candidate_signature.vocab_size,
                original_facts.embedding_rows,
                candidate_facts.embedding_rows,
            )
            if size
        ]
        feeder = FeedSynthesizer(
            vocab_size=min(vocab_sizes) if vocab_sizes else _FALLBACK_VOCAB,
            capacity=plan.capacity,
            seed=seed,
        )

        def open_twin() -> ModelRunner:
            # The original again, graph optimizations disabled: its own spread (_spread).
            report(f"loading the original again ({TWIN_SETTING}) to measure its own spread")
            twin = open_session(original, "original", provider, shared_weights, optimized=False)
            stack.callback(twin.close)
            return ModelRunner(twin, original_signature, feeder)

        original_runner = ModelRunner(original_model, original_signature, feeder)
        meter = SpreadMeter(original_runner, open_twin)
        checks, defects = run_checks(
            original_runner,
            ModelRunner(candidate_model, candidate_signature, feeder),
            plan,
            original_facts,
            report,
            meter,
        )
    gates = verdict_gates(checks, defects)
    result = VerificationResult(
        passed=not gates, checks=checks, defects=defects, gates=gates, spread=meter.to_dict()
    )
    report(f"verdict: {'passed' if result.passed else 'failed'}")
    return result


def verdict_gates(checks: list[CheckResult], defects: Sequence[OriginalDefect] = ()) -> list[str]:
    """Why the candidate is worse than the original, if it is: prefill equivalence did not
    hold, a candidate output was not finite, ONNX Runtime refused to run the candidate, or
    the candidate fails a check that the original passes (or one with no original
    counterpart). A candidate that fails a check the original fails too is excused only
    when the original's failure is a defect whose cause the verifier named in its graph and
    the candidate differs there by no more than the original: a partial rewrite of a
    defective original then passes, and a rewrite that breaks differently does not."""
    gates = []
    if not any(check.name == PREFILL and check.passed for check in checks):
        gates.append("prefill equivalence with the original does not hold")
    original = {check.name: check for check in checks if check.model == ORIGINAL}
    named = {defect.check for defect in defects if defect.named_cause}
    for check in checks:
        if check.model != CANDIDATE or check.passed is not False or check.name == PREFILL:
            continue
        if any(case.label == NON_FINITE for case in check.cases):
            gates.append(f"{check.name}: the candidate's outputs are not finite")
        elif check.name not in original:  # decode equivalence: the original is the reference
            gates.append(f"{check.name}: the candidate differs from the original")
        elif original[check.name].passed is not False:
            gates.append(f"{check.name}: the candidate fails where the original passes")
        elif check.detail.startswith("error: ") and _error_kind(check) != _error_kind(
            original[check.name]
        ):
            # An error is worse than any difference, unless it is the original's own error,
            # inherited where the rewrite left a failing node alone (the same message, at
            # the same or another node of that defect).
            reason = check.detail[len("error: ") :]
            gates.append(f"{check.name}: ONNX Runtime cannot run the candidate: {reason}")
        elif check.name not in named:
            gates.append(
                f"{check.name}: the candidate fails it, and the original's failure has no "
                "cause the verifier could name"
            )
        elif (check.max_abs_diff or 0.0) > (original[check.name].max_abs_diff or 0.0):
            gates.append(
                f"{check.name}: the candidate differs by {check.max_abs_diff:.3g}, more than "
                f"the defective original ({original[check.name].max_abs_diff:.3g})"
            )
    return gates


def _error_kind(check: CheckResult) -> str:
    """ONNX Runtime's error text without the node it names; "" when the check did not error."""
    if not check.detail.startswith("error: "):
        return ""
    return re.sub(r"Name:'[^']*'", "Name:'*'", check.detail)


def _declared_query_length(*signatures: DecoderSignature) -> int | None:
    """The S the graphs fix (both feed the same steps, so they must agree)."""
    declared = {s.static_query_length for s in signatures} - {None}
    if len(declared) > 1:
        raise VerificationError(
            f"the models declare different query lengths {sorted(declared)}: no call fits both"
        )
    return next(iter(declared), None)


def _ignore(_message: str) -> None:
    pass
