"""What a verification run hands back: per-check numbers, the verdict, defects of the original.

A check is *skipped* (``passed is None``) when it does not apply or when its precondition
failed (decode equivalence against an original that is not cache-consistent). A skipped check
never counts as passed; the verdict only ignores it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from rewriter._json_values import json_float
from rewriter.verification._spread import SPREAD_FACTOR, allowed_difference

__all__ = ["Case", "CheckResult", "OriginalDefect", "VerificationError", "VerificationResult"]


class VerificationError(Exception):
    """The verification could not run: an input cannot be fed, a model does not load, or the
    requested provider is unavailable. The message is one line and names the culprit."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison inside a check, e.g. one prefill length or one decode step.

    ``spread`` (whole-model checks): the original's own difference to itself at the same
    output and feeds (``_spread``); the case may then differ by ``allowed``, the larger of
    the fixed tolerance and SPREAD_FACTOR x spread. None: the fixed tolerance alone.
    """

    label: str
    max_abs_diff: float
    tolerance: float
    passed: bool
    note: str = ""
    spread: float | None = None

    @property
    def allowed(self) -> float:
        return allowed_difference(self.tolerance, self.spread)

    @property
    def within_spread(self) -> bool:
        """Passed only because the original disagrees with itself by as much."""
        return self.passed and self.max_abs_diff > self.tolerance

    @property
    def severity(self) -> float:
        """How far past what it may differ by the case is (> 1 fails); inf for non-finite
        output."""
        if not math.isfinite(self.max_abs_diff):
            return math.inf
        if self.allowed > 0:
            return self.max_abs_diff / self.allowed
        return math.inf if self.max_abs_diff > 0 else 0.0

    def judgement(self) -> str:
        """The numbers a reader needs: ``0.155 within the original's own spread 0.11 x 3``."""
        plain = f"{self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})"
        if self.spread is None or self.max_abs_diff <= self.tolerance:
            return plain
        if self.allowed > self.tolerance:
            verb = "within" if self.passed else "beyond"
            return (
                f"{self.max_abs_diff:.3g} {verb} the original's own spread {self.spread:.3g} "
                f"x {SPREAD_FACTOR:g} (tolerance {self.tolerance:.3g})"
            )
        return (
            f"{self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}; the original's own "
            f"spread {self.spread:.3g})"
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "passed": self.passed,
            "max_abs_diff": json_float(self.max_abs_diff),
            "tolerance": self.tolerance,
        }
        if self.spread is not None:
            out["spread"] = json_float(self.spread)
            out["allowed"] = json_float(self.allowed)
        if self.note:
            out["note"] = self.note
        return out


@dataclasses.dataclass
class CheckResult:
    """One oracle applied to one model.

    ``model`` is the model under test: ``"candidate"`` (for the equivalence checks the
    reference is the original) or ``"original"``. ``max_abs_diff``, ``tolerance`` and
    ``spread`` come from the worst case, the one with the largest ``max_abs_diff / allowed``.
    """

    name: str
    model: str
    passed: bool | None
    max_abs_diff: float | None = None
    tolerance: float | None = None
    detail: str = ""
    cases: list[Case] = dataclasses.field(default_factory=list)
    spread: float | None = None

    @property
    def skipped(self) -> bool:
        return self.passed is None

    @property
    def within_spread(self) -> bool:
        """Passed, but some case only within the original's own spread, not the tolerance."""
        return bool(self.passed) and any(case.within_spread for case in self.cases)

    @property
    def worst(self) -> Case | None:
        return max(self.cases, key=lambda case: case.severity) if self.cases else None

    @classmethod
    def from_cases(cls, name: str, model: str, cases: list[Case], context: str = "") -> CheckResult:
        """Worst case's numbers; the detail names the worst case when the check fails, else
        it is ``context`` (what was compared)."""
        worst = max(cases, key=lambda case: case.severity)
        passed = all(case.passed for case in cases)
        detail = context
        if not passed:
            detail = f"{worst.label}: {worst.note}" if worst.note else worst.label
            detail = f"{detail}; {context}" if context else detail
        return cls(
            name=name,
            model=model,
            passed=passed,
            max_abs_diff=worst.max_abs_diff,
            tolerance=worst.tolerance,
            detail=detail,
            cases=cases,
            spread=worst.spread,
        )

    @classmethod
    def skip(cls, name: str, model: str, reason: str) -> CheckResult:
        return cls(name=name, model=model, passed=None, detail=f"skipped: {reason}")

    @classmethod
    def error(cls, name: str, model: str, message: str) -> CheckResult:
        """The model raised on ONNX Runtime while the check ran."""
        return cls(
            name=name, model=model, passed=False, max_abs_diff=math.inf, detail=f"error: {message}"
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "passed": self.passed,
            "max_abs_diff": json_float(self.max_abs_diff),
            "tolerance": self.tolerance,
            "model": self.model,
            "detail": self.detail,
        }
        if self.spread is not None:
            out["spread"] = json_float(self.spread)
            out["within_spread"] = self.within_spread
        if self.skipped:
            out["skipped"] = True
        if self.cases:
            out["cases"] = [case.to_dict() for case in self.cases]
        return out

    def summary(self) -> str:
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        line = f"{status} {self.name} [{self.model}]"
        worst = self.worst
        if worst is not None and worst.spread is not None and worst.max_abs_diff > worst.tolerance:
            line += f" max_abs_diff={worst.judgement()}"
        elif self.max_abs_diff is not None and not self.skipped:
            line += f" max_abs_diff={self.max_abs_diff:.3g}"
            if self.tolerance is not None:
                line += f" tolerance={self.tolerance:.3g}"
        if self.detail:
            line += f" - {self.detail}"
        return line


@dataclasses.dataclass(frozen=True)
class OriginalDefect:
    """A check the original model fails, and whether the candidate passes it."""

    check: str
    description: str
    fixed_by_rewrite: bool | None  # None: the candidate's check did not run
    # The verifier read the cause in the original's graph (upper-left is_causal, a 3-D mask):
    # only such a defect may excuse a candidate that fails the same check (verdict_gates).
    named_cause: bool = False

    @property
    def status(self) -> str:
        return {
            True: "fixed by the rewrite",
            False: "not fixed: the candidate fails this check too",
            None: "not checked on the candidate",
        }[self.fixed_by_rewrite]

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "description": self.description,
            "fixed_by_rewrite": self.fixed_by_rewrite,
        }


@dataclasses.dataclass
class VerificationResult:
    """The verdict judges the rewrite, not the original: it fails where the candidate is
    worse (see ``verify``); failures of the original are its ``defects``, each saying
    whether the rewrite fixed it. ``gates`` says why a failed verdict failed."""

    passed: bool
    checks: list[CheckResult]
    defects: list[OriginalDefect]
    gates: list[str] = dataclasses.field(default_factory=list)
    # Set by verify(mode=...): which proofs ran. `checks` are the whole-model checks.
    mode: str | None = None
    layers: list[Any] = dataclasses.field(default_factory=list)  # LayerProof per layer
    graph_diff: CheckResult | None = None  # nothing changed outside the rewritten layers
    model: dict[str, Any] | None = None  # whole-model check: ran/passed or why it did not
    # Defects of the original found by the layer proofs, one line each naming its layers
    # (`defects` are those of the whole-model check).
    layer_defects: list[str] = dataclasses.field(default_factory=list)
    # The original's own spread (_spread): the twin's setting, SPREAD_FACTOR, the spread of
    # every scenario where it was measured (only where a comparison missed its tolerance).
    spread: dict[str, Any] | None = None
    # What a passed verdict rests on, in words (set by verify(mode=...)).
    rests_on: str = ""

    @property
    def within_spread(self) -> bool:
        """Some whole-model check held only within the original's own spread."""
        return any(check.within_spread for check in self.checks)

    @property
    def original_defects(self) -> list[str]:
        """One line per defect of the original, with what the rewrite did about it."""
        return [f"{defect.description}; {defect.status}" for defect in self.defects]

    def failed_checks(self) -> list[CheckResult]:
        return [check for check in self.checks if check.passed is False]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "checks": [check.to_dict() for check in self.checks],
            "original_defects": self.original_defects,
            "defects": [defect.to_dict() for defect in self.defects],
            "failed_because": list(self.gates),
            "rests_on": self.rests_on,
            "spread": self.spread,
        } | self._proofs_dict()

    def summary(self) -> str:
        lines = [layer.summary() for layer in self.layers]
        if self.graph_diff is not None:
            lines.append(self.graph_diff.summary())
        if self.model is not None and not self.model.get("ran"):
            lines.append(f"SKIP whole-model check: {self.model.get('reason', '')}")
        lines += [check.summary() for check in self.checks]
        lines += [f"DEFECT original: {defect}" for defect in self.original_defects]
        lines += [f"DEFECT original: {defect}" for defect in self.layer_defects]
        lines += [f"failed because: {gate}" for gate in self.gates]
        lines.append(self.verdict_line())
        return "\n".join(lines)

    def verdict_line(self) -> str:
        if not self.passed:
            return "verdict: FAILED"
        return f"verdict: PASSED ({self.rests_on})" if self.rests_on else "verdict: PASSED"

    def _proofs_dict(self) -> dict[str, Any]:
        if self.mode is None:
            return {}
        return {
            "mode": self.mode,
            "layers": [layer.to_dict() for layer in self.layers],
            "graph_diff": self.graph_diff.to_dict() if self.graph_diff is not None else None,
            "model": self.model,
            "layer_defects": list(self.layer_defects),
        }
