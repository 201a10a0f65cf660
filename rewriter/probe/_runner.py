"""Run every form on every probe shape under one execution provider and judge the outputs.

Letters as in ``_reference``: B batch, S query length, T borrowed cache length, N query heads,
Nkv KV heads, D head size, W sliding window.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import numpy.typing as npt
import onnx_ir as ir
import onnxruntime as ort

from rewriter._error_text import clipped, collapsed
from rewriter._scratch import Scratch
from rewriter.probe._forms import DTYPES, GQA_NODE_NAME, OUTPUT, form_model
from rewriter.probe._one_layer import CACHE_KEY, CACHE_VALUE
from rewriter.probe._reference import attention_reference
from rewriter.probe._result import SHAPES, TOLERANCES, FormVerdict, ProbeError, ShapeOutcome
from rewriter.providers import PROVIDERS

__all__ = [
    "KV_NUM_HEADS",
    "NUM_HEADS",
    "PROBE_SHAPES",
    "WINDOW",
    "ProbeShape",
    "ort_provider",
    "run_forms",
]

# N/Nkv = 2 so that a wrong head grouping shows; Gemma 4 E2B itself has Nkv = 1.
NUM_HEADS = 4
KV_NUM_HEADS = 2
# Smaller than every T below, so the window cuts keys in every shape.
WINDOW = 8


@dataclass(frozen=True)
class ProbeShape:
    """One call of a shared layer: ``valid_lengths[b]`` real keys in row b (right padding)."""

    name: str
    query_len: int
    cache_len: int
    valid_lengths: tuple[int, ...]


PROBE_SHAPES: tuple[ProbeShape, ...] = (
    # S == T: GQA's "first prompt" path.
    ProbeShape("prefill", query_len=16, cache_len=16, valid_lengths=(16,)),
    ProbeShape("decode", query_len=1, cache_len=20, valid_lengths=(20,)),
    # 1 < S < T: GQA allows this only at B = 1 (SPEC section 4).
    ProbeShape("chunked", query_len=3, cache_len=20, valid_lengths=(20,)),
    # Rows of different length: the second row's token is not at the end of the buffer.
    ProbeShape("batch2-decode", query_len=1, cache_len=20, valid_lengths=(20, 13)),
)
assert tuple(shape.name for shape in PROBE_SHAPES) == SHAPES

_ROUNDING_DTYPES: dict[str, npt.DTypeLike] = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}


def ort_provider(provider: str) -> str:
    """Map "cpu"/"cuda" to an available onnxruntime provider name, or raise ProbeError."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {tuple(PROVIDERS)}")
    # The provider alone, without the CPU fallback a CUDA session elsewhere keeps: a form
    # must run on the provider it is probed for.
    name = PROVIDERS[provider][0]
    if name not in ort.get_available_providers():
        if provider == "cuda":
            raise ProbeError(
                "CUDA provider not available: install onnxruntime-gpu and run on a machine "
                "with an NVIDIA GPU"
            )
        raise ProbeError(f"{name} not available in onnxruntime {ort.__version__}")
    return name


def run_forms(
    provider: str, forms: Sequence[str], dtypes: Sequence[str], head_sizes: Sequence[int]
) -> list[FormVerdict]:
    """Verdicts for every (form, dtype, D, windowed), in that nesting order.

    On CPU everything runs in this process. Elsewhere each (form, dtype) runs in a fresh
    process: a GPU kernel that faults (SPEC section 3: CUDA GQA reads present outputs without
    a null check) leaves the CUDA context unusable, which would turn every later verdict into
    an error of someone else's making, or kills the process outright.
    """
    groups = [(form, dtype) for form in forms for dtype in dtypes]
    if provider == "cpu":
        return [
            verdict
            for form, dtype in groups
            for verdict in _run_group(provider, form, dtype, tuple(head_sizes))
        ]
    return [
        verdict
        for form, dtype in groups
        for verdict in _run_group_isolated(provider, form, dtype, tuple(head_sizes))
    ]


def _run_group_isolated(
    provider: str,
    form: str,
    dtype: str,
    head_sizes: tuple[int, ...],
    *,
    target: Callable[[str, str, str, tuple[int, ...]], list[FormVerdict]] | None = None,
) -> list[FormVerdict]:
    """``_run_group`` in a child process; ``target`` replaces it in tests of the crash path."""
    context = multiprocessing.get_context("spawn")  # fork would inherit a CUDA context
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        future = pool.submit(target or _run_group, provider, form, dtype, head_sizes)
        try:
            return future.result()
        except BrokenProcessPool:
            error = "probe process died (onnxruntime crashed or the process was killed)"
    outcomes = tuple(ShapeOutcome(shape, False, None, error) for shape in SHAPES)
    return [
        FormVerdict(form, dtype, head_size, windowed, False, outcomes)
        for head_size in head_sizes
        for windowed in (False, True)
    ]


def _run_group(
    provider: str, form: str, dtype: str, head_sizes: tuple[int, ...]
) -> list[FormVerdict]:
    return [
        _run_form(provider, form, dtype, head_size, windowed)
        for head_size in head_sizes
        for windowed in (False, True)
    ]


def _run_form(provider: str, form: str, dtype: str, head_size: int, windowed: bool) -> FormVerdict:
    # Not GQA's default 1/sqrt(D), so an ignored `scale` attribute shows as a wrong answer.
    scale = float(np.float32(0.7 / math.sqrt(head_size)))
    window = WINDOW if windowed else None
    model = form_model(
        form,
        dtype,
        num_heads=NUM_HEADS,
        kv_num_heads=KV_NUM_HEADS,
        head_size=head_size,
        scale=scale,
        local_window_size=window,
    )
    provider_name = ort_provider(provider)
    # Locked while this process lives: a kill cannot strand it (the next probe removes it).
    with Scratch(tempfile.gettempdir(), prefix="gqa-probe-") as scratch:
        profile_dir = scratch.name
        options = ort.SessionOptions()
        options.log_severity_level = 4  # failures are recorded from the exceptions instead
        # Profiling is the one record of which provider ran the GQA node: an unsupported
        # dtype on CUDA silently falls back to the CPU kernel instead of failing.
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "profile")
        try:
            session = ort.InferenceSession(
                ir.to_proto(model).SerializeToString(), options, providers=[provider_name]
            )
        except Exception as error:  # any refusal is a verdict, not a crash
            outcomes = tuple(ShapeOutcome(shape, False, None, _one_line(error)) for shape in SHAPES)
            return FormVerdict(form, dtype, head_size, windowed, False, outcomes)
        outcomes = tuple(
            _run_shape(session, shape, dtype, head_size, scale, window) for shape in PROBE_SHAPES
        )
        placed_on = _gqa_provider(session.end_profiling())
    if placed_on is not None and placed_on != provider_name:
        misplaced = f"GroupQueryAttention ran on {placed_on}, not {provider_name}"
        outcomes = tuple(
            ShapeOutcome(outcome.shape, False, None, misplaced) if outcome.ok else outcome
            for outcome in outcomes
        )
    qualifies = all(outcome.ok for outcome in outcomes)
    return FormVerdict(form, dtype, head_size, windowed, qualifies, outcomes)


def _run_shape(
    session: ort.InferenceSession,
    shape: ProbeShape,
    dtype: str,
    head_size: int,
    scale: float,
    window: int | None,
) -> ShapeOutcome:
    query, key, value = _inputs(shape, dtype, head_size)
    reference = attention_reference(
        query,
        key,
        value,
        shape.valid_lengths,
        num_heads=NUM_HEADS,
        kv_num_heads=KV_NUM_HEADS,
        scale=scale,
        local_window_size=window,
    )
    # Right padding: row b's first valid_lengths[b] keys are real. The rewrite derives
    # seqlens_k and total_sequence_length from this mask, as it does in a real model.
    attention_mask = np.zeros((len(shape.valid_lengths), shape.cache_len), dtype=np.int64)
    for row, length in enumerate(shape.valid_lengths):
        attention_mask[row, :length] = 1
    feeds = {
        "query": _in_dtype(query, dtype),
        "attention_mask": attention_mask,
        CACHE_KEY: _in_dtype(key, dtype),
        CACHE_VALUE: _in_dtype(value, dtype),
    }
    try:
        # Twice: a form that reads memory it does not own (split-nopresent) may return a
        # different wrong answer each time, or by luck the right one once.
        first, second = (session.run([OUTPUT], feeds)[0] for _ in range(2))
    except Exception as error:  # an error is a recorded outcome
        return ShapeOutcome(shape.name, False, None, _one_line(error))
    diffs = [_max_abs_diff(output, reference) for output in (first, second)]
    max_diff = math.nan if any(math.isnan(d) for d in diffs) else max(diffs)
    tolerance = TOLERANCES[dtype] * max(1.0, float(np.abs(reference).max()))
    ok = not math.isnan(max_diff) and max_diff <= tolerance
    error = None
    if not ok and not np.array_equal(first, second, equal_nan=True):
        # Fixed text (no numbers) so that the table can footnote it once.
        error = "non-reproducible: two runs on the same inputs differ"
    return ShapeOutcome(shape.name, ok, max_diff, error)


def _inputs(
    shape: ProbeShape, dtype: str, head_size: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Random query, key, value in float32, already rounded to ``dtype`` (so exact there)."""
    batch = len(shape.valid_lengths)
    rng = np.random.default_rng([head_size, shape.query_len, shape.cache_len, batch])

    def draw(*dims: int) -> npt.NDArray[np.float32]:
        values = rng.standard_normal(dims).astype(np.float32)
        return values.astype(_ROUNDING_DTYPES[dtype]).astype(np.float32)

    key = draw(batch, KV_NUM_HEADS, shape.cache_len, head_size)
    value = draw(batch, KV_NUM_HEADS, shape.cache_len, head_size)
    for row, length in enumerate(shape.valid_lengths):
        # Loud padding: a kernel that reads past a row's length is visibly wrong.
        key[row, :, length:] = 30.0
        value[row, :, length:] = 1000.0
    return draw(batch, shape.query_len, NUM_HEADS * head_size), key, value


def _in_dtype(values: npt.NDArray[np.float32], dtype: str) -> np.ndarray | ort.OrtValue:
    """``values`` as a feed of the model's dtype; bfloat16 has no NumPy type ORT accepts,
    so it goes in as an OrtValue over the bits."""
    rounded = values.astype(_ROUNDING_DTYPES[dtype])
    if dtype != "bfloat16":
        return rounded
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
        rounded.view(np.uint16), int(DTYPES[dtype])
    )


def _max_abs_diff(output: npt.NDArray[np.float32], reference: npt.NDArray[np.floating]) -> float:
    diff = np.abs(output.astype(np.float64) - reference)
    return math.nan if np.isnan(diff).any() else float(diff.max())


def _gqa_provider(profile_path: str) -> str | None:
    with open(profile_path, encoding="utf-8") as profile:
        events = json.load(profile)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").startswith(f"{GQA_NODE_NAME}_"):
            return event.get("args", {}).get("provider")
    return None  # GQA never ran (every shape failed), nothing to check


_STATUS_PREFIX = re.compile(
    r"Non-zero status code returned while running \w+ node\. Name:'[^']*' Status Message: "
)


def _one_line(error: BaseException) -> str:
    # Without the node's name: one footnote per cause, however many verdicts share it.
    return clipped(_STATUS_PREFIX.sub("", collapsed(error)))
