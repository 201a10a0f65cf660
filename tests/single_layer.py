"""One KV-shared layer as the exporters write it, its feeds and its float64 reference.

Shared by the property test (tests/test_properties_reference.py) and the window-slice tests
(tests/test_window_slice.py): the smallest model the rule rewrites, so a failure points at
the GroupQueryAttention the rule builds, not at a model.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from strategies import SingleLayerCase

from rewriter.probe._one_layer import CACHE_KEY, CACHE_VALUE, OneLayer, kv_shared_layer
from rewriter.probe._reference import attention_reference
from rewriter.verification._tolerance import RELATIVE_TOLERANCE

CHUNK_NEEDS_BATCH_1 = "batch_size must be 1 when sequence_length > 1 and past context is given"
_KEY, _VALUE = CACHE_KEY, CACHE_VALUE


def shared_layer_model(case: SingleLayerCase) -> ir.Model:
    """One KV-shared Attention as the exporters write it (SPEC.md section 2)."""
    return kv_shared_layer(
        OneLayer(
            num_heads=case.num_heads,
            kv_num_heads=case.kv_num_heads,
            head_size=case.head_size,
            window=case.window,
            mask_style=case.mask_style,
            scale=case.scale,
            softcap=case.softcap,
            dtype=case.dtype,
        )
    )


def feeds(case: SingleLayerCase) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(case.seed)
    dtype = np.dtype(case.dtype)
    b, s, t = case.batch, case.query_length, case.total_length
    mask = np.zeros((b, t), dtype=np.int64)
    for row, length in enumerate(case.valid_lengths):
        mask[row, :length] = 1
    cache_shape = (b, case.kv_num_heads, t, case.head_size)
    return {
        "query": rng.standard_normal((b, s, case.num_heads * case.head_size)).astype(dtype),
        "attention_mask": mask,
        _KEY: rng.standard_normal(cache_shape).astype(dtype),
        _VALUE: rng.standard_normal(cache_shape).astype(dtype),
    }


def reference(case: SingleLayerCase, inputs: dict[str, np.ndarray], rows: slice) -> np.ndarray:
    """The float64 output for `rows`; in a padded prefill, row by row over its valid prefix."""
    scale = case.scale if case.scale is not None else 1.0 / np.sqrt(case.head_size)
    options = {
        "num_heads": case.num_heads,
        "kv_num_heads": case.kv_num_heads,
        "scale": scale,
        "local_window_size": case.window,
        "softcap": case.softcap,
    }
    lengths = np.asarray(case.valid_lengths)[rows]
    if not case.is_prefill:
        return attention_reference(
            inputs["query"][rows], inputs[_KEY][rows], inputs[_VALUE][rows], lengths, **options
        )
    out = np.zeros(inputs["query"][rows].shape)
    for index, length in enumerate(lengths):
        row = rows.start + index
        out[index, :length] = attention_reference(
            inputs["query"][row : row + 1, :length],
            inputs[_KEY][row : row + 1, :, :length],
            inputs[_VALUE][row : row + 1, :, :length],
            [length],
            **options,
        )[0]
    return out


def assert_close(case: SingleLayerCase, actual: np.ndarray, expected: np.ndarray, rows) -> None:
    """Compare valid query positions, tolerance as the verifier fixes it for the dtype."""
    tolerance = RELATIVE_TOLERANCE[np.dtype(case.dtype)]
    for index, length in enumerate(np.asarray(case.valid_lengths)[rows]):
        valid = slice(0, length) if case.is_prefill else slice(None)
        got = actual[index, valid].astype(np.float64)
        want = expected[index, valid]
        assert np.all(np.isfinite(got)), f"row {index}: non-finite output"
        error = float(np.max(np.abs(got - want))) if want.size else 0.0
        bound = tolerance * max(1.0, float(np.max(np.abs(want))) if want.size else 0.0)
        assert error <= bound, f"row {index}: max |GQA - reference| {error:.3g} > {bound:.3g}"
