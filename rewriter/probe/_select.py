"""Choosing the GQA form for one (dtype, head size, window) from a probe's verdicts."""

from __future__ import annotations

from dataclasses import dataclass

from rewriter.probe._forms import FORMS
from rewriter.probe._result import ProbeResult

__all__ = ["FORM_PREFERENCE", "FormChoice", "select_form"]

# Fewest copies of the borrowed cache first:
# - past: GQA reads the borrowed BNSH cache in place; no transpose, nothing written back.
# - past-present: same reads, but GQA copies the whole cache into present outputs nobody reads.
# - kv: the BNSH -> [B, T, Nkv*D] transpose copies the cache per layer per step, and the present
#   outputs are written as well.
# - split: two slices, a transpose of the new keys and the present copy.
# split-nopresent is never chosen automatically: ORT reads out of bounds there (SPEC section 3),
# and a probe that happened to pass would prove nothing about the next call's memory.
FORM_PREFERENCE: tuple[str, ...] = ("past", "past-present", "kv", "split")


@dataclass(frozen=True)
class FormChoice:
    """The chosen form, or None with the reason no form (or not the requested one) qualifies."""

    form: str | None
    reason: str


def select_form(
    result: ProbeResult, dtype: str, head_size: int, windowed: bool, requested: str = "auto"
) -> FormChoice:
    """Pick the form to rewrite to; pure, so it works on any ProbeResult.

    ``requested="auto"`` takes the first qualifying form of FORM_PREFERENCE. A named form is
    taken only if the probe says it qualifies; otherwise the choice is None with the probe's
    reason. Unknown form names raise ValueError.
    """
    case = (
        f"{dtype} D={head_size} {'windowed' if windowed else 'full attention'} "
        f"on onnxruntime {result.ort_version} {result.provider}"
    )
    if requested != "auto" and requested not in FORMS:
        raise ValueError(f"unknown form {requested!r}; expected 'auto' or one of {FORMS}")
    candidates = FORM_PREFERENCE if requested == "auto" else (requested,)
    failures = []
    for form in candidates:
        verdict = result.verdict(form, dtype, head_size, windowed)
        if verdict is None:
            failures.append(f"{form}: not probed")
        elif verdict.qualifies:
            how = "first qualifying form" if requested == "auto" else "requested form qualifies"
            return FormChoice(form, f"{form} ({how}) for {case}")
        else:
            failures.append(f"{form}: {verdict.reason()}")
    if requested == "auto":
        return FormChoice(None, f"no GQA form qualifies for {case}: " + " | ".join(failures))
    return FormChoice(None, f"requested form rejected for {case}: {failures[0]}")
