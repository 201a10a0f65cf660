"""ONNX Runtime numerics of rewritten fixtures: what the rewrite promises, checked directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from decoder_runs import FIXTURES, TOLERANCE, Decoder, relative_error, tokens

from rewriter import rewrite

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "fixtures"
CORRECT_IN_DECODE = ("p2_tiny", "p2_all_attention_tiny", "p2_tiny_opset24_explicit")


def pair(name: str, **options) -> tuple[Decoder, Decoder]:
    """The fixture and its KV-shared rewrite (the 3 shared layers; see test_nonshared_rule)."""
    original = onnx.load(FIXTURE_DIR / f"{name}.onnx")
    rewritten, report = rewrite(original, layers="shared", **options)
    assert report.rewritten == 3
    return Decoder(original), Decoder(rewritten)


@pytest.mark.parametrize("name", FIXTURES)
def test_prefill_logits_equal_the_original(name: str) -> None:
    original, rewritten = pair(name)
    tolerance = TOLERANCE[np.dtype(original.dtype)]
    for length in (1, 3, 9, 23):  # window is 4: 9 and 23 reach beyond it
        ids = tokens(length, seed=length)
        mask = np.ones((1, length), np.int64)
        expected = original.run(ids, mask)["logits"]
        actual = rewritten.run(ids, mask)["logits"]
        assert relative_error(actual, expected) <= tolerance, (name, length)


@pytest.mark.parametrize("name", FIXTURES)
def test_rewritten_decode_equals_a_full_prefill(name: str) -> None:
    _, rewritten = pair(name)
    ids = tokens(12, seed=7)
    full = rewritten.run(ids, np.ones((1, 12), np.int64))["logits"][:, 6:]
    stepped = rewritten.prefill_then_decode(ids, prefill=6)
    assert relative_error(stepped, full) <= TOLERANCE[np.dtype(rewritten.dtype)]


def test_rewritten_chunked_step_equals_a_full_prefill() -> None:
    _, rewritten = pair("p1_tiny")
    ids = tokens(11, seed=3)
    full = rewritten.run(ids, np.ones((1, 11), np.int64))["logits"][:, 7:]
    first = rewritten.run(ids[:, :7], np.ones((1, 7), np.int64))
    chunk = rewritten.run(ids[:, 7:], np.ones((1, 11), np.int64), first)["logits"]
    assert relative_error(chunk, full) <= 1e-4


@pytest.mark.parametrize("name", CORRECT_IN_DECODE)
def test_decode_equals_the_original_where_the_original_is_right(name: str) -> None:
    original, rewritten = pair(name)
    ids = tokens(12, seed=11)
    expected = original.prefill_then_decode(ids, prefill=5)
    assert relative_error(rewritten.prefill_then_decode(ids, prefill=5), expected) <= 1e-4


def test_p1_original_is_wrong_in_decode_and_the_rewrite_is_not() -> None:
    # SPEC.md 2 (a): is_causal=1 without past is upper-left aligned in the original.
    original, rewritten = pair("p1_tiny")
    ids = tokens(10, seed=5)
    full = original.run(ids, np.ones((1, 10), np.int64))["logits"][:, 6:]
    assert relative_error(original.prefill_then_decode(ids, prefill=6), full) > 0.05
    assert relative_error(rewritten.prefill_then_decode(ids, prefill=6), full) <= 1e-4


@pytest.mark.parametrize("name", ["p1_tiny", "p2_tiny", "p2_all_attention_tiny"])
def test_right_padded_batch_equals_each_row_alone(name: str) -> None:
    _, rewritten = pair(name)
    ids = tokens(9, batch=2, seed=2)
    mask = np.ones((2, 9), np.int64)
    mask[1, 6:] = 0
    batch = rewritten.run(ids, mask)["logits"]
    row0 = rewritten.run(ids[:1], mask[:1])["logits"]
    row1 = rewritten.run(ids[1:, :6], mask[1:, :6])["logits"]
    assert relative_error(batch[:1], row0) <= 1e-4
    assert relative_error(batch[1:, :6], row1) <= 1e-4


def test_exact_padding_keeps_left_padding_semantics() -> None:
    original, narrowed = pair("p2_all_attention_tiny")
    _, exact = pair("p2_all_attention_tiny", exact_padding=True)
    ids = tokens(10, batch=2, seed=4)
    mask = np.ones((2, 10), np.int64)
    mask[1, :4] = 0  # left padding
    expected = original.run(ids, mask)["logits"]
    valid = np.s_[1:, 4:]
    assert relative_error(exact.run(ids, mask)["logits"][valid], expected[valid]) <= 1e-4
    # Without it the contract narrows to right padding, as the report warns.
    assert relative_error(narrowed.run(ids, mask)["logits"][valid], expected[valid]) > 1e-2
