"""Property: one layer with its own cache rewritten to ``If(S == 1: fold over Concat(past,
new), else: GQA)`` (the CPU policy for float32 own-cache layers,
rewriter.speed.OWN_CACHE_FOLD_ON_CPU) gives what the export gives on ONNX Runtime (output and
presents), for N/Nkv in {1, 2, 4, 8}, any D, windows around T, right-padded batches whose
decode token sits after the padding (the export's own convention), prefill and decode,
fp32 and fp16.
"""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, note
from strategies import gqa_head_sizes

import rewriter
from rewriter.probe._one_layer import (
    CACHE_KEY,
    CACHE_VALUE,
    NEW_KEY,
    NEW_VALUE,
    OneLayer,
    own_cache_layer,
)
from rewriter.rules import always_past
from rewriter.speed import OWN_CACHE_FOLD_ON_CPU
from rewriter.verification._tolerance import RELATIVE_TOLERANCE

pytestmark = pytest.mark.property


@st.composite
def cases(draw: st.DrawFn) -> tuple[OneLayer, int, int, tuple[int, ...], str, int]:
    """(layer, S, T, valid keys per row, dtype, seed); S is 1 (the fold) or T (the export)."""
    kv_num_heads = draw(st.integers(1, 2))
    total = draw(st.integers(1, 70))
    query_length = draw(st.sampled_from([1, 1, total]))
    window = draw(
        st.one_of(st.none(), st.sampled_from(sorted({1, max(1, total - 1), total, total + 1})))
    )
    dtype = draw(st.sampled_from(["float32", "float16"]))
    layer = OneLayer(
        num_heads=kv_num_heads * draw(st.sampled_from([1, 2, 4, 8])),
        kv_num_heads=kv_num_heads,
        head_size=draw(gqa_head_sizes(256)),
        window=window,
        mask_style="p2",
        scale=draw(st.one_of(st.just(1.0), st.none())),
        softcap=draw(st.one_of(st.just(0.0), st.floats(1.0, 50.0))),
        dtype=dtype,
    )
    batch = draw(st.integers(1, 3))
    low = 1 if query_length == 1 else total
    valid = tuple(draw(st.integers(low, total)) for _ in range(batch))
    return layer, query_length, total, valid, dtype, draw(st.integers(0, 2**16))


def _feeds(
    layer: OneLayer, s: int, t: int, valid: tuple[int, ...], dtype: str, seed: int
) -> dict[str, np.ndarray]:
    """A decode step (S = 1) appends after a row's padding: its mask is the row's prompt,
    padding, then a 1 for the new key at slot T - 1; a prefill (S = T) is unpadded."""
    rng = np.random.default_rng(seed)
    b, nkv, d = len(valid), layer.kv_num_heads, layer.head_size
    mask = np.zeros((b, t), dtype=np.int64)
    for row, length in enumerate(valid):
        mask[row, : length - 1] = 1
        mask[row, t - 1] = 1
    merged = (b, s, nkv * d)
    return {
        "query": rng.standard_normal((b, s, layer.num_heads * d)).astype(dtype),
        NEW_KEY: rng.standard_normal(merged).astype(dtype),
        NEW_VALUE: rng.standard_normal(merged).astype(dtype),
        CACHE_KEY: rng.standard_normal((b, nkv, t - s, d)).astype(dtype),
        CACHE_VALUE: rng.standard_normal((b, nkv, t - s, d)).astype(dtype),
        "attention_mask": mask,
    }


def _run(model: ir.Model, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, inputs)


@given(case=cases())
def test_the_own_cache_fold_gives_what_the_export_gives(case) -> None:
    layer, s, t, valid, dtype, seed = case
    note(f"{layer} S={s} T={t} valid={valid}")
    original = own_cache_layer(layer)
    inputs = _feeds(layer, s, t, valid, dtype, seed)
    expected = _run(original, inputs)
    model, report = rewriter.rewrite(
        own_cache_layer(layer),
        choose_form=always_past,
        choose_speed=lambda kind: OWN_CACHE_FOLD_ON_CPU,
    )
    (done,) = report.rewrites
    assert done.speed_form == OWN_CACHE_FOLD_ON_CPU.label
    (phase_if,) = [n for n in model.graph if n.op_type == "If"]
    assert len(phase_if.outputs) == 3  # the output and both presents
    actual = _run(model, inputs)
    tolerance = RELATIVE_TOLERANCE[np.dtype(dtype)]
    roles = ("output", "present_key", "present_value")
    for name, want, got in zip(roles, expected, actual, strict=True):
        assert got.shape == want.shape, name
        if name != "output":
            # The presents are the same Concat of the same inputs: bit for bit.
            np.testing.assert_array_equal(got, want, err_msg=name)
            continue
        scale = max(1.0, float(np.max(np.abs(want.astype(np.float64)))))
        difference = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
        assert difference <= tolerance * scale, f"output differs by {difference}"
