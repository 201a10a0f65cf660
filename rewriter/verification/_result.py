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

__all__ = ["Case", "CheckResult", "OriginalDefect", "VerificationError", "VerificationResult"]


class VerificationError(Exception):
    """The verification could not run: an input cannot be fed, a model does not load, or the
    requested provider is unavailable. The message is one line and names the culprit."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison inside a check, e.g. one prefill length or one decode step."""

    label: str
    max_abs_diff: float
    tolerance: float
    passed: bool
    note: str = ""

    @property
    def severity(self) -> float:
        """How far past its tolerance the case is (> 1 fails); inf for non-finite output."""
        if not math.isfinite(self.max_abs_diff):
            return math.inf
        if self.tolerance > 0:
            return self.max_abs_diff / self.tolerance
        return math.inf if self.max_abs_diff > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "passed": self.passed,
            "max_abs_diff": json_float(self.max_abs_diff),
            "tolerance": self.tolerance,
        }
        if self.note:
            out["note"] = self.note
        return out


@dataclasses.dataclass
class CheckResult:
    """One oracle applied to one model.

    ``model`` is the model under test: ``"candidate"`` (for the equivalence checks the
    reference is the original) or ``"original"``. ``max_abs_diff`` and ``tolerance`` come
    from the worst case, the one with the largest ``max_abs_diff / tolerance``.
    """

    name: str
    model: str
    passed: bool | None
    max_abs_diff: float | None = None
    tolerance: float | None = None
    detail: str = ""
    cases: list[Case] = dataclasses.field(default_factory=list)

    @property
    def skipped(self) -> bool:
        return self.passed is None

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
        if self.skipped:
            out["skipped"] = True
        if self.cases:
            out["cases"] = [case.to_dict() for case in self.cases]
        return out

    def summary(self) -> str:
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        line = f"{status} {self.name} [{self.model}]"
        if self.max_abs_diff is not None and not self.skipped:
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
        lines.append(f"verdict: {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)

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
