"""Tests of the GQA form probe.

The verdict tests pin what the installed onnxruntime does today (SPEC section 3). They are facts
about one release, not wishes: when a new onnxruntime changes one, the test fails on purpose so
that SPEC.md and FORM_PREFERENCE get revisited.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import onnxruntime as ort
import pytest

from rewriter.probe import (
    FORM_PREFERENCE,
    FORMS,
    FormVerdict,
    ProbeError,
    ProbeResult,
    ShapeOutcome,
    probe,
    select_form,
)
from rewriter.probe._reference import attention_reference
from rewriter.probe._result import SHAPES
from rewriter.probe._runner import _run_group, _run_group_isolated

HEAD_SIZES = (64, 256, 512)
WINDOWED = (False, True)
CHANGED = f"onnxruntime {ort.__version__} changed a probed GQA fact; update SPEC.md section 3"


@pytest.fixture(scope="module")
def cpu_result() -> ProbeResult:
    return probe("cpu", head_sizes=HEAD_SIZES)


def _verdicts(result: ProbeResult, form: str, dtypes: tuple[str, ...]) -> list[FormVerdict]:
    found = [
        result.verdict(form, dtype, head_size, windowed)
        for dtype in dtypes
        for head_size in HEAD_SIZES
        for windowed in WINDOWED
    ]
    assert all(verdict is not None for verdict in found)
    return [verdict for verdict in found if verdict is not None]


def _outcome(verdict: FormVerdict, shape: str) -> ShapeOutcome:
    return next(outcome for outcome in verdict.outcomes if outcome.shape == shape)


# --- verdicts on the installed onnxruntime (CPU) ---------------------------------------------


def test_probe_covers_every_combination(cpu_result: ProbeResult) -> None:
    assert cpu_result.ort_version == ort.__version__
    assert cpu_result.provider == "cpu"
    assert len(cpu_result.verdicts) == len(FORMS) * 3 * len(HEAD_SIZES) * len(WINDOWED)
    for verdict in cpu_result.verdicts:
        assert tuple(outcome.shape for outcome in verdict.outcomes) == SHAPES
        assert verdict.qualifies == all(outcome.ok for outcome in verdict.outcomes)


@pytest.mark.parametrize("form", ["past", "past-present"])
def test_past_forms_qualify_for_float32_and_float16(cpu_result: ProbeResult, form: str) -> None:
    for verdict in _verdicts(cpu_result, form, ("float32", "float16")):
        assert verdict.qualifies, f"{CHANGED}: {form} {verdict.dtype} D={verdict.head_size}: " + (
            verdict.reason()
        )


def test_bfloat16_has_no_cpu_kernel(cpu_result: ProbeResult) -> None:
    for form in FORMS:
        for verdict in _verdicts(cpu_result, form, ("bfloat16",)):
            assert not verdict.qualifies, CHANGED
            for outcome in verdict.outcomes:
                assert outcome.max_abs_diff is None
                assert outcome.error is not None and "NOT_IMPLEMENTED" in outcome.error, CHANGED


def test_kv_form_runs_prefill_but_rejects_decode(cpu_result: ProbeResult) -> None:
    for verdict in _verdicts(cpu_result, "kv", ("float32", "float16")):
        assert not verdict.qualifies, CHANGED
        assert _outcome(verdict, "prefill").ok, CHANGED
        for shape in ("decode", "chunked", "batch2-decode"):
            error = _outcome(verdict, shape).error
            assert error is not None and "same sequence length" in error, f"{CHANGED}: {error}"


def test_split_is_right_at_batch1_but_wrong_for_right_padded_batch(
    cpu_result: ProbeResult,
) -> None:
    for verdict in _verdicts(cpu_result, "split", ("float32", "float16")):
        assert not verdict.qualifies, CHANGED
        for shape in ("prefill", "decode", "chunked"):
            assert _outcome(verdict, shape).ok, f"{CHANGED}: {verdict.reason()}"
        padded = _outcome(verdict, "batch2-decode")
        # A wrong answer, not an error: the insidious kind the probe exists to catch.
        assert padded.error is None and padded.max_abs_diff is not None, CHANGED
        assert padded.max_abs_diff > 1.0, CHANGED
        assert "batch2-decode: wrong" in verdict.reason()


def test_split_without_present_reads_garbage(cpu_result: ProbeResult) -> None:
    for verdict in _verdicts(cpu_result, "split-nopresent", ("float32", "float16")):
        assert not verdict.qualifies, CHANGED
        # Past length is 0 at prefill, so only calls with a past read out of bounds.
        assert _outcome(verdict, "prefill").ok, CHANGED
        for shape in ("decode", "chunked", "batch2-decode"):
            assert not _outcome(verdict, shape).ok, CHANGED


def test_auto_selects_past_on_cpu(cpu_result: ProbeResult) -> None:
    for dtype in ("float32", "float16"):
        assert select_form(cpu_result, dtype, 256, True).form == "past"
    choice = select_form(cpu_result, "bfloat16", 512, False)
    assert choice.form is None
    assert "NOT_IMPLEMENTED" in choice.reason


def test_result_serialises_and_prints(cpu_result: ProbeResult) -> None:
    table = json.loads(json.dumps(cpu_result.to_dict(), allow_nan=False))
    assert len(table["verdicts"]) == len(cpu_result.verdicts)
    text = cpu_result.table()
    assert text.splitlines()[0].startswith(f"GQA form probe: onnxruntime {ort.__version__}")
    assert "NOT_IMPLEMENTED" in text
    # Every error is footnoted once, not once per cell.
    assert text.count("NOT_IMPLEMENTED") == 1


# --- cache, providers, isolation ---------------------------------------------------------------


def test_probe_is_cached_per_request(cpu_result: ProbeResult) -> None:
    start = time.perf_counter()
    again = probe("cpu", head_sizes=list(HEAD_SIZES))
    assert again is cpu_result
    assert time.perf_counter() - start < 0.05
    smaller = probe("cpu", dtypes=["float32"], head_sizes=[64], forms=["past"])
    assert smaller is not cpu_result
    assert [(v.form, v.dtype, v.head_size) for v in smaller.verdicts] == [
        ("past", "float32", 64)
    ] * 2


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="dtype"):
        probe(dtypes=["float64"])
    with pytest.raises(ValueError, match="form"):
        probe(forms=["packed"])
    with pytest.raises(ValueError, match="provider"):
        probe("rocm")


def test_cuda_without_gpu_build_raises_probe_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend to be a CPU-only build even on a GPU machine, so this always runs.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ProbeError, match="install onnxruntime-gpu"):
        probe("cuda")


def test_isolated_run_matches_in_process() -> None:
    # The path every non-CPU provider takes, checked where it can run.
    isolated = _run_group_isolated("cpu", "split", "float32", (64,))
    assert isolated == _run_group("cpu", "split", "float32", (64,))


def _crash(provider: str, form: str, dtype: str, head_sizes: tuple[int, ...]) -> list[FormVerdict]:
    os._exit(3)


def test_crashing_probe_process_becomes_a_verdict() -> None:
    verdicts = _run_group_isolated("cpu", "past", "float16", (64, 256), target=_crash)
    assert [(v.head_size, v.windowed, v.qualifies) for v in verdicts] == [
        (64, False, False),
        (64, True, False),
        (256, False, False),
        (256, True, False),
    ]
    assert "process died" in verdicts[0].reason()


# --- select_form on fake results -------------------------------------------------------------


def _fake_verdict(form: str, qualifies: bool, error: str | None = None) -> FormVerdict:
    outcomes = tuple(
        ShapeOutcome(shape, qualifies, 0.0 if qualifies else None, None if qualifies else error)
        for shape in SHAPES
    )
    return FormVerdict(form, "float16", 256, True, qualifies, outcomes)


def _fake_result(*verdicts: FormVerdict) -> ProbeResult:
    return ProbeResult("9.9.9", "cuda", list(verdicts))


def test_auto_prefers_past() -> None:
    result = _fake_result(*(_fake_verdict(form, True) for form in reversed(FORMS)))
    assert select_form(result, "float16", 256, True).form == "past"
    assert FORM_PREFERENCE[0] == "past"
    assert "split-nopresent" not in FORM_PREFERENCE


def test_auto_falls_back_to_past_present() -> None:
    result = _fake_result(
        _fake_verdict("past", False, "present_key is null"),
        _fake_verdict("past-present", True),
        _fake_verdict("kv", True),
    )
    choice = select_form(result, "float16", 256, True)
    assert choice.form == "past-present"
    # Other cases of the same result are not confused with this one.
    assert select_form(result, "float16", 256, False).form is None
    assert select_form(result, "bfloat16", 256, True).form is None


def test_forced_form_rejected_by_probe_returns_its_reason() -> None:
    result = _fake_result(_fake_verdict("past", True), _fake_verdict("kv", False, "seq mismatch"))
    choice = select_form(result, "float16", 256, True, requested="kv")
    assert choice.form is None
    assert "seq mismatch" in choice.reason
    assert select_form(result, "float16", 256, True, requested="past").form == "past"
    assert "not probed" in select_form(result, "float16", 256, True, requested="split").reason
    with pytest.raises(ValueError, match="unknown form"):
        select_form(result, "float16", 256, True, requested="packed")


def test_nothing_qualifies_lists_every_form_tried() -> None:
    result = _fake_result(
        _fake_verdict("past", False, "crash A"),
        _fake_verdict("past-present", False, "crash B"),
        _fake_verdict("split-nopresent", True),  # never picked automatically
    )
    choice = select_form(result, "float16", 256, True)
    assert choice.form is None
    for text in ("past: ", "crash A", "past-present: ", "crash B", "kv: not probed", "split: "):
        assert text in choice.reason


# --- the NumPy reference ---------------------------------------------------------------------


def test_reference_window_of_one_returns_own_value() -> None:
    rng = np.random.default_rng(0)
    query = rng.standard_normal((1, 5, 4 * 3))
    key = rng.standard_normal((1, 2, 5, 3))
    value = rng.standard_normal((1, 2, 5, 3))
    out = attention_reference(
        query, key, value, [5], num_heads=4, kv_num_heads=2, scale=1.0, local_window_size=1
    )
    heads = out.reshape(1, 5, 4, 3)
    for head in range(4):  # query heads 0, 1 read KV head 0; 2, 3 read KV head 1
        np.testing.assert_allclose(heads[0, :, head], value[0, head // 2])


def test_reference_uniform_scores_average_visible_values() -> None:
    # Zero query: every visible key gets the same weight, so the output is a plain mean.
    value = np.arange(2 * 1 * 6 * 2, dtype=np.float64).reshape(2, 1, 6, 2)
    key = np.ones_like(value)
    query = np.zeros((2, 1, 2))
    out = attention_reference(query, key, value, [6, 4], num_heads=1, kv_num_heads=1, scale=1.0)
    np.testing.assert_allclose(out[0, 0], value[0, 0, :6].mean(axis=0))
    np.testing.assert_allclose(out[1, 0], value[1, 0, :4].mean(axis=0))  # padding ignored
    windowed = attention_reference(
        query, key, value, [6, 4], num_heads=1, kv_num_heads=1, scale=1.0, local_window_size=2
    )
    np.testing.assert_allclose(windowed[1, 0], value[1, 0, 2:4].mean(axis=0))
