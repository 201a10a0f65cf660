"""What the probe found: per-shape outcomes, per-form verdicts, and their table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rewriter._json_values import json_float

__all__ = [
    "SHAPES",
    "TOLERANCES",
    "FormVerdict",
    "ProbeError",
    "ProbeResult",
    "ShapeOutcome",
]

SHAPES: tuple[str, ...] = ("prefill", "decode", "chunked", "batch2-decode")

# Maximum |output - reference| relative to max(1, max |reference|) (SPEC section 6: never
# loosened to make a form pass). bfloat16 keeps 8 mantissa bits, hence twice fp16's.
TOLERANCES: dict[str, float] = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}


class ProbeError(Exception):
    """The probe cannot run here (for example the requested provider is not installed)."""


@dataclass(frozen=True)
class ShapeOutcome:
    """One probe shape run through one form.

    ``max_abs_diff`` is the largest |output - reference| over both runs (NaN when the output
    held NaN; None when nothing ran). ``error`` is the one-line exception text, or why an output
    that ran cannot be trusted (the two runs disagree).
    """

    shape: str
    ok: bool
    max_abs_diff: float | None
    error: str | None


@dataclass(frozen=True)
class FormVerdict:
    """Whether ``form`` computes the reference on every probe shape."""

    form: str
    dtype: str
    head_size: int
    windowed: bool
    qualifies: bool
    outcomes: tuple[ShapeOutcome, ...]

    def reason(self) -> str:
        """One line: why the form does not qualify (failing shapes grouped by cause)."""
        if self.qualifies:
            return "correct on " + ", ".join(outcome.shape for outcome in self.outcomes)
        causes: dict[str, list[str]] = {}
        for outcome in self.outcomes:
            if not outcome.ok:
                causes.setdefault(self._describe(outcome), []).append(outcome.shape)
        if not causes:
            return "no probe shape ran"
        return "; ".join(f"{', '.join(shapes)}: {cause}" for cause, shapes in causes.items())

    def _describe(self, outcome: ShapeOutcome) -> str:
        diff = outcome.max_abs_diff
        if diff is None:
            return outcome.error or "did not run"
        wrong = (
            "NaN in output"
            if math.isnan(diff)
            else f"wrong, max |diff| {diff:.2g} > {TOLERANCES[self.dtype]:g} relative"
        )
        return f"{outcome.error}, {wrong}" if outcome.error else wrong


@dataclass
class ProbeResult:
    """All verdicts of one probe run on one onnxruntime version and provider."""

    ort_version: str
    provider: str
    verdicts: list[FormVerdict] = field(default_factory=list)

    def verdict(self, form: str, dtype: str, head_size: int, windowed: bool) -> FormVerdict | None:
        for verdict in self.verdicts:
            if (verdict.form, verdict.dtype, verdict.head_size, verdict.windowed) == (
                form,
                dtype,
                head_size,
                windowed,
            ):
                return verdict
        return None

    def qualifies(self, form: str, dtype: str, head_size: int, windowed: bool) -> bool:
        verdict = self.verdict(form, dtype, head_size, windowed)
        return verdict is not None and verdict.qualifies

    def to_dict(self) -> dict[str, Any]:
        """JSON-able table; a non-finite ``max_abs_diff`` becomes the string "nan" or "inf"."""
        return {
            "ort_version": self.ort_version,
            "provider": self.provider,
            "verdicts": [
                {
                    "form": verdict.form,
                    "dtype": verdict.dtype,
                    "head_size": verdict.head_size,
                    "windowed": verdict.windowed,
                    "qualifies": verdict.qualifies,
                    "reason": verdict.reason(),
                    "outcomes": [
                        {
                            "shape": outcome.shape,
                            "ok": outcome.ok,
                            "max_abs_diff": json_float(outcome.max_abs_diff),
                            "error": outcome.error,
                        }
                        for outcome in verdict.outcomes
                    ],
                }
                for verdict in self.verdicts
            ],
        }

    def table(self) -> str:
        """Human-readable table: one row per (form, dtype, D, window), one column per shape.

        Errors are numbered and spelled out once below the table.
        """
        errors: dict[str, int] = {}
        header = ["form", "dtype", "D", "window", "qualifies", *SHAPES]
        rows = [header]
        for verdict in self.verdicts:
            cells = {outcome.shape: _cell(outcome, errors) for outcome in verdict.outcomes}
            rows.append(
                [
                    verdict.form,
                    verdict.dtype,
                    str(verdict.head_size),
                    "yes" if verdict.windowed else "no",
                    "yes" if verdict.qualifies else "NO",
                    *(cells.get(shape, "-") for shape in SHAPES),
                ]
            )
        widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
        lines = [f"GQA form probe: onnxruntime {self.ort_version}, provider {self.provider}"]
        lines += [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        lines += [f"[{number}] {error}" for error, number in errors.items()]
        return "\n".join(lines)


def _cell(outcome: ShapeOutcome, errors: dict[str, int]) -> str:
    diff = outcome.max_abs_diff
    if diff is None:
        number = errors.setdefault(outcome.error or "did not run", len(errors) + 1)
        return f"error[{number}]"
    if outcome.ok:
        return f"ok {diff:.0e}"
    text = "NaN" if math.isnan(diff) else f"WRONG {diff:.0e}"
    if outcome.error:
        number = errors.setdefault(outcome.error, len(errors) + 1)
        text += f" [{number}]"
    return text
