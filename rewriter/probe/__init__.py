"""Which ``com.microsoft.GroupQueryAttention`` forms the installed onnxruntime computes correctly.

A KV-shared layer can hand its borrowed cache to GQA in several ways ("forms", SPEC section 3);
which of them ONNX Runtime accepts and computes correctly depends on its version, execution
provider and dtype. ``probe`` rewrites a one-layer export to each form with the KV-shared rule
itself and runs it against a float64 NumPy reference on prefill, decode, chunked and
right-padded batch-2 decode shapes; ``select_form`` picks the form to rewrite to from those
verdicts.

    result = probe("cpu", dtypes=["float16"], head_sizes=[256, 512])
    choice = select_form(result, "float16", 256, windowed=True)   # choice.form, choice.reason
    print(result.table())
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import onnxruntime as ort

from rewriter.probe._forms import DTYPES, FORMS
from rewriter.probe._result import FormVerdict, ProbeError, ProbeResult, ShapeOutcome
from rewriter.probe._runner import ort_provider, run_forms
from rewriter.probe._select import FORM_PREFERENCE, FormChoice, select_form

__all__ = [
    "FORMS",
    "FORM_PREFERENCE",
    "FormChoice",
    "FormVerdict",
    "ProbeError",
    "ProbeResult",
    "ShapeOutcome",
    "probe",
    "select_form",
]


def probe(
    provider: str = "cpu",
    dtypes: Iterable[str] = ("float32", "float16", "bfloat16"),
    head_sizes: Iterable[int] = (64, 256, 512),
    forms: Iterable[str] = FORMS,
) -> ProbeResult:
    """Probe every (form, dtype, head size, windowed or not) on ``provider`` ("cpu" or "cuda").

    Results are cached for the life of the process per onnxruntime version, provider and
    request, so callers may probe freely; the same request returns the same object.
    Raises ProbeError when the provider is not available, ValueError on unknown names.
    """
    request = (
        _unique(dtypes, DTYPES, "dtype"),
        tuple(dict.fromkeys(int(size) for size in head_sizes)),
        _unique(forms, FORMS, "form"),
    )
    if any(size <= 0 for size in request[1]):
        raise ValueError(f"head sizes must be positive, got {request[1]}")
    ort_provider(provider)  # fail before caching anything
    return _cached_probe(ort.__version__, provider, *request)


@functools.cache
def _cached_probe(
    ort_version: str,
    provider: str,
    dtypes: tuple[str, ...],
    head_sizes: tuple[int, ...],
    forms: tuple[str, ...],
) -> ProbeResult:
    return ProbeResult(ort_version, provider, run_forms(provider, forms, dtypes, head_sizes))


def _unique(names: Iterable[str], known: Iterable[str], what: str) -> tuple[str, ...]:
    requested = tuple(dict.fromkeys(names))
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; expected some of {tuple(known)}")
    return requested
