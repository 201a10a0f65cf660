"""Choosing the GroupQueryAttention form per layer from what the runtime was probed to run."""

from __future__ import annotations

import dataclasses

import onnxruntime

from rewriter.probe import FORMS, ProbeResult, probe, select_form
from rewriter.rules import FormDecision

__all__ = ["FormRejectedError", "ProbedFormChooser"]


class FormRejectedError(Exception):
    """A form forced with --form failed the probe (and --force was not given)."""


@dataclasses.dataclass
class ProbedFormChooser:
    """A rules.FormChooser backed by the form probe, probing each (dtype, D) once."""

    provider: str = "cpu"
    requested: str = "auto"
    force: bool = False
    results: dict[tuple[str, int], ProbeResult] = dataclasses.field(default_factory=dict)

    @property
    def runtime(self) -> str:
        """The runtime the probe runs on, as the model's metadata records it."""
        return f"onnxruntime {onnxruntime.__version__}"

    def __post_init__(self) -> None:
        if self.requested != "auto" and self.requested not in FORMS:
            raise ValueError(f"unknown form {self.requested!r}; expected auto or one of {FORMS}")

    def __call__(self, dtype: str, head_size: int, windowed: bool) -> FormDecision:
        result = self._probe(dtype, head_size)
        choice = select_form(result, dtype, head_size, windowed, requested=self.requested)
        if choice.form is not None:
            return FormDecision(choice.form)
        if self.requested == "auto":
            return FormDecision(None, choice.reason)
        if not self.force:
            raise FormRejectedError(
                f"--form {self.requested} is rejected by the probe for {dtype} D={head_size} "
                f"on {self.provider}: {choice.reason} (--force writes it anyway)"
            )
        return FormDecision(self.requested, forced=True)

    def native_support(self, dtype: str, head_size: int, windowed: bool) -> FormDecision:
        """Can GQA run a layer with its own cache at this dtype/D on this provider?

        The `past-present` probe exercises the same kernel path (past + presents), so its
        verdict stands in for the native form.
        """
        result = self._probe(dtype, head_size)
        if result.qualifies("past-present", dtype, head_size, windowed):
            return FormDecision("native")
        verdict = result.verdict("past-present", dtype, head_size, windowed)
        return FormDecision(None, verdict.reason() if verdict else "not probed")

    def _probe(self, dtype: str, head_size: int) -> ProbeResult:
        result = self.results.get((dtype, head_size))
        if result is None:
            result = probe(self.provider, dtypes=[dtype], head_sizes=[head_size])
            self.results[(dtype, head_size)] = result
        return result

    def probe_tables(self) -> list[dict]:
        return [result.to_dict() for result in self.results.values()]
