"""What the CLI prints by default: one line per layer, the original's defects by class, the
verdict and what it rests on. A user reads it in ten seconds; ``--verbose`` prints every check
and case (``VerificationResult.summary``), ``--report`` keeps every number.

A layer's line: its Attention node, its kind (from the layer proof), the form it got, its
proof (``proven``, ``whole-model only`` where no layer proof exists and the whole-model check
covers it, ``NOT PROVEN``, ``FAILED``) and its worst candidate difference against the
tolerance.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # The verifier imports onnxruntime; the rewriter must import without it.
    from rewriter.report import RewriteReport
    from rewriter.verification import VerificationResult

__all__ = ["DEFECT_CLASSES", "defect_class", "verification_console"]

# A defect line of the original -> its class, read from the cause the verifier named
# (the same wording in the layer proofs and the whole-model checks).
DEFECT_CLASSES: tuple[tuple[str, str], ...] = (
    (
        "aligned to the upper left",
        "is_causal=1 without past is aligned to the upper left: a decode step sees only the "
        "first keys",
    ),
    (
        "3-D [B,S,T] attn_mask",
        "a 3-D [B,S,T] mask is read as [heads,S,T]: a batch of 2 fails or is wrong",
    ),
)
_SHORT_CHECKS = {
    "prefill_equivalence": "prefill",
    "cache_consistency": "cache",
    "decode_equivalence": "decode",
    "batch_consistency": "batch",
}
_CHECK_NAMES = {
    "cache_consistency": "cache consistency",
    "batch_consistency": "batch consistency",
}


def defect_class(line: str) -> str:
    """The class of one defect line; an unnamed defect is its own class (its first clause)."""
    for marker, description in DEFECT_CLASSES:
        if marker in line:
            return description
    return line.split(";", 1)[0]


def verification_console(report: RewriteReport, result: VerificationResult) -> str:
    """The default console after a verified rewrite (or ``verify A B`` with no report)."""
    lines = _layer_lines(report, result)
    whole = _whole_model_line(result)
    if whole:
        lines.append(whole)
    lines += _defect_block(result)
    if not result.passed:
        lines += [f"failed because: {gate}" for gate in result.gates]
    lines.append(result.verdict_line())
    return "\n".join(lines)


def _layer_lines(report: RewriteReport, result: VerificationResult) -> list[str]:
    forms = {
        r.node: r.speed_form if r.speed_form != "gqa" else f"gqa {r.form}" for r in report.rewrites
    }
    whole_model_strict = (
        bool(result.model and result.model.get("passed")) and not result.within_spread
    )
    rows = []
    for layer in result.layers:
        kind = layer.config.split(", scale", 1)[0].replace(",", "") if layer.config else "-"
        if layer.reason:
            proof = "whole-model only" if whole_model_strict else "NOT PROVEN"
            worst = layer.reason
        else:
            proof = "proven" if layer.passed else "FAILED"
            worst = _worst(layer.checks)
        # A layer without a proof is named by its replacement, which is named after the
        # Attention it replaced (rules._naming): "<attention>/GroupQueryAttention_3".
        form = forms.get(layer.node) or forms.get(layer.node.rsplit("/", 1)[0], "-")
        rows.append((layer.node, kind, form, proof, worst))
    if not rows:
        return []
    header = ("layer", "kind", "form", "proof", "worst / tolerance")
    notes = {layer.note: layer.node for layer in result.layers if layer.note}
    return _table([header, *rows]) + [f"note: {note}" for note in notes]


def _worst(checks: Sequence) -> str:
    candidate = [c for c in checks if c.model == "candidate" and c.max_abs_diff is not None]
    if not candidate:
        return "-"
    failed = [c for c in candidate if c.passed is False]
    if failed:
        first = failed[0]
        if first.detail.startswith("error: "):
            return f"{first.name}: {first.detail}"
        return f"{first.name}: {first.max_abs_diff:.2g} > {first.tolerance:.2g} at {first.detail}"
    worst = max(candidate, key=lambda c: (c.max_abs_diff or 0.0) / (c.tolerance or 1.0))
    return f"{worst.max_abs_diff:.2g} / {worst.tolerance:.2g}"


def _whole_model_line(result: VerificationResult) -> str:
    parts = []
    for check in result.checks:
        if check.skipped or (check.passed is False and check.model == "original"):
            continue  # skipped, or the original's failure: in the defects block
        worst = check.worst
        status = "" if check.passed else "FAIL "
        numbers = worst.judgement() if worst is not None else check.detail
        name = _SHORT_CHECKS.get(check.name, check.name)
        parts.append(
            f"{status}{name}{'' if check.model == 'candidate' else ' (original)'} {numbers}"
        )
    if result.model is not None and not result.model.get("ran"):
        parts.append(f"not run: {result.model.get('reason', '')}")
    if result.graph_diff is not None:
        verdict = {True: "nothing else changed", False: "CHANGED outside the layers"}
        parts.append(verdict.get(result.graph_diff.passed, "graph outside the layers not compared"))
    if not parts:
        return ""
    lengths = (result.model or {}).get("lengths", "")
    title = (
        "whole model (wiring, short lengths)"
        if lengths.startswith("confirmation")
        else "whole model"
    )
    return f"{title}: " + "; ".join(parts)


def _defect_block(result: VerificationResult) -> list[str]:
    """One line per defect class of the original: the layers (or the whole model) that show
    it and whether the rewrite fixed it."""
    classes: dict[str, dict[str, object]] = {}
    for proof in result.layers:
        for line in proof.original_defects:
            entry = classes.setdefault(defect_class(line), {"where": [], "fixed": set()})
            if proof.node not in entry["where"]:  # type: ignore[operator]
                entry["where"].append(proof.node)  # type: ignore[union-attr]
            entry["fixed"].add(proof.passed)  # type: ignore[union-attr]
    for defect in result.defects:
        entry = classes.setdefault(defect_class(defect.description), {"where": [], "fixed": set()})
        entry["where"].append(f"whole model ({_CHECK_NAMES.get(defect.check, defect.check)})")  # type: ignore[union-attr]
        entry["fixed"].add(defect.fixed_by_rewrite)  # type: ignore[union-attr]
    if not classes:
        return []
    lines = ["defects of the original:"]
    for description, entry in classes.items():
        fixed = entry["fixed"]
        status = "fixed by the rewrite" if fixed == {True} else "NOT fixed everywhere"
        lines.append(f"  {description} ({status}): {_places(entry['where'])}")  # type: ignore[arg-type]
    return lines


def _places(where: Iterable[str]) -> str:
    where = [_short(place) for place in where]
    return (
        ", ".join(where) if len(where) <= 4 else f"{', '.join(where[:3])} and {len(where) - 3} more"
    )


def _short(node: str) -> str:
    """``/model/layers.4/Attention_116`` -> ``layer 4``; other names as they are."""
    match = re.search(r"layers\.(\d+)", node)
    return f"layer {match.group(1)}" if match else node


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        for row in rows
    ]
