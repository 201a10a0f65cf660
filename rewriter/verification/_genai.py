"""Greedy generation with onnxruntime-genai, the client users deploy with: original package
against rewritten package, token ids in (``append_tokens``, no tokenizer), tokens and logits out.

Each package runs in the share-buffer mode its own config declares (``share_buffer`` overrides
it, to try a mode before the config says it). Prompts are right-padded with the config's
``pad_token_id``: onnxruntime-genai treats only trailing pad tokens as padding, and in batched
decode feeds the appended mask (``[1,1,1,1,0,0,1]`` for a 4-token row padded to 6) with
position ids continuing from each row's own length.

Logits are compared step by step with the verifier's fixed tolerances (``_tolerance.compare``);
tokens must be equal. Where a step misses its tolerance, the original package runs again with
graph optimizations disabled (``optimized=False``) and that step passes within the original's
own spread (``_spread``), as in the whole-model checks: a random-weight E2B-size package
differs from itself by 0.02 in its logits under genai while every token agrees.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rewriter._error_text import first_line
from rewriter.verification._result import Case
from rewriter.verification._spread import spread_between
from rewriter.verification._tolerance import compare

__all__ = ["GenerationRun", "Generations", "compare_generations", "genai_available", "generate"]

# Short enough for a proof on any machine, long enough to run past a sliding window of the
# tiny exports (16 in the corpus package) in decode.
MAX_LENGTH = 48
_PROMPT_LENGTHS = ((7,), (7, 4))  # batch 1; batch 2 with the second row right-padded


def genai_available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Generations:
    """Per batch: the sequences (prompt + generated) and the logits of every step."""

    sequences: dict[int, list[list[int]]]
    logits: dict[int, list[np.ndarray]]


@dataclasses.dataclass(frozen=True)
class GenerationRun:
    """One comparison: a batch size, tokens equal or where they part, the worst logits case."""

    batch: int
    share_buffer: bool
    tokens_equal: bool
    steps: int
    worst: Case
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.tokens_equal and self.worst.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "past_present_share_buffer": self.share_buffer,
            "passed": self.passed,
            "tokens_equal": self.tokens_equal,
            "steps": self.steps,
            "worst_logits": self.worst.to_dict(),
            "note": self.note,
        }

    def line(self) -> str:
        verdict = "equal" if self.tokens_equal else f"DIFFER ({self.note})"
        return (
            f"genai batch {self.batch} (share buffer {'on' if self.share_buffer else 'off'}): "
            f"{self.steps} steps, tokens {verdict}, logits {self.worst.judgement()}"
        )


def _prompts(config: dict[str, Any], seed: int) -> dict[int, np.ndarray]:
    model = config["model"]
    pad = int(model.get("pad_token_id", 0))
    special = {pad, model.get("bos_token_id"), *_as_list(model.get("eos_token_id"))}
    ordinary = np.array([t for t in range(int(model["vocab_size"])) if t not in special])
    rng = np.random.default_rng(seed)
    prompts = {}
    for lengths in _PROMPT_LENGTHS:
        ids = np.full((len(lengths), max(lengths)), pad, np.int32)
        for row, length in enumerate(lengths):
            ids[row, :length] = rng.choice(ordinary, size=length)
        prompts[len(lengths)] = ids
    return prompts


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else [value]


def generate(
    package: Path, *, share_buffer: bool | None = None, seed: int = 0, optimized: bool = True
) -> Generations:
    """Greedy generation on `package` at batch 1 and 2; RuntimeError (one line) when genai
    refuses the package or a run fails. ``optimized=False``: graph optimizations disabled
    (the original's twin, ``_spread``)."""
    import onnxruntime_genai as og

    config = json.loads((package / "genai_config.json").read_text())
    max_length = min(MAX_LENGTH, int(config["model"].get("context_length", MAX_LENGTH)))
    # One thread: the proof's numbers do not depend on the machine's load or core count.
    # Fatal-only logging: a failing run raises, and its one line goes into the report.
    session: dict[str, Any] = {"intra_op_num_threads": 1, "log_severity_level": 4}
    if not optimized:
        session["graph_optimization_level"] = "ORT_DISABLE_ALL"
    overlay: dict[str, Any] = {"model": {"decoder": {"session_options": session}}}
    if share_buffer is not None:
        overlay["search"] = {"past_present_share_buffer": share_buffer}
    try:
        genai_config = og.Config(str(package))
        genai_config.overlay(json.dumps(overlay))
        model = og.Model(genai_config)
        sequences, logits = {}, {}
        for batch, ids in _prompts(config, seed).items():
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=max_length, do_sample=False, batch_size=batch)
            generator = og.Generator(model, params)
            generator.append_tokens(ids)
            steps = []
            while not generator.is_done():
                steps.append(np.array(generator.get_logits()))
                generator.generate_next_token()
            sequences[batch] = [[int(t) for t in generator.get_sequence(b)] for b in range(batch)]
            logits[batch] = steps
    except Exception as error:  # genai raises RuntimeError for any ORT or config failure
        raise RuntimeError(first_line(error)[:300]) from None
    return Generations(sequences, logits)


def compare_generations(
    reference: Generations,
    candidate: Generations,
    *,
    share_buffer: bool,
    twin: Callable[[], Generations | None] | None = None,
) -> list[GenerationRun]:
    """One run per batch size: tokens must be equal, each step's logits within tolerance, or
    within the original's own spread where ``twin`` (the original run again with graph
    optimizations disabled, asked for only then) generated the same tokens up to that step."""
    runs = [
        _compared(reference, candidate, batch, share_buffer, None) for batch in reference.sequences
    ]
    if twin is None or not any(_missed(run) for run in runs):
        return runs
    other = twin()
    if other is None:
        return runs
    return [
        _compared(reference, candidate, run.batch, share_buffer, other) if _missed(run) else run
        for run in runs
    ]


def _missed(run: GenerationRun) -> bool:
    return run.tokens_equal and not run.worst.passed and np.isfinite(run.worst.max_abs_diff)


def _compared(
    reference: Generations,
    candidate: Generations,
    batch: int,
    share_buffer: bool,
    twin: Generations | None,
) -> GenerationRun:
    expected, actual = reference.sequences[batch], candidate.sequences[batch]
    note = ""
    tokens_equal = expected == actual
    if not tokens_equal:
        row = next(r for r in range(batch) if expected[r] != actual[r])
        at = next(
            (i for i, (a, b) in enumerate(zip(expected[row], actual[row], strict=False)) if a != b),
            min(len(expected[row]), len(actual[row])),
        )
        note = f"row {row} first differs at position {at}"
    spreads = _step_spreads(reference, twin, batch)
    cases = [
        compare(f"batch {batch} step {step}", ref, got, spreads[step] if spreads else None)
        for step, (ref, got) in enumerate(
            zip(reference.logits[batch], candidate.logits[batch], strict=False)
        )
    ]
    if len(reference.logits[batch]) != len(candidate.logits[batch]):
        cases.append(Case(f"batch {batch}", np.inf, 0.0, False, "a different number of steps"))
    worst = max(cases, key=lambda case: case.severity)
    return GenerationRun(batch, share_buffer, tokens_equal, len(cases), worst, note)


def _step_spreads(
    reference: Generations, twin: Generations | None, batch: int
) -> list[float | None] | None:
    """Per step, the original's difference to its twin; None once the twin has generated a
    token of its own (its logits then answer another question)."""
    if twin is None:
        return None
    steps = reference.logits[batch]
    prompt = len(reference.sequences[batch][0]) - len(steps)
    spreads: list[float | None] = []
    for step, logits in enumerate(steps):
        # Step k's logits follow the prompt and the tokens generated at steps 0..k-1.
        seen = prompt + step
        same_input = all(
            mine[:seen] == theirs[:seen]
            for mine, theirs in zip(twin.sequences[batch], reference.sequences[batch], strict=True)
        )
        comparable = same_input and step < len(twin.logits[batch])
        spreads.append(spread_between(logits, twin.logits[batch][step]) if comparable else None)
    return spreads
